"""Corrections to docs/theory.md from an independent check (issue 11).

* Proposition 4 needs more than a density: it needs, for some component, mass on the
  wrong side of every hyperplane through 0 (``P_c(s_c vᵀg < 0) > 0`` for every
  ``v ≠ 0``). A density suffices only when the support is unbounded in every
  direction (Gaussian, Laplace); the bounded ``uniform`` family can make the population
  separable through the origin, and then the population loss has no minimiser.
* Corollary 1: the *position* error from the line ``tβm`` is ``O(t²)``, the *direction*
  error (the angle between ``Δ(t)`` and ``m``) only ``O(t)``, and that order is attained.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from conftest import CLOSED_FORM, EXACT_CONSTRUCTION, QUADRATURE, assert_close, assert_leq
from dynamics import population_descent
from synthetic import Problem, diagonal, isotropic, population_mixture, sample

# --------------------------------------------------------------------------- Proposition 4

SEP_DIM, SEP_DELTA, SEP_BETA = 2, 6.0, 1.0
SEP_LR = 0.3  # below the monotone-descent threshold 4/(β²λ) = 0.4 (λ = δ²/4 + σ² = 10)
# Gaussian population GD after 64k steps: measured 6 − 7e-4 against Δ* = 6 and a loss
# within 1e-8 of its minimum; these leave an order of magnitude.
CONVERGED_DELTA = 1e-2  # relative distance to Δ*
CONVERGED_LOSS = 1e-4  # relative excess over the minimum


def _separable_problem(family: str) -> Problem:
    return Problem((isotropic("b", SEP_DIM, SEP_DELTA, sigma=1.0),), family=family)


def test_uniform_population_is_separable_through_the_origin():
    """Every component of the uniform family lives on the parallelepiped
    ``μ_c + √3·L_c·[−1, 1]^d`` (``L_c L_cᵀ = Σ_c``), where
    ``min s_c vᵀg = s_c vᵀμ_c − √3‖L_cᵀv‖₁ ≥ s_c vᵀμ_c − √(3d·vᵀΣ_c v)`` whatever the
    square root ``L_c``. For δ = 6, σ = 1, d = 2 and ``v = μ⁺ − μ⁻`` the right-hand side
    is ``δ²/2 − δ√6 > 0`` for both classes: every point has ``s vᵀg > 0``."""
    mix = population_mixture(_separable_problem("uniform"))
    v = mix.means[mix.signs > 0][0] - mix.means[mix.signs < 0][0]
    for s, mu, cov in zip(mix.signs, mix.means, mix.covs):
        worst = s * v @ mu - math.sqrt(3 * SEP_DIM * v @ cov @ v)
        assert_close(worst, SEP_DELTA**2 / 2 - SEP_DELTA * math.sqrt(6), CLOSED_FORM)
        assert worst > 0
    data = sample(_separable_problem("uniform"), 4000, 0)
    margins = data.signs.double().numpy() * (data.features.double().numpy() @ v)
    assert margins.min() >= SEP_DELTA**2 / 2 - SEP_DELTA * math.sqrt(6)
    # the same moments under the Gaussian family put mass on the wrong side of every v
    gaussian = population_mixture(_separable_problem("gaussian"))
    assert np.all(np.linalg.eigvalsh(gaussian.covs) > 0)


@pytest.fixture(scope="module")
def separable_runs():
    reference = np.zeros((2, SEP_DIM))
    uniform = population_descent(population_mixture(_separable_problem("uniform")),
                                 beta=SEP_BETA, lr=SEP_LR, steps=2000, eval_every=500,
                                 reference=reference, qmc_points=4096)
    gaussian = population_descent(population_mixture(_separable_problem("gaussian")),
                                  beta=SEP_BETA, lr=SEP_LR, steps=64_000, eval_every=16_000,
                                  reference=reference)
    return uniform, gaussian


def test_separable_population_descent_has_no_limit_while_the_gaussian_plateaus(separable_runs):
    """Uniform: ‖Δ‖ keeps growing from step k to 4k and the loss falls like 1/k, below
    the Gaussian's minimum. Gaussian (Proposition 4 applies): the loss stays above its
    minimum ``L* = E softplus(−6|…|)`` and Δ converges to the closed-form minimiser
    ``Δ* = Σ⁻¹(μ⁺ − μ⁻)/β = 6e₁`` (§7, example)."""
    uniform, gaussian = separable_runs
    # L* = E softplus(−β s Δ*ᵀg) with s Δ*ᵀg = 6 g₁ and g₁ ~ N(3, 1) (both classes alike)
    best = integrate.quad(lambda x: np.logaddexp(0.0, -SEP_DELTA * x)
                          * stats.norm.pdf(x, SEP_DELTA / 2, 1.0), -12, 18)[0]
    u_norm = np.linalg.norm(uniform.deltas, axis=1)  # steps 0, 500, 1000, 1500, 2000
    u_loss = uniform.per_behavior["loss"][:, 0]
    assert np.all(np.diff(u_norm) > 0)
    # Soudry et al.: ‖Δ_k‖ ≈ log k / (βγ) with γ ≤ the largest support margin 3 + √3
    assert u_norm[4] - u_norm[1] >= 0.5 * math.log(4) / (SEP_DELTA / 2 + math.sqrt(3))
    assert u_loss[4] <= u_loss[1] / 3  # ~ 1/k: towards 0
    assert u_loss[4] <= best / 3  # the Gaussian can never get there

    g_norm = np.linalg.norm(gaussian.deltas, axis=1)  # steps 0, 16k, 32k, 48k, 64k
    g_loss = gaussian.per_behavior["loss"][:, 0]
    assert_leq(best, g_loss, QUADRATURE)
    assert_leq(g_norm, SEP_DELTA / SEP_BETA, EXACT_CONSTRUCTION)
    star = np.r_[SEP_DELTA / SEP_BETA, np.zeros(SEP_DIM - 1)]
    assert np.linalg.norm(gaussian.deltas[-1] - star) <= CONVERGED_DELTA * np.linalg.norm(star)
    assert g_loss[-1] - best <= CONVERGED_LOSS * best


# --------------------------------------------------------------------------- Corollary 1

DIR_BETA, DIR_LR = 1.0, 1e-4
# The next Taylor term is O(β²λt) relative to the leading one (λ = 4.27 here); at
# t ≤ 0.1 it was measured at 1–3.5% (angle ratio 1.98, position ratio 3.87, slope 0.98
# of its leading value), so the ratios 2 and 4 and the slope are checked to 5%.
TAYLOR = 0.05


def test_direction_error_is_first_order_in_t():
    """With an anisotropic Σ whose top eigenvector is not m, the angle between Δ(t) and m
    is ``(β²t/4)‖(Sm)_⊥‖/‖m‖ + O(t²)`` (from ``T(Δ) = (β/2)SΔ + O(‖Δ‖³)`` in Lemma 1):
    halving t halves it (ratio ≈ 2, not 4), while the position error ‖Δ − tβm‖ is
    second order (ratio ≈ 4)."""
    problem = Problem((diagonal("b", [0.5, 0.5], [-0.5, -0.5], [1.0, 4.0]),))
    mix = population_mixture(problem)
    m, second = mix.signed_mean(), mix.second_moment()
    across = second @ m - (second @ m @ m) / (m @ m) * m
    slope = DIR_BETA**2 / 4 * np.linalg.norm(across) / np.linalg.norm(m)
    steps = 1000  # t = 0.1
    traj = population_descent(mix, beta=DIR_BETA, lr=DIR_LR, steps=steps, continuous=True,
                              eval_every=steps // 2, reference=np.zeros((2, 2)))
    half, full = traj.deltas[1], traj.deltas[2]
    t = DIR_LR * np.array([steps // 2, steps])

    def angle(delta):
        return math.acos(min(1.0, delta @ m / np.linalg.norm(delta) / np.linalg.norm(m)))

    angles = np.array([angle(half), angle(full)])
    position = np.linalg.norm(np.stack([half, full]) - t[:, None] * DIR_BETA * m, axis=1)
    assert angles[1] / angles[0] == pytest.approx(2.0, rel=TAYLOR)
    assert position[1] / position[0] == pytest.approx(4.0, rel=TAYLOR)
    assert_close(angles / t, slope, TAYLOR, scale=slope)  # the leading term
