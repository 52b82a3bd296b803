"""Analytic population dynamics against finite-sample simulation (marked ``agreement``).

Population gradient descent with step ``lr`` is what float64 full-batch GD on
``n`` samples with the same ``lr`` tends to as ``n → ∞``. For each metric at
each recorded step the seed-to-seed spread ``sd`` is estimated from ``S``
seeds run in one batched call, and

* ``|mean over seeds − theory| ≤ Z·sd/√S`` at ``n`` and at ``16n``. (Training
  metrics of a finite sample also carry an O(1/n) bias, e.g. the optimism of a
  training loss, about d/(2n) for the loss; at these n it is below two error bars.)
* the seed-to-seed spread of the error shrinks like ``1/√n``: from ``n`` to ``16n``
  by a factor within [2, 8] (4 expected; with 32 seeds the ratio of two spread
  estimates is good to about ±20%).

Also: the continuous flow as the η → 0 limit of population GD (first order in η),
the flow's quadrature against brute-force Monte Carlo at a fixed Δ, and a
separable sample (‖Δ_k‖ ~ log k/(βγ)) against its population (finite optimum).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from conftest import QMC, Z_SCORE, assert_close, mc_tolerance
from dynamics import (
    PopulationFlow,
    population_descent,
    reference_weights,
    simulate,
    simulate_sample,
)
from synthetic import Behavior, Problem, isotropic, population_mixture, sample, sample_batch

pytestmark = pytest.mark.agreement

N_SMALL, SEEDS = 2000, list(range(32))
BETA, LR, STEPS, EVERY = 1.0, 0.1, 60, 20
CHECKED = ("loss", "accuracy", "reward_accuracy")


def correlated(dim: int, seed: int, scale: float = 0.5) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((dim, dim)) * scale
    return a @ a.T + 0.3 * np.eye(dim)


def two_behaviors(family: str, *, isotropic_classes: bool = False) -> Problem:
    if isotropic_classes:
        members = (isotropic("a", 4, 2.0, sigma=0.8, direction=[1, 1, 0, 0], pos_fraction=0.4),
                   isotropic("b", 4, 1.0, sigma=0.6, direction=[0, 0, 1, 0], center=[0, 0, 0, 1],
                             weight=0.5))
    else:
        members = (Behavior("a", [0.8, 0.4, 0, 0], [-0.6, 0, 0.2, 0], correlated(4, 1),
                            correlated(4, 2), pos_fraction=0.4),
                   Behavior("b", [0, 0, 0.5, 1], [0, 0, -0.5, 1], correlated(4, 3),
                            correlated(4, 3), weight=0.5))
    return Problem(members, family=family, label_noise=0.1)


def errors_against_theory(problem: Problem, n: int, theory) -> dict[str, np.ndarray]:
    """Per metric: simulation − theory, shape ``(E, S, K)`` (``(E, S, 1)`` for the weight)."""
    w0 = reference_weights(problem.dim, vocab_size=3, seed=0)
    sim = simulate(problem, n=n, seeds=SEEDS, beta=BETA, lr=LR, steps=STEPS, reference=w0,
                   dtype=torch.float64, eval_every=EVERY)
    assert np.array_equal(sim.steps, theory.steps)
    out = {name: sim.per_behavior[name][:, :, 0, :] - theory.per_behavior[name][:, None, :]
           for name in CHECKED}
    out["weight_change"] = (sim.weight_change[:, :, 0] - theory.weight_change[:, None])[..., None]
    return out


def check_agreement(problem: Problem, rule_tolerance: float = 0.0):
    w0 = reference_weights(problem.dim, vocab_size=3, seed=0)
    theory = population_descent(population_mixture(problem), beta=BETA, lr=LR, steps=STEPS,
                                reference=w0, eval_every=EVERY)
    small = errors_against_theory(problem, N_SMALL, theory)
    large = errors_against_theory(problem, 16 * N_SMALL, theory)
    for name in small:
        for errors in (small[name], large[name]):
            mean, sd = errors[1:].mean(1), errors[1:].std(1, ddof=1)  # skip step 0: exact
            tol = mc_tolerance(sd, len(SEEDS)) + rule_tolerance
            assert_close(mean, 0.0, 1.0, scale=tol, err_msg=name)
        spread_small = small[name][1:].std(1, ddof=1)
        spread_large = large[name][1:].std(1, ddof=1)
        assert np.all(spread_small > 2.0 / N_SMALL), name  # resolved beyond 1/n_i steps
        ratio = spread_small / spread_large
        assert np.all((ratio > 2.0) & (ratio < 8.0)), (name, ratio)


def test_gaussian_population_descent_matches_simulation():
    check_agreement(two_behaviors("gaussian"))


def test_laplace_population_descent_matches_simulation():
    """Exact flow through the Laplace scale mixture (heavier tails, same moments)."""
    check_agreement(two_behaviors("laplace"))


def test_uniform_population_descent_matches_simulation():
    """The uniform family's flow is quasi-Monte Carlo (QMC tolerance added)."""
    check_agreement(two_behaviors("uniform", isotropic_classes=True), rule_tolerance=QMC)


def test_uniform_population_descent_matches_simulation_for_correlated_classes():
    check_agreement(two_behaviors("uniform"), rule_tolerance=QMC)


def test_continuous_flow_is_the_small_step_limit():
    """Population GD with step η differs from the flow by O(η) at fixed t = 1:
    halving η halves the gap (ratio in [1.8, 2.2])."""
    problem = two_behaviors("gaussian")
    mix = population_mixture(problem)
    w0 = reference_weights(problem.dim, vocab_size=3, seed=0)
    t_end, gaps = 1.0, []
    for lr in (0.02, 0.01):
        steps = round(t_end / lr)
        common = dict(beta=BETA, lr=lr, steps=steps, reference=w0, eval_every=steps,
                      qmc_points=256)
        flow = population_descent(mix, continuous=True, **common)
        descent = population_descent(mix, **common)
        gaps.append({
            "delta": np.linalg.norm(flow.deltas[-1] - descent.deltas[-1]),
            "loss": np.abs(flow.per_behavior["loss"][-1] - descent.per_behavior["loss"][-1]).max(),
        })
        size = np.linalg.norm(flow.deltas[-1])
        assert gaps[-1]["delta"] <= 0.05 * size
    for key in ("delta", "loss"):
        assert 1.8 <= gaps[0][key] / gaps[1][key] <= 2.2, (key, gaps)


@pytest.mark.parametrize("family", ["gaussian", "laplace"])
def test_population_loss_by_quadrature_matches_monte_carlo(family):
    n = 1_000_000
    problem = two_behaviors(family)
    delta = np.array([0.9, -0.4, 0.6, 0.2])
    flow = PopulationFlow(population_mixture(problem), beta=BETA,
                          reference=reference_weights(4, vocab_size=3, seed=0), qmc_points=256)
    metrics, _ = flow.metrics(torch.as_tensor(delta))
    data = sample(problem, n, 12, dtype=torch.float64)
    h = data.signs * (data.features @ torch.as_tensor(delta))
    for name, values in (("loss", torch.nn.functional.softplus(-BETA * h)),
                         ("reward_accuracy", (h > 0).double())):
        for i in range(len(problem.behaviors)):
            rows = values[data.behavior == i]
            tol = mc_tolerance(rows.std().item(), len(rows), Z_SCORE)
            assert abs(metrics[name][i].item() - rows.mean().item()) <= tol, (name, i)
    assert math.isfinite(metrics["loss"].sum().item())


def max_margin(points: np.ndarray) -> float:
    """ℓ2 max-margin through the origin of ``points`` (rows s_j g_j): 1/‖w‖ for the
    hard-margin SVM ``min ‖w‖²/2 s.t. points @ w ≥ 1``."""
    result = minimize(lambda w: w @ w / 2, np.ones(points.shape[1]), jac=lambda w: w,
                      constraints=[{"type": "ineq", "fun": lambda w: points @ w - 1,
                                    "jac": lambda w: points}],
                      method="SLSQP", options={"ftol": 1e-14, "maxiter": 1000})
    assert result.success and np.all(points @ result.x >= 1 - 1e-8)
    return 1 / np.linalg.norm(result.x)


def test_separable_sample_diverges_while_the_population_converges():
    """docs/theory.md §7. A sample with n ≤ d is separable: GD's ‖Δ_k‖ grows like
    log k/(βγ) (Soudry et al. 2018), so each doubling of k adds log 2/(βγ). The
    population of the same problem has a finite optimum, here Σ⁻¹d/β (Prop. 4)."""
    gap = np.array([1.0, 0.5, 0, 0, 0, 0])
    cov = correlated(6, 4)
    problem = Problem((Behavior("b", gap / 2, -gap / 2, cov, cov),))
    beta = 1.0
    data = sample_batch(problem, 4, [1], dtype=torch.float64)
    x = data.features[0].numpy()
    gamma = max_margin(data.signs[0].numpy()[:, None] * x)
    lr = 1 / (beta**2 * np.linalg.eigvalsh(x.T @ x / len(x))[-1])  # below 4/(β²λ̂)
    sim = simulate_sample(data, seeds=[1], beta=beta, lr=lr, steps=8000, eval_every=1000,
                          reference=np.zeros((2, 6)))
    norms = sim.weight_change[[1, 2, 4, 8], 0, 0] * math.sqrt(2)  # k = 1000, 2000, 4000, 8000
    assert_close(np.diff(norms), math.log(2) / (beta * gamma), 0.05, scale=math.log(2) / gamma)

    optimum = np.linalg.solve(cov, gap) / beta
    lam = np.linalg.eigvalsh(population_mixture(problem).second_moment())[-1]
    theory = population_descent(population_mixture(problem), beta=beta, lr=1 / lam, steps=4000,
                                eval_every=2000, reference=np.zeros((2, 6)), qmc_points=256)
    assert_close(theory.deltas[-1], optimum, 1e-6, scale=np.linalg.norm(optimum))
    assert abs(np.linalg.norm(theory.deltas[-1]) - np.linalg.norm(theory.deltas[-2])) < 1e-6
