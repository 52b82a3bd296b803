"""The bounds of dynamics/bounds.py hold on every run, and are not vacuous.

Soundness: Theorems 1–3 hold for *any* probability measure, so a full-batch
float64 simulation must satisfy them exactly (up to rounding, BOUND_SLACK)
when they are computed on the empirical mixture of its own sample, step by
step; population gradient descent must satisfy them on the population mixture.

Non-vacuity, on a stated family: one balanced isotropic Gaussian behavior
centred at 0 in d = 4 with δ = 3, σ = 1 (δ/σ = 3), β = 1, lr = 0.01 and a
horizon of 400 steps (t = 4, by which the population loss has fallen from
log 2 to ≈ 0.2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from conftest import BOUND_SLACK, CLOSED_FORM, QMC, Z_SCORE, assert_close, assert_leq
from dynamics import (
    NO,
    YES,
    accuracy_lower_bound,
    certified_order,
    drift_tube,
    loss_envelope,
    population_descent,
    reference_weights,
    simulate_sample,
    weight_change_bound,
)
from strategies import bounded, problems
from synthetic import (
    ParameterError,
    Problem,
    behaviors_with_angles,
    empirical_mixture,
    isotropic,
    population_mixture,
    sample,
    sample_batch,
)

STEPS = 30


def step_size(mix, beta: float, factor: float) -> float:
    """``factor / (β² λ_max(E[g gᵀ]))``: factor < 4 keeps GD on the logistic loss stable."""
    return factor / (beta**2 * np.linalg.eigvalsh(mix.second_moment())[-1])


def check_all_bounds(mix, deltas, metrics, weight_change, *, beta, lr, u0, tol=BOUND_SLACK):
    """Every bound at every step ``0..STEPS`` for one trajectory.

    deltas (E, d) · metrics[name] (E, K) · weight_change (E,), on ``mix``.
    """
    kw = dict(beta=beta, lr=lr, steps=len(deltas) - 1)
    tube = drift_tube(mix, **kw)
    center = tube.center()
    norms = np.linalg.norm(deltas, axis=1)
    assert_leq(norms, tube.norm, tol, err_msg="‖Δ_k‖ ≤ B_k")
    size = 1 + np.linalg.norm(center, axis=1) + tube.norm
    assert_leq(np.linalg.norm(deltas - center, axis=1), tube.radius, tol, scale=size,
               err_msg="‖Δ_k − kηβm‖ ≤ r_k")
    assert_leq(weight_change, weight_change_bound(mix, **kw), tol, err_msg="‖W − W0‖")
    assert_close(weight_change, norms / math.sqrt(2), CLOSED_FORM)
    lower, upper = loss_envelope(mix, **kw)
    assert_leq(lower, metrics["loss"], tol, err_msg="loss ≥ lower")
    assert_leq(metrics["loss"], upper, tol, err_msg="loss ≤ upper")
    ranking = accuracy_lower_bound(mix, reference_direction=u0, **kw)
    assert_leq(ranking, metrics["accuracy"], tol, err_msg="ranking accuracy")
    reward = accuracy_lower_bound(mix, **kw)
    assert_leq(reward, metrics["reward_accuracy"], tol, err_msg="reward accuracy")
    if mix.family in ("gaussian", "laplace"):  # the family-CDF bound needs a scale mixture
        cantelli = accuracy_lower_bound(mix, kind="cantelli", **kw)
        assert_leq(cantelli, reward, tol, err_msg="Cantelli ≤ family kind")
        assert_leq(cantelli, metrics["reward_accuracy"], tol, err_msg="Cantelli")
    return lower, upper


# --------------------------------------------------------------------------- soundness


@settings(max_examples=80, deadline=None)
@given(problems(max_dim=5), st.integers(30, 200), bounded(0.2, 3.0), bounded(0.05, 1.5),
       st.integers(0, 2**30))
def test_full_batch_simulation_never_leaves_the_bounds(problem, n, beta, factor, seed):
    seeds = [seed, seed + 1]
    data = sample_batch(problem, n, seeds, dtype=torch.float64)
    w0 = reference_weights(problem.dim, vocab_size=3, seed=seed % 7)
    lr = step_size(population_mixture(problem), beta, factor)
    result = simulate_sample(data, seeds=seeds, beta=beta, lr=lr, steps=STEPS, reference=w0,
                             keep_deltas=True)
    for si in range(len(seeds)):
        mix = empirical_mixture(data.features[si], data.signs[si], data.behavior, data.names)
        metrics = {k: v[:, si, 0] for k, v in result.per_behavior.items()}
        check_all_bounds(mix, result.deltas[:, si, 0].numpy(), metrics,
                         result.weight_change[:, si, 0], beta=beta, lr=lr, u0=w0[YES] - w0[NO])


@settings(max_examples=25, deadline=None)
@given(problems(max_dim=4), bounded(0.2, 3.0), bounded(0.05, 1.5), st.integers(0, 6))
def test_population_descent_never_leaves_the_bounds(problem, beta, factor, init_seed):
    mix = population_mixture(problem)
    w0 = reference_weights(problem.dim, vocab_size=3, seed=init_seed)
    lr = step_size(mix, beta, factor)
    traj = population_descent(mix, beta=beta, lr=lr, steps=STEPS, reference=w0,
                              qmc_points=4096)
    # the uniform family's flow integrates over QMC points, whose moments are the
    # population's only to QMC accuracy
    tol = QMC if problem.family == "uniform" else BOUND_SLACK
    lower, upper = check_all_bounds(mix, traj.deltas, traj.per_behavior, traj.weight_change,
                                    beta=beta, lr=lr, u0=w0[YES] - w0[NO], tol=tol)
    _check_certified_pairs(lower, upper, problem.names, traj.per_behavior["loss"])


def _check_certified_pairs(lower, upper, names, loss):
    """``certified_order`` against a naive scan, and every certified pair true in ``loss``."""
    table = certified_order(lower, upper, names)
    expected = []
    for i in range(len(names)):
        for j in range(len(names)):
            steps = [k for k in range(len(lower)) if i != j and upper[k, i] < lower[k, j]]
            if steps:
                expected.append((names[i], names[j], steps[0], steps[-1], len(steps)))
                assert all(loss[k, i] < loss[k, j] for k in steps), (names[i], names[j])
    assert [tuple(row) for row in table.itertuples(index=False)] == expected


@settings(max_examples=10, deadline=None)
@given(problems(families=("gaussian", "laplace"), max_dim=3), bounded(0.2, 3.0),
       bounded(0.05, 1.5))
def test_continuous_flow_stays_inside_the_continuous_tube(problem, beta, factor):
    mix = population_mixture(problem)
    lr = step_size(mix, beta, factor)
    traj = population_descent(mix, beta=beta, lr=lr, steps=STEPS, reference=np.zeros((2, mix.dim)),
                              continuous=True, qmc_points=256)
    tube = drift_tube(mix, beta=beta, lr=lr, steps=STEPS, continuous=True)
    assert_leq(np.linalg.norm(traj.deltas, axis=1), tube.norm)
    size = 1 + np.linalg.norm(tube.center(), axis=1) + tube.norm
    assert_leq(np.linalg.norm(traj.deltas - tube.center(), axis=1), tube.radius, scale=size)


def test_tube_formulas_written_out():
    """B_k = min(b((1+a)^k − 1)/a, 2ηβk√λ) and r_k = min(Σ_{j<k} a B_j, kb + B_k)."""
    problem = Problem((isotropic("b", 3, 2.0, sigma=0.5, center=[0, 1, 0]),), label_noise=0.1)
    mix = population_mixture(problem)
    beta, lr, steps = 0.7, 0.05, 20
    tube = drift_tube(mix, beta=beta, lr=lr, steps=steps)
    m = 0.8 * np.array([1.0, 0, 0])  # (1 − 2ε) d / 2
    second = np.diag([0.25 + 1.0, 0.25 + 1.0, 0.25])  # Σ + mean outer products
    lam = 1.25
    a, b = lr * beta**2 * lam / 2, lr * beta * np.linalg.norm(m)
    norm = [min(b * ((1 + a) ** k - 1) / a, 2 * lr * beta * k * math.sqrt(lam))
            for k in range(steps + 1)]
    radius = [min(sum(a * norm[j] for j in range(k)), k * b + norm[k]) for k in range(steps + 1)]
    assert_close(mix.second_moment(), second, CLOSED_FORM)
    assert_close(tube.signal, m, CLOSED_FORM)
    assert_close(tube.norm, norm, CLOSED_FORM)
    assert_close(tube.radius, radius, CLOSED_FORM)
    assert_close(tube.center(), np.outer(lr * np.arange(steps + 1) * beta, m), CLOSED_FORM)


# --------------------------------------------------------------------------- non-vacuity

NV_LR, NV_STEPS, NV_BETA = 0.01, 400, 1.0
EARLY = NV_STEPS // 10  # the first 10% of the horizon


@pytest.fixture(scope="module")
def stated_family():
    problem = Problem((isotropic("b", 4, 3.0, sigma=1.0),))
    mix = population_mixture(problem)
    w0 = reference_weights(4, vocab_size=3, seed=0)
    traj = population_descent(mix, beta=NV_BETA, lr=NV_LR, steps=NV_STEPS, reference=w0)
    return problem, mix, traj


def test_reward_accuracy_bound_is_informative_early(stated_family):
    _, mix, traj = stated_family
    bound = accuracy_lower_bound(mix, kind="family", beta=NV_BETA, lr=NV_LR,
                                 steps=NV_STEPS)[:, 0]
    actual = traj.per_behavior["reward_accuracy"][:, 0]
    # by symmetry Δ stays along d, so the population reward accuracy is Φ(δ/2σ) = Φ(1.5)
    assert_close(actual[1:], stats.norm.cdf(1.5), CLOSED_FORM)
    early = slice(1, 11)  # steps 1..10, t ≤ 0.1
    assert np.all(bound[early] >= 0.8)
    assert np.all(actual[early] - bound[early] <= 0.05)
    assert_close(bound[1], actual[1], CLOSED_FORM)  # tight at step 1: r_1 = 0, B_1 = ‖Δ_1‖


def test_weight_change_bound_is_tight_at_step_one(stated_family):
    problem, mix, traj = stated_family
    bound = weight_change_bound(mix, beta=NV_BETA, lr=NV_LR, steps=NV_STEPS)
    assert_close(bound[1], traj.weight_change[1], CLOSED_FORM)
    assert_close(bound[1], NV_LR * NV_BETA * 3.0 / 2 / math.sqrt(2), CLOSED_FORM)
    ratio = bound[1:EARLY + 1] / traj.weight_change[1:EARLY + 1]
    assert np.all(ratio >= 1 - BOUND_SLACK) and np.all(ratio <= 2.0)
    # also on a finite sample, through its empirical mixture
    data = sample_batch(problem, 400, [0], dtype=torch.float64)
    sim = simulate_sample(data, seeds=[0], beta=NV_BETA, lr=NV_LR, steps=EARLY,
                          reference=np.zeros((2, 4)))
    emp = empirical_mixture(data.features[0], data.signs[0], data.behavior, data.names)
    emp_bound = weight_change_bound(emp, beta=NV_BETA, lr=NV_LR, steps=EARLY)
    assert_close(emp_bound[1], sim.weight_change[1, 0, 0], CLOSED_FORM)
    assert np.all(emp_bound[1:] <= 2.0 * sim.weight_change[1:, 0, 0])


def test_loss_envelope_is_narrow_early(stated_family):
    _, mix, traj = stated_family
    lower, upper = loss_envelope(mix, beta=NV_BETA, lr=NV_LR, steps=NV_STEPS)
    decrease = math.log(2) - traj.per_behavior["loss"][:, 0]
    width = (upper - lower)[:, 0]
    early = slice(1, 6)  # t ≤ 0.05
    assert np.all(width[early] <= 0.01)
    assert np.all(width[early] <= 0.15 * decrease[early])


def test_certified_order_puts_the_more_distinguishable_behavior_first():
    made = behaviors_with_angles(4, [3.0, 1.0], 0.0, names=["strong", "weak"])
    problem = Problem(tuple(made))
    mix = population_mixture(problem)
    kw = dict(beta=NV_BETA, lr=NV_LR, steps=NV_STEPS)
    lower, upper = loss_envelope(mix, **kw)
    table = certified_order(lower, upper, problem.names)
    assert list(zip(table["ahead"], table["behind"])) == [("strong", "weak")]
    assert table["first_step"].iloc[0] <= 5
    assert table["steps"].iloc[0] >= EARLY
    traj = population_descent(mix, reference=reference_weights(4, vocab_size=3), **kw)
    _check_certified_pairs(lower, upper, problem.names, traj.per_behavior["loss"])
    # and on a sample: certified from the empirical mixture, true in the simulation
    data = sample(problem, 400, 3, dtype=torch.float64)
    emp = empirical_mixture(data.features, data.signs, data.behavior, data.names)
    batch = sample_batch(problem, 400, [3], dtype=torch.float64)
    sim = simulate_sample(batch, seeds=[3], reference=np.zeros((2, 4)), **kw)
    lo_s, hi_s = loss_envelope(emp, **kw)
    assert len(certified_order(lo_s, hi_s, problem.names)) >= 1
    _check_certified_pairs(lo_s, hi_s, problem.names, sim.per_behavior["loss"][:, 0, 0])


def test_bounds_refuse_the_family_kind_without_a_projection_law():
    mix = population_mixture(Problem((isotropic("b", 2, 1.0),), family="uniform"))
    with pytest.raises(ParameterError, match="kind"):
        accuracy_lower_bound(mix, kind="family", beta=1.0, lr=0.1, steps=3)


@pytest.mark.parametrize("continuous", [False, True])
def test_tube_stays_finite_over_long_horizons(continuous):
    """(1+a)^k overflows float64 after ~700/log1p(a) steps; the linear bound then
    decides, with no overflow warning (warnings are errors in dynamics.*)."""
    mixture = population_mixture(Problem((isotropic("b", 4, 2.0, sigma=0.5),)))
    tube = drift_tube(mixture, beta=1.0, lr=0.5, steps=20_000, continuous=continuous)
    assert np.all(np.isfinite(tube.norm)) and np.all(np.isfinite(tube.radius))
    lam = np.linalg.eigvalsh(mixture.second_moment())[-1]
    linear = 2 * 0.5 * 1.0 * tube.steps[-1] * np.sqrt(lam)
    assert tube.norm[-1] == pytest.approx(linear, rel=CLOSED_FORM)


def test_continuous_tube_without_signal_is_a_point_not_nan():
    """Regression (issue 11): with m = 0 the flow's tube is {0}. For a tiny β the rate
    a = β²λ/2 is so small that expm1(700)/a overflows to inf once a·t > 700, and the
    old ``b·inf`` with b = 0 was NaN. A tiny but nonzero signal must stay finite too."""
    beta, lr, steps = 1e-8, 1e18, 50  # a·t reaches β²λ/2 · 5e19 ≈ 2500 > 700
    silent = population_mixture(Problem((isotropic("b", 3, 0.0, sigma=1.0),)))
    assert np.all(silent.signed_mean() == 0)
    tube = drift_tube(silent, beta=beta, lr=lr, steps=steps, continuous=True)
    assert np.all(tube.norm == 0) and np.all(tube.radius == 0)
    faint = population_mixture(Problem((isotropic("b", 3, 1e-300, sigma=1.0),)))
    assert np.any(faint.signed_mean() != 0)
    for continuous in (False, True):
        tube = drift_tube(faint, beta=beta, lr=lr, steps=steps, continuous=continuous)
        assert np.all(np.isfinite(tube.norm)) and np.all(np.isfinite(tube.radius))
        assert np.all(tube.norm >= 0) and np.all(tube.radius >= 0)


# --------------------------------------------------------------------------- Theorem 3S

SAMPLE_SEEDS = 200  # runs per case of the violation-frequency check


@pytest.mark.parametrize("family, noise, behaviors, reference, failure", [
    ("gaussian", 0.0, 1, False, 0.05),
    ("gaussian", 0.0, 1, True, 0.5),
    ("laplace", 0.1, 2, False, 0.5),
    ("laplace", 0.0, 2, True, 0.05),
])
def test_sample_accuracy_bound_fails_at_most_its_probability(family, noise, behaviors,
                                                              reference, failure):
    """Theorem 3S holds with probability ≥ 1 − failure over the sample: across independent
    samples, the share of runs in which any step or behavior falls below it is at most
    ``failure`` (binomial tolerance Z_SCORE·sd)."""
    made = behaviors_with_angles(4, [2.0, 1.5][:behaviors], 0.0, names=["a", "b"][:behaviors])
    problem = Problem(tuple(made), family=family, label_noise=noise)
    n, beta = 1000, 1.0
    lr = step_size(population_mixture(problem), beta, 0.5)
    seeds = list(range(SAMPLE_SEEDS))
    data = sample_batch(problem, n, seeds, dtype=torch.float64)
    w0 = reference_weights(4, vocab_size=2, seed=1) if reference else np.zeros((2, 4))
    u0 = w0[YES] - w0[NO]
    result = simulate_sample(data, seeds=seeds, beta=beta, lr=lr, steps=STEPS, reference=w0)
    metric = "accuracy" if reference else "reward_accuracy"
    violated, informative = 0, 0
    for si in range(len(seeds)):
        mix = empirical_mixture(data.features[si], data.signs[si], data.behavior, data.names)
        bound = accuracy_lower_bound(mix, kind="sample", problem=problem, n=n,
                                     reference_direction=u0 if reference else None,
                                     failure_probability=failure, beta=beta, lr=lr,
                                     steps=STEPS)
        actual = result.per_behavior[metric][:, si, 0, :]
        violated += bool(np.any(actual < bound - BOUND_SLACK))
        informative += bool(np.any(bound[1:] > 0))
    allowed = SAMPLE_SEEDS * failure + Z_SCORE * math.sqrt(SAMPLE_SEEDS * failure * (1 - failure))
    assert violated <= allowed
    assert informative == SAMPLE_SEEDS  # not passed by a bound of 0 after step 0


def test_sample_accuracy_bound_is_informative_where_cantelli_is_not():
    """The README's figure-4 regime (d = 16, σ = 1, n = 2000, β = 1, lr = 0.02): with
    δ = 2 the per-sample Cantelli bound on the implicit-reward accuracy stays below 0.5
    (it can pass 0.5 only when ‖d̂‖ > 2√‖Σ̂_c‖, here ≈ 2.25), while Theorem 3S passes it
    with probability 0.95 and still holds in each run."""
    problem = Problem((isotropic("b", 16, 2.0, sigma=1.0),))
    n, seeds, kw = 2000, [0, 1, 2, 3], dict(beta=1.0, lr=0.02, steps=20)
    data = sample_batch(problem, n, seeds, dtype=torch.float64)
    result = simulate_sample(data, seeds=seeds, reference=np.zeros((2, 16)), **kw)
    for si in range(len(seeds)):
        mix = empirical_mixture(data.features[si], data.signs[si], data.behavior, data.names)
        cantelli = accuracy_lower_bound(mix, kind="cantelli", **kw)[:, 0]
        ours = accuracy_lower_bound(mix, kind="sample", problem=problem, n=n, **kw)[:, 0]
        assert cantelli.max() < 0.5 < ours.max()
        assert_leq(ours, result.per_behavior["reward_accuracy"][:, si, 0, 0])


def test_sample_accuracy_bound_refuses_what_it_cannot_bound():
    gaussian = Problem((isotropic("b", 2, 1.0),))
    data = sample(gaussian, 50, 0, dtype=torch.float64)
    mix = empirical_mixture(data.features, data.signs, data.behavior, data.names)
    kw = dict(kind="sample", beta=1.0, lr=0.1, steps=3)
    with pytest.raises(ParameterError, match="kind"):
        accuracy_lower_bound(mix, **kw)  # no problem or n
    with pytest.raises(ParameterError, match="kind"):
        accuracy_lower_bound(mix, problem=Problem((isotropic("b", 2, 1.0),), family="uniform"),
                             n=50, **kw)
    two = Problem(tuple(behaviors_with_angles(2, [1.0, 1.0], 0.0, names=["a", "b"])))
    with pytest.raises(ParameterError, match="n"):
        accuracy_lower_bound(mix, problem=two, n=50, **kw)  # not the sample's layout
