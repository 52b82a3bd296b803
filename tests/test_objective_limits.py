"""Each objective's limit or closed form (issue 10's table), on the population flow
and on the simulation:

* cdpo with ε = 0 is DPO;
* robust DPO's expected gradient on labels flipped with probability ε is DPO's on
  clean labels (the population drift on a problem with ``label_noise = ε``);
* IPO's flow is linear: the closed-form trajectory and minimiser;
* the hinge's kink enters the flow exactly (its closed-form moments against
  adaptive quadrature split at the kink), and its population loss is 1 at the start;
* the Bradley–Terry reward model is DPO with β = 1 on the same data;
* binary discrimination converges to the Bayes classifier of a Gaussian problem;
* SFT with V = 2 is logistic regression with the offset ``u0ᵀg``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import integrate

from conftest import CLOSED_FORM, QUADRATURE, assert_close
from dynamics import population_descent, reference_weights, simulate, simulate_sample
from dynamics.analytic import PopulationFlow
from dynamics.model import NO, YES
from dynamics.objectives import OBJECTIVES
from synthetic import Behavior, Problem, get_family, isotropic, population_mixture, sample_batch


def problem(family="gaussian", noise=0.0) -> Problem:
    cov = np.array([[0.7, 0.2, 0.0], [0.2, 0.5, 0.1], [0.0, 0.1, 0.9]])
    return Problem((
        Behavior("a", [0.8, 0.1, -0.2], [-0.4, 0.3, 0.1], cov, 0.6 * np.eye(3), pos_fraction=0.45),
        isotropic("b", 3, 1.5, sigma=0.7, direction=[0, 0, 1], weight=0.6),
    ), family=family, label_noise=noise)


W0 = reference_weights(3, vocab_size=3, seed=5)


@pytest.mark.parametrize("family", ["gaussian", "laplace"])
def test_cdpo_with_zero_epsilon_is_dpo(family):
    mix = population_mixture(problem(family))
    common = dict(beta=0.8, lr=0.2, steps=30, reference=W0, eval_every=10)
    dpo = population_descent(mix, objective="dpo", **common)
    cdpo = population_descent(mix, objective={"name": "cdpo", "epsilon": 0.0}, **common)
    assert_close(cdpo.deltas, dpo.deltas, CLOSED_FORM)
    for m in dpo.per_behavior:
        assert_close(cdpo.per_behavior[m], dpo.per_behavior[m], CLOSED_FORM, err_msg=m)
    data = sample_batch(problem(family), 200, [0, 1], dtype=torch.float64)
    a = simulate_sample(data, seeds=[0, 1], objective="dpo", **common)
    b = simulate_sample(data, seeds=[0, 1], objective={"name": "cdpo", "epsilon": 0.0}, **common)
    assert_close(b.final, a.final, CLOSED_FORM)


@pytest.mark.parametrize("family", ["gaussian", "laplace"])
@pytest.mark.parametrize("epsilon", [0.1, 0.3])
def test_robust_dpo_on_noisy_labels_has_dpos_clean_gradient(family, epsilon):
    clean = PopulationFlow(population_mixture(problem(family)), beta=0.9, reference=W0)
    noisy = PopulationFlow(population_mixture(problem(family, noise=epsilon)), beta=0.9,
                           reference=W0, objective={"name": "robust_dpo", "epsilon": epsilon})
    rng = np.random.default_rng(1)
    for delta in (np.zeros(3), *rng.normal(size=(3, 3))):
        assert_close(noisy.drift(delta), clean.drift(delta), QUADRATURE)
    # cDPO is not unbiased: on noisy labels its drift is that of cDPO with
    # ε' = 2ε(1 − ε) on clean labels (docs/theory.md, Proposition 7), not DPO's
    cdpo = PopulationFlow(population_mixture(problem(family, noise=epsilon)), beta=0.9,
                          reference=W0, objective={"name": "cdpo", "epsilon": epsilon})
    shifted = PopulationFlow(population_mixture(problem(family)), beta=0.9, reference=W0,
                             objective={"name": "cdpo", "epsilon": 2 * epsilon * (1 - epsilon)})
    for delta in (np.zeros(3), np.ones(3)):
        assert_close(cdpo.drift(delta), shifted.drift(delta), QUADRATURE)
    gap = (cdpo.drift(np.ones(3)) - clean.drift(np.ones(3))).numpy()
    assert np.abs(gap).max() > 1e-3


def ipo_moments(mix):
    """``M = Σ_c π_c (Σ_c + μ_cμ_cᵀ)`` and ``m̄ = Σ_c π_c s_c μ_c`` (THEORY §3.1)."""
    return mix.second_moment(), mix.signed_mean()


@pytest.mark.parametrize("family", ["gaussian", "laplace", "uniform"])
def test_ipo_flow_is_linear_with_closed_form_trajectory(family):
    mix = population_mixture(problem(family))
    beta, lr, steps = 0.5, 0.1, 50
    big_m, mbar = ipo_moments(mix)
    tau = 1 / (2 * beta)
    star = np.linalg.solve(big_m, tau * mbar)  # the minimiser M Δ* = τ m̄
    step = np.eye(3) - 4 * lr * big_m
    expected = np.stack([star - np.linalg.matrix_power(step, k) @ star for k in range(steps + 1)])
    got = population_descent(mix, beta=beta, lr=lr, steps=steps, reference=W0, objective="ipo")
    tol = CLOSED_FORM if family != "uniform" else 1e-3  # uniform: QMC drift
    assert_close(got.deltas, expected, tol)
    # population loss Δᵀ M Δ − 2τ Δᵀm̄ + τ² at the minimiser, weighted over behaviors
    loss = got.per_behavior["loss"] @ mix.behavior_weights()
    final = expected[-1]
    assert_close(loss[-1], final @ big_m @ final - 2 * tau * final @ mbar + tau**2,
                 QUADRATURE if family != "uniform" else 1e-3)
    long = population_descent(mix, beta=beta, lr=lr, steps=2000, reference=W0, objective="ipo",
                              eval_every=2000)
    assert_close(long.deltas[-1], star, 1e-8 if family != "uniform" else 1e-3)


@pytest.mark.parametrize("family", ["gaussian", "laplace"])
def test_hinge_moments_are_exact_at_the_kink(family):
    """Closed forms against adaptive quadrature split at the kink ``h = 1/β``."""
    fam = get_family(family)
    obj = OBJECTIVES["hinge"]
    for beta, mean, sd in [(1.0, 0.3, 0.7), (2.0, 0.5, 0.1), (0.5, -1.0, 3.0), (3.0, 1.0, 0.05)]:
        loss, first, second = obj.moments(np.array([mean]), np.array([sd]), beta, fam)
        kink = (1 / beta - mean) / sd
        pdf = fam.projection_pdf
        e_loss = sum(integrate.quad(lambda y: max(0.0, 1 - beta * (mean + sd * y)) * pdf(y),
                                    a, b, limit=200)[0]
                     for a, b in ((-np.inf, kink), (kink, np.inf)))
        e_first = -beta * integrate.quad(pdf, -np.inf, kink)[0]
        assert_close(loss[0], e_loss, QUADRATURE)
        assert_close(first[0], e_first, QUADRATURE)
        # Stein: E[ℓ'(h)(h − m)] = sd² E[w ℓ''(h)], the derivative-free form of the same term
        stein = sum(integrate.quad(lambda y: float(obj.grad(np.array(mean + sd * y), beta))
                                   * sd * y * pdf(y), a, b, limit=200)[0]
                    for a, b in ((-np.inf, kink), (kink, np.inf)))
        assert_close(second[0] * sd**2, stein, QUADRATURE)


@pytest.mark.parametrize("family", ["gaussian", "laplace"])
def test_hinge_population_loss_is_one_at_the_start_and_flow_is_exact(family):
    mix = population_mixture(problem(family))
    flow = PopulationFlow(mix, beta=1.3, reference=W0, objective="hinge")
    assert_close(flow.metrics(np.zeros(3))[0]["loss"], np.ones(2), CLOSED_FORM)
    # the drift against brute-force adaptive quadrature of E[ℓ'(h) s g] by Stein, per component
    delta = np.array([0.4, -0.3, 0.8])
    want = np.zeros(3)
    fam = get_family(family)
    for pi, s, mu, cov in zip(mix.weights, mix.signs, mix.means, mix.covs):
        m, sd = s * delta @ mu, np.sqrt(delta @ cov @ delta)
        kink = (1 / 1.3 - m) / sd
        f = lambda y: float(OBJECTIVES["hinge"].grad(np.array(m + sd * y), 1.3))  # noqa: E731
        parts = ((-np.inf, kink), (kink, np.inf))
        e1 = sum(integrate.quad(lambda y: f(y) * fam.projection_pdf(y), a, b)[0] for a, b in parts)
        ey = sum(integrate.quad(lambda y: f(y) * y * fam.projection_pdf(y), a, b)[0]
                 for a, b in parts)
        # h = m + s·sd·Y and E[g | Y] = μ + Σδ Y/sd (elliptical), so by the symmetry of Y
        # E[ℓ'(h) g] = μ E[ℓ'] + s Σδ E[ℓ'(m + sd·Y) Y]/sd; the drift is −2 Σ π s E[ℓ'(h) g]
        want += -2 * pi * s * (mu * e1 + s * (cov @ delta) * ey / sd)
    assert_close(flow.drift(delta), want, QUADRATURE)


@pytest.mark.parametrize("family", ["gaussian", "laplace", "uniform"])
def test_reward_model_is_dpo_with_beta_one(family):
    mix = population_mixture(problem(family))
    common = dict(lr=0.3, steps=40, reference=W0, eval_every=10)
    dpo = population_descent(mix, beta=1.0, objective="dpo", **common)
    rm = population_descent(mix, beta=7.0, objective="reward_model", **common)  # β unused
    assert_close(rm.deltas, dpo.deltas, CLOSED_FORM)
    for m in ("loss", "reward_accuracy", "rewards/margins"):
        assert_close(rm.per_behavior[m], dpo.per_behavior[m], CLOSED_FORM, err_msg=m)
    data = sample_batch(problem(family), 300, [2], dtype=torch.float64)
    a = simulate_sample(data, seeds=[2], beta=1.0, objective="dpo", **common)
    b = simulate_sample(data, seeds=[2], beta=3.0, objective="reward_model", **common)
    assert_close(b.final, a.final, CLOSED_FORM)
    assert_close(b.per_behavior["loss"], a.per_behavior["loss"], CLOSED_FORM)


def test_binary_discrimination_converges_to_the_bayes_classifier():
    """Symmetric Gaussian classes ``N(±μ, Σ)``, balanced: the log-odds of the true
    class are ``2μᵀΣ⁻¹g``, so each row of the head is a well-specified logistic
    regression: ``φ_Yes → Σ⁻¹(μ⁺ − μ⁻)`` and ``φ_No → −Σ⁻¹(μ⁺ − μ⁻)``."""
    mu = np.array([0.5, -0.3, 0.2])
    cov = np.array([[0.8, 0.3, 0.0], [0.3, 0.6, 0.1], [0.0, 0.1, 0.5]])
    sym = Problem((Behavior("a", mu, -mu, cov, cov),))
    bayes = np.linalg.solve(cov, 2 * mu)
    run = population_descent(population_mixture(sym), beta=1.0, lr=1.0, steps=3000,
                             reference=W0, objective="binary", eval_every=3000)
    assert_close(run.deltas[-1], np.stack([bayes, -bayes]), 1e-6)
    # its reward accuracy is then the Bayes accuracy Φ(‖Σ^{-1/2}(μ⁺ − μ⁻)‖/2)
    from scipy.stats import norm

    bayes_acc = norm.cdf(np.sqrt(2 * mu @ bayes) / 2)
    assert_close(run.per_behavior["reward_accuracy"][-1], [bayes_acc], 1e-6)


def test_sft_with_two_answers_is_logistic_regression_with_offset():
    """V = 2: ``−log π(y_w) = softplus(−s (u0 + Δ)ᵀg)``, each row moving half of Δ."""
    w0 = reference_weights(3, vocab_size=2, seed=8)
    data = sample_batch(problem(), 120, [4], dtype=torch.float64)
    lr, steps = 0.5, 25
    sim = simulate_sample(data, seeds=[4], beta=1.0, lr=lr, steps=steps, reference=w0,
                          objective="sft")
    d = sim.final[0, 0]  # (V, d)
    assert_close(d[YES], -d[NO], CLOSED_FORM)
    g, s = data.features[0], data.signs[0]
    u0 = torch.as_tensor(w0[YES] - w0[NO])
    delta = torch.zeros(3, dtype=torch.float64)
    for _ in range(steps):  # plain gradient descent on u = w_Yes − w_No: twice a row's step
        p = torch.sigmoid(-s * ((u0 + delta) @ g.T))
        delta = delta + 2 * lr * (p * s) @ g / len(s)
    assert_close(d[YES] - d[NO], delta, CLOSED_FORM)
    # and the population flow of SFT with V = 2 is DPO's logistic flow started at u0
    mix = population_mixture(problem())
    sft = population_descent(mix, beta=1.0, lr=lr, steps=10, reference=w0, objective="sft",
                             qmc_points=2**14)
    flow = PopulationFlow(mix, beta=1.0, reference=np.zeros((2, 3)), objective="reward_model")
    psi = np.array(w0[YES] - w0[NO])
    for _ in range(10):
        psi = psi + lr * flow.drift(psi).numpy()
    got = sft.deltas[-1]
    assert_close(got[YES] - got[NO], psi - (w0[YES] - w0[NO]), 1e-3)  # QMC in d = 3


def test_sft_moves_every_row_with_more_answers():
    out = simulate(problem(), n=200, seeds=[0], beta=1.0, lr=0.5, steps=5, reference=W0,
                   objective="sft", dtype=torch.float64)
    final = out.final[0, 0]
    assert final.shape == (3, 3) and float(final[2].norm()) > 0  # a row not Yes or No moved
    assert_close(final.sum(0), np.zeros(3), CLOSED_FORM)  # softmax gradients sum to zero
