"""Closed forms of THEORY §1–2 and the population flow's one-dimensional integrals.

References: naive numpy formulas on the sample, scipy's adaptive ``quad`` of the
Stein formula with the exact one-dimensional densities, and brute-force Monte
Carlo with its error bar. Quadrature comparisons stay inside
``QUADRATURE_SPREAD`` (the logit spread up to which the flow's rule is held to
QUADRATURE).

Densities of the margin ``z = β s Δᵀg`` of one component (mean ``m``, variance
``v``): Gaussian ``N(m, v)``; Laplace family ``g = μ + √w L ξ``, ``w ~ Exp(1)``:
``z`` is Laplace with scale ``b = √(v/2)``, ``p(z) = e^{−x}/(2b)`` with
``x = |z − m|/b``, and the weighted density ``q(z) = E_w[w N(z; m, wv)] =
(1 + x) e^{−x}/(4b)`` (a Bessel-K₃/₂ integral) that Stein's lemma needs for the
curvature term ``E[w σ(z)σ(−z)]``. The integrals run in ``t = (z − m)/√v``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import integrate, special

from conftest import (
    CLOSED_FORM,
    FINITE_DIFFERENCE,
    QMC,
    QUADRATURE,
    QUADRATURE_SPREAD,
    assert_close,
    assert_leq,
    mc_tolerance,
)
from dynamics import (
    PopulationFlow,
    answer_logps,
    first_step,
    initial_loss_slope,
    policy_weights,
    population_descent,
    priority_scores,
    reference_weights,
    simulate_sample,
)
from strategies import bounded, covariances, naive_signed_mean, problems, vectors
from synthetic import (
    Behavior,
    Problem,
    behaviors_with_angles,
    isotropic,
    population_mixture,
    sample,
    sample_batch,
)

BETAS = bounded(0.1, 3.0)
SEEDS = st.integers(0, 2**31)


def w0_for(dim: int, seed: int = 0) -> np.ndarray:
    return reference_weights(dim, vocab_size=4, scale=1.0, seed=seed)


def sigmoid(z):
    return special.expit(z)


def softplus(z):
    return np.logaddexp(0.0, z)


# ------------------------------------------------------------------ one-dimensional references


def standard_density(family: str, weighted: bool = False):
    """Density of the standardised margin ``t = (z − m)/√v`` (``weighted``: ``q``)."""
    if family == "gaussian":
        return lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    root2 = math.sqrt(2)
    if weighted:
        return lambda t: root2 / 4 * (1 + root2 * abs(t)) * math.exp(-root2 * abs(t))
    return lambda t: math.exp(-root2 * abs(t)) / root2


def quad_expect(f, family: str, m: float, v: float, *, weighted: bool = False,
                lower: float = -np.inf) -> float:
    """``E[f(z) 1{z > lower}]`` by adaptive quadrature in the standardised variable,
    split at the mean (the Laplace kink); tails beyond 40 sd are below 1e-20."""
    sd = math.sqrt(v)
    if sd == 0.0:
        return float(f(m)) if m > lower else 0.0
    p = standard_density(family, weighted)
    start = max(-40.0, (lower - m) / sd)
    pieces = [(start, 0.0), (max(start, 0.0), 40.0)]
    return sum(integrate.quad(lambda t: f(m + sd * t) * p(t), a, b, epsabs=1e-14,
                              epsrel=1e-12, limit=200)[0] for a, b in pieces if b > a)


def stein_drift_by_quad(mix, delta: np.ndarray, beta: float) -> np.ndarray:
    """``2β Σ_c π_c (s_c μ_c E[σ(−z_c)] − β Σ_c Δ E[w σ(z_c)σ(−z_c)])`` (THEORY §2)."""
    out = np.zeros_like(delta)
    for pi, s, mu, cov in zip(mix.weights, mix.signs, mix.means, mix.covs):
        m, v = beta * s * (delta @ mu), beta**2 * (delta @ cov @ delta)
        e1 = quad_expect(lambda z: sigmoid(-z), mix.family, m, v)
        e2 = quad_expect(lambda z: sigmoid(z) * sigmoid(-z), mix.family, m, v, weighted=True)
        out += 2 * beta * pi * (s * mu * e1 - beta * (cov @ delta) * e2)
    return out


def per_behavior(mix, per_component: np.ndarray) -> np.ndarray:
    """Average component values within each behavior, weighted by π_c."""
    share = np.eye(mix.num_behaviors)[mix.behavior] * mix.weights[:, None]
    return per_component @ (share / share.sum(0))


@st.composite
def deltas_within_spread(draw, problem: Problem, beta: float):
    """A direction scaled so that ``β·sd(Δᵀg) ≤ QUADRATURE_SPREAD`` for every class
    (spreads on several scales, from 5e-4 to the cap)."""
    direction = draw(vectors(problem.dim, -1, 1))
    if np.linalg.norm(direction) < 1e-3:
        direction = np.ones(problem.dim)
    worst = max(direction @ c @ direction for b in problem.behaviors
                for c in (b.cov_pos, b.cov_neg))
    spread = draw(st.sampled_from([0.01, 0.1, 0.5, 1.0])) * draw(bounded(0.05, 1.0)) * (
        QUADRATURE_SPREAD)
    return direction * spread / (beta * math.sqrt(worst))


# ------------------------------------------------------------------ first step and slope


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(10, 300), BETAS, bounded(0.01, 2.0), SEEDS)
def test_first_step_is_exact(problem, n, beta, lr, seed):
    data = sample_batch(problem, n, [seed], dtype=torch.float64)
    result = simulate_sample(data, seeds=[seed], beta=beta, lr=lr, steps=1,
                             reference=w0_for(problem.dim), keep_deltas=True)
    step = result.deltas[1, 0, 0].numpy()
    x, s = data.features[0].numpy(), data.signs[0].numpy()
    naive = lr * beta * sum(s[j] * x[j] for j in range(n)) / n
    pos, neg = x[s > 0], x[s < 0]
    p_pos = len(pos) / n
    by_classes = lr * beta * (p_pos * _mean(pos) - (1 - p_pos) * _mean(neg))
    assert_close(step, naive, CLOSED_FORM)
    assert_close(first_step(data.features[0], data.signs[0], beta=beta, lr=lr), naive,
                 CLOSED_FORM)
    assert_close(by_classes, naive, CLOSED_FORM)


def _mean(group: np.ndarray) -> np.ndarray:
    return group.mean(0) if len(group) else np.zeros(group.shape[1])


@settings(max_examples=20, deadline=None)
@given(problems(max_behaviors=1, label_noise=False, balanced=True), st.integers(5, 150),
       BETAS, bounded(0.01, 2.0), SEEDS)
def test_balanced_first_step_is_half_the_mean_gap(problem, half_n, beta, lr, seed):
    data = sample(problem, 2 * half_n, seed, dtype=torch.float64)
    x, s = data.features.numpy(), data.signs.numpy()
    expected = lr * beta / 2 * (x[s > 0].mean(0) - x[s < 0].mean(0))
    assert_close(first_step(data.features, data.signs, beta=beta, lr=lr), expected, CLOSED_FORM)


@settings(max_examples=25, deadline=None)
@given(problems(families=("gaussian", "laplace")), BETAS)
def test_initial_loss_slope_is_the_derivative_of_the_population_loss(problem, beta):
    """One population step of size η: ``(L_i(Δ_1) − L_i(0))/η − slope_i`` lies in
    ``[0, ηβ⁴λ_i‖m‖²/8]`` (Taylor with ``0 ⪯ ∇²L_i ⪯ (β²/4)S_i`` and ``Δ_1 = ηβm``)."""
    mix = population_mixture(problem)
    lr = 1e-5
    traj = population_descent(mix, beta=beta, lr=lr, steps=1, reference=w0_for(problem.dim),
                              qmc_points=256)  # QMC only enters the rewards/* metrics
    loss = traj.per_behavior["loss"]
    assert_close(loss[0], math.log(2), CLOSED_FORM)
    quotient = (loss[1] - loss[0]) / lr
    slope = initial_loss_slope(mix, beta=beta)
    m = mix.signed_mean()
    lam = np.array([np.linalg.eigvalsh(mix.second_moment(i))[-1]
                    for i in range(mix.num_behaviors)])
    remainder = lr * beta**4 * lam * (m @ m) / 8
    assert_leq(slope, quotient, FINITE_DIFFERENCE, scale=1.0)
    assert_leq(quotient, slope + remainder, FINITE_DIFFERENCE, scale=1.0)
    # and the closed form −(β²/2)⟨m_i, m⟩ itself
    expected = [-(beta**2) / 2 * mix.signed_mean(i) @ m for i in range(mix.num_behaviors)]
    assert_close(slope, expected, CLOSED_FORM)


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("delta, sigma, beta", [(1.0, 1.0, 1.0), (3.0, 0.5, 0.2),
                                                (0.4, 2.0, 4.0)])
def test_initial_loss_slope_of_one_balanced_behavior(delta, sigma, beta, eps):
    problem = Problem((isotropic("b", 3, delta, sigma=sigma, direction=[1, 2, 2],
                                 center=[0.3, 0, -1]),), label_noise=eps)
    slope = initial_loss_slope(population_mixture(problem), beta=beta)
    # label noise shrinks m = E[s g] by (1 − 2ε)
    assert_close(slope, [-(beta**2) / 8 * (1 - 2 * eps) ** 2 * delta**2], CLOSED_FORM)


# ------------------------------------------------------------------ the drift


@settings(max_examples=15, deadline=None)
@given(st.data(), problems(families=("gaussian", "laplace"), max_dim=4, max_behaviors=2), BETAS)
def test_drift_matches_quadrature_of_the_stein_formula(data, problem, beta):
    delta = data.draw(deltas_within_spread(problem, beta))
    mix = population_mixture(problem)
    flow = PopulationFlow(mix, beta=beta, reference=w0_for(problem.dim))
    drift = flow.drift(torch.as_tensor(delta)).numpy()
    assert_close(drift, stein_drift_by_quad(mix, delta, beta), QUADRATURE)


@settings(max_examples=6, deadline=None)
@given(problems(families=("gaussian", "laplace"), max_dim=4), BETAS,
       st.integers(0, 1000).map(lambda i: i + 1))
def test_drift_matches_monte_carlo(problem, beta, seed):
    rng = np.random.default_rng(seed)
    delta = rng.uniform(-1, 1, problem.dim) / beta
    _check_drift_by_monte_carlo(problem, delta, beta, seed, QUADRATURE)


def _check_drift_by_monte_carlo(problem, delta, beta, seed, rule_tolerance):
    """``F(Δ) = 2β E[σ(−β s Δᵀg) s g]`` by brute force on 100k draws (error bar z·sd/√n)."""
    n = 100_000
    data = sample(problem, n, seed, dtype=torch.float64)
    x, s = data.features.numpy(), data.signs.numpy()
    terms = 2 * beta * sigmoid(-beta * s * (x @ delta))[:, None] * s[:, None] * x  # (n, d)
    flow = PopulationFlow(population_mixture(problem), beta=beta, reference=w0_for(problem.dim))
    drift = flow.drift(torch.as_tensor(delta)).numpy()
    tol = mc_tolerance(terms.std(0), n) + rule_tolerance * (1 + np.abs(terms.mean(0)))
    assert_close(drift, terms.mean(0), 1.0, scale=tol)


def test_uniform_drift_matches_monte_carlo_when_covariance_is_isotropic():
    problem = Problem((isotropic("b", 3, 2.0, sigma=0.7, direction=[1, 1, 0],
                                 center=[0.5, 0, 0], pos_fraction=0.4),),
                      family="uniform", label_noise=0.1)
    _check_drift_by_monte_carlo(problem, np.array([0.8, -0.5, 1.1]), 1.3, 5, QMC)


def test_uniform_drift_matches_monte_carlo_for_correlated_covariance():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 3))
    cov = a @ a.T + 0.1 * np.eye(3)
    problem = Problem((Behavior("b", [1.0, 0.5, 0.0], [-1.0, 0.0, 0.3], cov, cov),),
                      family="uniform")
    _check_drift_by_monte_carlo(problem, np.array([0.7, -0.4, 0.9]), 1.0, 3, QMC)


@settings(max_examples=40, deadline=None)
@given(problems(), st.integers(5, 200), BETAS, SEEDS, st.data())
def test_drift_tanh_identity_on_a_sample(problem, n, beta, seed, data):
    """Lemma 1: ``2β E[σ(−βsΔᵀg) s g] = βm − βE[tanh(βΔᵀg/2) g]`` on the empirical measure,
    with the label-free term of norm ≤ (β²λ/2)‖Δ‖."""
    # every behavior needs a statement (the sampler refuses otherwise): at least one per
    # behavior's share of n, the smallest weight's share being ≥ 0.2 / (0.2 + 2·1)
    n = max(n, 12 * len(problem.behaviors))
    delta = data.draw(vectors(problem.dim, -2, 2))
    batch = sample_batch(problem, n, [seed], dtype=torch.float64)
    x, s = batch.features[0].numpy(), batch.signs[0].numpy()
    result = simulate_sample(batch, seeds=[seed], beta=beta, lr=1.0, steps=1, delta0=delta,
                             reference=w0_for(problem.dim), keep_deltas=True)
    step = (result.deltas[1, 0, 0] - result.deltas[0, 0, 0]).numpy()  # = F(Δ) at lr = 1
    m = (s[:, None] * x).mean(0)
    label_free = (np.tanh(beta * (x @ delta) / 2)[:, None] * x).mean(0)
    by_tanh = beta * m - beta * label_free
    by_sigmoid = (2 * beta * sigmoid(-beta * s * (x @ delta))[:, None] * s[:, None] * x).mean(0)
    scale = 1 + np.linalg.norm(delta) + np.abs(by_sigmoid)
    assert_close(by_tanh, by_sigmoid, CLOSED_FORM, scale=scale)
    assert_close(step, by_sigmoid, CLOSED_FORM, scale=scale)
    lam = np.linalg.eigvalsh(x.T @ x / n)[-1]
    assert_leq(np.linalg.norm(beta * label_free), beta**2 * lam / 2 * np.linalg.norm(delta))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5).flatmap(lambda d: st.tuples(vectors(d, -1.5, 1.5), covariances(d))),
       BETAS)
def test_drift_vanishes_at_the_well_specified_optimum(gap_and_cov, beta):
    """docs/theory.md, Prop. 4's example: one balanced, centred, noise-free Gaussian
    behavior with shared Σ has log-odds dᵀΣ⁻¹g, so F(Σ⁻¹d/β) = 0."""
    gap, cov = gap_and_cov
    problem = Problem((Behavior("b", gap / 2, -gap / 2, cov, cov),))
    optimum = np.linalg.solve(cov, gap) / beta
    assume(beta * math.sqrt(optimum @ cov @ optimum) <= QUADRATURE_SPREAD)
    flow = PopulationFlow(population_mixture(problem), beta=beta, reference=w0_for(len(gap)),
                          qmc_points=256)
    drift = flow.drift(torch.as_tensor(optimum)).numpy()
    assert_close(drift, np.zeros_like(gap), QUADRATURE, scale=1 + np.linalg.norm(gap))


# ------------------------------------------------------------------ metrics


@pytest.mark.parametrize("vocab", [2, 5])
@pytest.mark.parametrize("family", ["gaussian", "laplace", "uniform"])
def test_population_metrics_many_equal_one_at_a_time(family, vocab):
    """The batched evaluation (chunks of a few Δ, rows of different quadrature
    rules in one chunk) gives each Δ's metrics as evaluating it alone does (two answers
    on a scale mixture: one-dimensional expectations; otherwise QMC points)."""
    problem = Problem((isotropic("a", 3, 2.0), isotropic("b", 3, 1.0, direction=[0, 1, 0])),
                      family=family)
    flow = PopulationFlow(population_mixture(problem), beta=1.5,
                          reference=reference_weights(3, vocab_size=vocab, seed=3), qmc_points=512)
    scales = np.r_[0.0, np.geomspace(0.1, 30.0, 12)]  # spreads from 0 to ~45: several levels
    deltas = np.random.default_rng(1).standard_normal((len(scales), 3)) * scales[:, None]
    levels = {flow._level(float(np.sqrt(max(d @ c @ d for c in flow.mixture.covs))))
              for d in deltas}
    assert len(levels) >= 3
    chunk = 3 * len(flow.mixture.weights) * flow.qmc_points  # three Δ a chunk
    many, changes = flow.metrics_many(torch.as_tensor(deltas), chunk_elements=chunk)
    for e, delta in enumerate(deltas):
        one, change = flow.metrics(torch.as_tensor(delta))
        for name, value in one.items():
            assert_close(many[name][e], value, CLOSED_FORM, err_msg=f"{name} at row {e}")
        assert_close(changes[e], change, CLOSED_FORM)
    empty, none = flow.metrics_many(torch.zeros(0, 3, dtype=torch.float64))
    assert none.shape == (0,) and all(v.shape == (0, 2) for v in empty.values())


@settings(max_examples=15, deadline=None)
@given(st.data(), problems(families=("gaussian", "laplace"), max_dim=4, max_behaviors=2), BETAS)
def test_population_metrics_match_quadrature(data, problem, beta):
    delta = data.draw(deltas_within_spread(problem, beta))
    mix = population_mixture(problem)
    w0 = w0_for(problem.dim, seed=2)
    u0 = w0[0] - w0[1]
    flow = PopulationFlow(mix, beta=beta, reference=w0)
    metrics, weight_change = flow.metrics(torch.as_tensor(delta))
    loss, margin = [], []
    reward_acc, ranking_acc = [], []
    for s, mu, cov in zip(mix.signs, mix.means, mix.covs):
        m, v = beta * s * (delta @ mu), beta**2 * (delta @ cov @ delta)
        loss.append(quad_expect(lambda z: softplus(-z), mix.family, m, v))
        margin.append(beta * s * (delta @ mu))  # β E[h]
        reward_acc.append(quad_expect(lambda z: 1.0, mix.family, m, v, lower=0.0))
        policy = u0 + delta
        ranking_acc.append(quad_expect(lambda z: 1.0, mix.family, s * (policy @ mu),
                                       policy @ cov @ policy, lower=0.0))
    assert_close(metrics["loss"], per_behavior(mix, np.array(loss)), QUADRATURE)
    assert_close(metrics["rewards/margins"], per_behavior(mix, np.array(margin)), CLOSED_FORM)
    assert_close(weight_change, np.linalg.norm(delta) / math.sqrt(2), CLOSED_FORM)
    assert_close(metrics["reward_accuracy"], per_behavior(mix, np.array(reward_acc)), QUADRATURE)
    assert_close(metrics["accuracy"], per_behavior(mix, np.array(ranking_acc)), QUADRATURE)


@pytest.mark.parametrize("vocab", [2, 4])
@pytest.mark.parametrize("family", ["gaussian", "laplace", "uniform"])
def test_reward_metrics_match_monte_carlo_for_isotropic_classes(family, vocab):
    """``rewards/chosen`` and ``objective/kl`` need the full log-partition: the flow's
    (one-dimensional expectations for two answers on a scale mixture, QMC otherwise)
    vs brute force."""
    problem = Problem((isotropic("b", 3, 1.5, sigma=0.8, direction=[1, 0, 1]),
                       isotropic("c", 3, 1.0, sigma=0.5, direction=[0, 1, 0], center=[0, 0, 1])),
                      family=family, label_noise=0.1)
    _check_metrics_by_monte_carlo(problem, np.array([0.6, -0.3, 0.4]), beta=0.8, vocab=vocab)


@pytest.mark.parametrize("vocab", [2, 4])
def test_reward_metrics_match_monte_carlo_for_correlated_gaussian(vocab):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((3, 3))
    cov = a @ a.T + 0.1 * np.eye(3)
    problem = Problem((Behavior("b", [1.0, 0.5, 0.0], [-1.0, 0.0, 0.3], cov, cov),))
    _check_metrics_by_monte_carlo(problem, np.array([0.7, -0.4, 0.9]), beta=1.0, vocab=vocab)


def _two_answer_terms_by_grid(mix, u0, delta, nodes: int = 80):
    """Per component: the mean log-partition shift ``softplus(a + x) − softplus(a) − x/2``
    and ``KL = σ(a + x)·x − softplus(a + x) + softplus(a)`` of a two-answer policy, with
    ``a = u0ᵀg`` and ``x = Δᵀg`` integrated jointly on a tensor Gauss–Hermite grid over
    their bivariate Gaussian law (no regression identity, no projection rule)."""
    z, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    grid = np.stack(np.meshgrid(z, z, indexing="ij")).reshape(2, -1)  # (2, nodes²)
    weight = np.outer(w, w).ravel()
    pair = np.stack([u0, delta])  # (2, d): rows a, x
    shifts, kls = [], []
    for mu, cov in zip(mix.means, mix.covs):
        joint = pair @ cov @ pair.T
        vals, vecs = np.linalg.eigh(joint)
        a, x = (pair @ mu)[:, None] + (vecs * np.sqrt(np.clip(vals, 0, None))) @ grid
        u = a + x
        shifts.append(weight @ (softplus(u) - softplus(a) - x / 2))
        kls.append(weight @ (sigmoid(u) * x - softplus(u) + softplus(a)))
    return np.array(shifts), np.array(kls)


@pytest.mark.parametrize("moved", ["general", "back_to_zero_gap"])
def test_two_answer_kl_and_rewards_match_a_two_dimensional_grid(moved):
    """Two answers on a Gaussian: ``objective/kl`` and the rewards from the flow's
    one-dimensional expectations against a 2-D Gauss–Hermite grid over the joint law of
    the reference's and the change's logit gaps; and the policy whose gap is zero
    everywhere (``Δ = −u0``: ``sd_u = 0``)."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((3, 3))
    cov = a @ a.T / 3 + 0.2 * np.eye(3)
    problem = Problem((Behavior("b", [1.0, 0.5, 0.0], [-1.0, 0.0, 0.3], cov, 0.5 * cov),
                       isotropic("c", 3, 1.0, sigma=0.6, direction=[0, 1, 1])))
    mix = population_mixture(problem)
    beta = 0.7
    w0 = reference_weights(3, vocab_size=2, seed=5)
    u0 = w0[0] - w0[1]
    delta = np.array([0.8, -0.5, 0.3]) if moved == "general" else -u0
    flow = PopulationFlow(mix, beta=beta, reference=w0)
    assert flow.two_answers
    metrics, _ = flow.metrics(torch.as_tensor(delta))
    shift, kl = _two_answer_terms_by_grid(mix, u0, delta)
    margin = mix.signs * (mix.means @ delta)  # E[h] per component
    assert_close(metrics["objective/kl"], per_behavior(mix, kl), QUADRATURE)
    assert_close(metrics["rewards/chosen"], per_behavior(mix, beta * (margin / 2 - shift)),
                 QUADRATURE)
    assert_close(metrics["rewards/rejected"], per_behavior(mix, beta * (-margin / 2 - shift)),
                 QUADRATURE)
    assert float(metrics["objective/kl"].min()) > 0


def _check_metrics_by_monte_carlo(problem, delta, beta, vocab=4):
    """Flow metrics at ``Δ`` vs the mean over 200k draws (per-sample values computed
    naively from log-probabilities, and checked against the simulation's step 0)."""
    n = 200_000
    w0 = reference_weights(problem.dim, vocab_size=vocab, scale=1.0, seed=1)
    data = sample_batch(problem, n, [9], dtype=torch.float64)
    sim = simulate_sample(data, seeds=[9], beta=beta, lr=1.0, steps=1, delta0=delta,
                          reference=w0)
    flow = PopulationFlow(population_mixture(problem), beta=beta, reference=w0)
    metrics, _ = flow.metrics(torch.as_tensor(delta))
    x, s = data.features[0], data.signs[0]
    w = policy_weights(torch.as_tensor(w0), torch.as_tensor(delta))
    chosen, rejected = answer_logps(w, x, s)
    ref_chosen, ref_rejected = answer_logps(torch.as_tensor(w0), x, s)
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    per_sample = {
        "rewards/chosen": beta * (chosen - ref_chosen),
        "rewards/rejected": beta * (rejected - ref_rejected),
        "loss": torch.nn.functional.softplus(-beta * h),
        "reward_accuracy": (h > 0).double(),
        "accuracy": (chosen > rejected).double(),
    }
    logp = torch.log_softmax(x @ w.T, dim=-1)  # (n, V): KL(π ‖ π0) over the whole vocabulary
    per_sample["objective/kl"] = (logp.exp() * (logp - torch.log_softmax(
        x @ torch.as_tensor(w0).T, dim=-1))).sum(-1)
    for name, values in per_sample.items():
        for i in range(len(problem.behaviors)):
            rows = data.behavior == i
            estimate = values[rows].mean().item()
            assert_close(sim.per_behavior[name][0, 0, 0, i], estimate, CLOSED_FORM)
            tol = mc_tolerance(values[rows].std().item(), int(rows.sum())) + QMC
            assert_close(metrics[name][i], estimate, 1.0, scale=tol, err_msg=name)


# ------------------------------------------------------------------ priority


@settings(max_examples=40, deadline=None)
@given(problems())
def test_priority_scores_are_inner_products_with_the_mean_direction(problem):
    table = priority_scores(problem)
    w = np.array([b.weight for b in problem.behaviors])
    w = w / w.sum()
    d = [b.mu_pos - b.mu_neg for b in problem.behaviors]
    bbar = sum(wi * di for wi, di in zip(w, d))
    scores = [float(di @ bbar) for di in d]
    assert list(table["behavior"]) == problem.names
    assert_close(table["score"], scores, CLOSED_FORM)
    assert_close(table["distinguishability"], [np.linalg.norm(di) for di in d], CLOSED_FORM)
    norm = np.linalg.norm(bbar)
    assert_close(table["normalised"], np.array(scores) / norm if norm > 0 else 0.0, CLOSED_FORM)
    # the general rate ⟨m_i, m⟩ (class imbalance, common means and label noise
    # included) orders the behaviors: m_i = E_i[s g] from the parameters
    rates = [naive_signed_mean(problem, i) @ naive_signed_mean(problem)
             for i in range(len(problem.behaviors))]
    assert_close(table["rate"], rates, CLOSED_FORM)
    ranks = [1 + sum(other > rate for other in table["rate"]) for rate in table["rate"]]
    assert list(table["rank"]) == ranks


def test_orthogonal_behaviors_rank_by_weighted_distinguishability():
    made = behaviors_with_angles(3, [1.0, 3.0, 2.0], 0.0, weights=[1.0, 1.0, 2.0])
    table = priority_scores(Problem(tuple(made)))
    # ⟨d_i, b̄⟩ = w_i ‖d_i‖² for orthogonal d_i: 1/4, 9/4, 8/4; balanced and noise-free,
    # rate = ⟨m_i, m⟩ = score/4
    assert_close(table["score"], [0.25, 2.25, 2.0], CLOSED_FORM)
    assert_close(table["rate"], [0.25 / 4, 2.25 / 4, 2.0 / 4], CLOSED_FORM)
    assert list(table["rank"]) == [3, 1, 2]


# ------------------------------------------------------------------ wide margins, closed forms


@pytest.mark.parametrize("family", ["gaussian", "laplace"])
@pytest.mark.parametrize("spread", [10.0, QUADRATURE_SPREAD])
def test_quadrature_resolves_a_wide_logit_spread(family, spread):
    """Late in training on separable-looking data ``β·sd(Δᵀg)`` is large and σ(z)
    turns within a small fraction of a standard deviation."""
    problem = Problem((isotropic("b", 2, 1.0, sigma=1.0, center=[0.3, 0.0]),), family=family)
    mix = population_mixture(problem)
    delta = np.array([0.2, spread])
    flow = PopulationFlow(mix, beta=1.0, reference=w0_for(2), qmc_points=256)
    metrics, _ = flow.metrics(torch.as_tensor(delta))
    loss = [quad_expect(lambda z: softplus(-z), family, s * delta @ mu, delta @ cov @ delta)
            for s, mu, cov in zip(mix.signs, mix.means, mix.covs)]
    assert_close(metrics["loss"], per_behavior(mix, np.array(loss)), QUADRATURE)
    assert_close(flow.drift(torch.as_tensor(delta)).numpy(),
                 stein_drift_by_quad(mix, delta, 1.0), QUADRATURE)


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.3, 1.0, 4.0])
def test_laplace_reward_accuracy_is_the_laplace_cdf(ratio):
    """One class, Σ = I in d = 1, Δ = 1: the reward accuracy is P(g > 0) for a Laplace
    variable of mean ``ratio`` and variance 1, ``1 − ½exp(−√2·ratio)``."""
    behavior = Behavior("b", [ratio], [-ratio], [[1.0]], [[1.0]])
    mix = population_mixture(Problem((behavior,), family="laplace"))
    flow = PopulationFlow(mix, beta=1.0, reference=w0_for(1), qmc_points=256)
    metrics, _ = flow.metrics(torch.tensor([1.0], dtype=torch.float64))
    exact = 1 - 0.5 * math.exp(-math.sqrt(2) * ratio)
    assert_close(metrics["reward_accuracy"], [exact], CLOSED_FORM)
    assert_close(exact, quad_expect(lambda z: 1.0, "laplace", ratio, 1.0, lower=0.0), QUADRATURE)
