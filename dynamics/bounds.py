"""The three results of Im & Li (2024), in precise versions proved in docs/theory.md.

Everything rests on one exact identity for the DPO drift (docs/theory.md, Lemma 1):
with ``m = E[s g]`` (the *preference signal*; ``(μ⁺ − μ⁻)/2`` for one balanced
behavior) and any distribution of ``(g, s)``,

    F(Δ) = 2β E[σ(−β s Δᵀg) s g] = β m − β E[tanh(β Δᵀg / 2) g],

and the second term, which does not depend on the labels, has norm at most
``(β²λ/2)‖Δ‖`` with ``λ = λ_max(E[g gᵀ])``. Gradient descent with step ``η``
from ``Δ_0 = 0`` therefore satisfies, with ``a = ηβ²λ/2`` and ``b = ηβ‖m‖``,

    ‖Δ_k‖ ≤ B_k = b((1+a)^k − 1)/a,     ‖Δ_k − kηβ m‖ ≤ r_k = Σ_{j<k} a B_j,

(Theorem 1: the update rate is set by distinguishability). The loss and accuracy
bounds (Theorems 2 and 3) follow from this tube around the straight line
``kηβ m``. Every statement holds for *any* probability measure with finite
second moments: a problem's population (:func:`synthetic.population_mixture`)
or a training sample (:func:`synthetic.empirical_mixture`), so full-batch
simulation can be checked against them exactly, run by run. They are for DPO
started at the reference (``Δ_0 = 0``).

Shapes: ``E`` steps, ``K`` behaviors, ``C`` components, ``d`` dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from synthetic.families import get_family
from synthetic.mixture import Mixture, population_mixture
from synthetic.problem import Problem
from synthetic.validation import ParameterError, check_choice, check_integer, check_number

__all__ = [
    "Tube",
    "drift_tube",
    "weight_change_bound",
    "loss_envelope",
    "accuracy_lower_bound",
    "initial_loss_slope",
    "first_step",
    "priority_scores",
    "certified_order",
]


@dataclass(frozen=True)
class Tube:
    """``Δ_k`` lies in the ball of radius ``radius[k]`` around ``steps[k]·ηβ·m``
    and has norm at most ``norm[k]``. ``steps (E,)``, ``norm``/``radius (E,)``,
    ``signal`` is ``m`` ``(d,)``; ``t = lr·steps``."""

    steps: np.ndarray
    t: np.ndarray
    norm: np.ndarray
    radius: np.ndarray
    signal: np.ndarray
    beta: float
    lr: float

    def center(self) -> np.ndarray:
        """``t·β·m``, shape ``(E, d)``."""
        return self.t[:, None] * self.beta * self.signal[None, :]


def _lambda_max(matrix: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(matrix)[-1])


def drift_tube(mixture: Mixture, *, beta: float, lr: float, steps: int,
               continuous: bool = False) -> Tube:
    """Theorem 1's tube for steps ``0..steps`` (or for the flow at ``t = lr·k``).

    Discrete: ``B_k = min(b((1+a)^k − 1)/a, 2ηβk·√λ)`` and
    ``r_k = min(Σ_{j<k} a B_j, kb + B_k)``; continuous: ``B(t) = (b'/a')(e^{a't} − 1)``
    with ``a' = β²λ/2``, ``b' = β‖m‖`` and ``r(t) = ∫_0^t a' B``.
    """
    beta = check_number("beta", beta, gt=0)
    lr = check_number("lr", lr, gt=0)
    steps = check_integer("steps", steps, ge=0)
    m = mixture.signed_mean()
    second = mixture.second_moment()
    lam = _lambda_max(second)
    k = np.arange(steps + 1, dtype=np.float64)
    t = lr * k
    if continuous:
        a, b = beta**2 * lam / 2, beta * np.linalg.norm(m)
        # Clip the exponent: past e^700 the min with the linear bound below decides.
        # expm1(700)/a overflows to inf for a tiny a; with no signal (b = 0) the tube
        # is the point 0, not 0·inf = NaN.
        with np.errstate(over="ignore"):
            growth = np.expm1(np.minimum(a * t, 700.0)) / a if a > 0 else t
        norm = b * growth if b > 0 else np.zeros_like(t)
        radius = b * (growth - t) if a > 0 and b > 0 else np.zeros_like(t)
        norm = np.minimum(norm, 2 * beta * t * np.sqrt(lam))
        return Tube(k.astype(np.int64), t, norm, np.minimum(radius, b * t + norm), m, beta, lr)
    a, b = lr * beta**2 * lam / 2, lr * beta * np.linalg.norm(m)
    geometric = b * np.expm1(np.minimum(k * np.log1p(a), 700.0)) / a if a > 0 else b * k
    norm = np.minimum(geometric, 2 * lr * beta * k * np.sqrt(lam))
    radius = np.r_[0.0, np.cumsum(a * norm[:-1])]
    radius = np.minimum(radius, b * k + norm)
    return Tube(k.astype(np.int64), t, norm, radius, m, beta, lr)


def weight_change_bound(mixture: Mixture, **kwargs) -> np.ndarray:
    """Upper bound on ``‖W_k − W_0‖_F = ‖Δ_k‖/√2``, shape ``(steps+1,)``."""
    return drift_tube(mixture, **kwargs).norm / np.sqrt(2)


def loss_envelope(mixture: Mixture, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Theorem 2: per-behavior DPO loss ``L_i(Δ_k)`` lies in ``[lower, upper]``.

    With ``m_i = E_i[s g]``, ``S_i = E_i[g gᵀ]``, ``λ_i = λ_max(S_i)``:

        L_i(Δ_k) ∈ log 2 − (t β²/2)⟨m_i, m⟩ + [−(β/2)‖m_i‖ r_k,
                                               (β/2)‖m_i‖ r_k + (β²λ_i/8) B_k²],

    clipped below at 0. Both ``(E, K)``.
    """
    tube = drift_tube(mixture, **kwargs)
    beta = tube.beta
    rows_lo, rows_hi = [], []
    for i in range(mixture.num_behaviors):
        m_i = mixture.signed_mean(i)
        lam_i = _lambda_max(mixture.second_moment(i))
        center = np.log(2) - tube.t * beta**2 / 2 * float(m_i @ tube.signal)
        slack = beta / 2 * np.linalg.norm(m_i) * tube.radius
        rows_lo.append(np.maximum(center - slack, 0.0))
        rows_hi.append(center + slack + beta**2 * lam_i / 8 * tube.norm**2)
    return np.stack(rows_lo, 1), np.stack(rows_hi, 1)


def accuracy_lower_bound(mixture: Mixture, *, reference_direction: np.ndarray | None = None,
                         kind: str | None = None, problem: Problem | None = None,
                         n: int | None = None, failure_probability: float = 0.05,
                         **kwargs) -> np.ndarray:
    """Theorem 3: a lower bound on per-behavior accuracy, shape ``(E, K)``.

    For the classifier ``v_k = u0 + Δ_k`` (ranking accuracy; ``u0`` is
    ``reference_direction``, default 0 = implicit-reward accuracy) and each
    component ``c``, the tube gives

        s_c v_kᵀμ_c ≥ M_c = s_c u0ᵀμ_c + t β s_c mᵀμ_c − r_k ‖μ_c‖,
        v_kᵀΣ_c v_k ≤ V_c = (√(u0ᵀΣ_c u0) + B_k √‖Σ_c‖_op)²,

    so ``P_c(s vᵀg > 0) ≥ M_c²/(M_c² + V_c)`` for ``M_c > 0`` (Cantelli: any
    distribution, ``kind="cantelli"``) or ``F(M_c/√V_c)`` with ``F`` the CDF of
    the family's standardised projection (``kind="family"``: Φ for gaussian,
    the Laplace CDF for laplace; the default for those families). Ties are not
    counted as correct, so the bound also holds for the tie-counts-half
    accuracies.

    ``kind="sample"`` (Theorem 3S) is for a training run: ``mixture`` is the
    empirical measure of a sample of size ``n`` drawn by :func:`synthetic.sample`
    from ``problem`` (a ``gaussian`` or ``laplace`` one), and the bound on the
    run's training accuracy holds at every step and for every behavior at once
    with probability at least ``1 − failure_probability`` over the sample. It
    replaces Cantelli's worst case by the family's projection law, paid for by a
    Dvoretzky–Kiefer–Wolfowitz term ``√(log(2/α_g)/(2n_g))`` per true class;
    see :func:`_sample_accuracy_bound`.
    """
    if kind == "sample":
        return _sample_accuracy_bound(mixture, problem, n, reference_direction,
                                      failure_probability, **kwargs)
    tube = drift_tube(mixture, **kwargs)
    family = mixture.family
    default = "family" if family in ("gaussian", "laplace") else "cantelli"
    kind = check_choice("kind", kind or default, ["family", "cantelli", "sample"])
    if kind == "family" and family not in ("gaussian", "laplace"):
        raise ParameterError("kind", kind, f"needs a Gaussian scale mixture, not {family!r}")
    u0 = np.zeros(mixture.dim) if reference_direction is None else np.asarray(
        reference_direction, dtype=np.float64)
    per_c = []
    for c in range(len(mixture.weights)):
        s, mu, cov = mixture.signs[c], mixture.means[c], mixture.covs[c]
        margin = (s * (u0 @ mu) + tube.t * tube.beta * s * (tube.signal @ mu)
                  - tube.radius * np.linalg.norm(mu))
        spread = (np.sqrt(max(u0 @ cov @ u0, 0.0))
                  + tube.norm * np.sqrt(max(_lambda_max(cov), 0.0))) ** 2
        positive = margin > 0
        if kind == "cantelli":
            bound = np.where(positive, margin**2 / np.maximum(margin**2 + spread, 1e-300), 0.0)
        else:
            z = margin / np.sqrt(np.maximum(spread, 1e-300))
            bound = np.where(positive, get_family(family).projection_cdf(z), 0.0)
        per_c.append(bound)
    per_c = np.stack(per_c, 1)  # (E, C)
    share = np.eye(mixture.num_behaviors)[mixture.behavior] * mixture.weights[:, None]
    return per_c @ (share / share.sum(0))


# Thresholds τ of Theorem 3S, in units of the largest projection sd of the line
# classifier: the bound holds for every τ at once, so the best on this grid is kept.
_TAU_GRID = np.logspace(-3, 1, 241)


def _sample_accuracy_bound(mixture: Mixture, problem: Problem | None, n: int | None,
                           reference_direction, failure_probability: float,
                           **kwargs) -> np.ndarray:
    """Theorem 3S (docs/theory.md §6): a high-probability bound on a run's training accuracy.

    For a behavior ``i`` at step ``k``, with ``v* = u0 + tβm`` (the *population* line),
    ``R = min(r̂_k + tβ‖m̂ − m‖, B̂_k + tβ‖m‖) ≥ ‖v_k − v*‖`` (Theorem 1 on the sample),
    ``ρ = R·max_{c∈i}‖μ̂_c‖`` and ``q = Σ_{c∈i} (n_c/n_i)‖Σ̂_c‖_op`` over the sample's
    components, every ``τ > 0`` gives

        accuracy_i ≥ 1 − Σ_g (n_g/n_i)(H_g(ρ + τ) + ε_g) − R² q / τ²,

    where ``g`` runs over the behavior's true classes (``n_g`` statements each),
    ``H_g`` is the CDF of ``s v*ᵀg`` in class ``g`` (label noise included) and
    ``ε_g = √(log(2/α_g)/(2n_g))``; ``α_g = α/(G·D)`` splits the failure probability
    ``α`` over the ``G`` true classes and the ``D`` distinct directions of ``v*`` (1 when
    ``u0 = 0``, else one per step).
    """
    from synthetic.sampling import _layout  # the sampler's own (behavior, class, count)

    if problem is None or n is None:
        raise ParameterError("kind", "sample", "needs the problem and the sample size n")
    failure_probability = check_number("failure_probability", failure_probability, gt=0, lt=1)
    family = get_family(problem.family)
    if problem.family not in ("gaussian", "laplace"):
        raise ParameterError("kind", "sample",
                             f"needs a Gaussian scale mixture, not {problem.family!r}")
    groups = _layout(problem, n)
    counts = np.array([count for _, _, count in groups], dtype=np.float64)
    per_behavior = np.bincount([i for i, _, _ in groups], weights=counts,
                               minlength=len(problem.names))
    if not np.allclose(mixture.behavior_weights(), per_behavior / n, rtol=0, atol=0.5 / n):
        raise ParameterError("n", n, "does not match the sample's behavior counts")
    population = population_mixture(problem)
    tube = drift_tube(mixture, **kwargs)
    t, beta = tube.t, tube.beta
    m = population.signed_mean()
    u0 = np.zeros(mixture.dim) if reference_direction is None else np.asarray(
        reference_direction, dtype=np.float64)
    line = u0[None, :] + (t * beta)[:, None] * m[None, :]  # v*, (E, d)
    radius = np.minimum(tube.radius + t * beta * np.linalg.norm(tube.signal - m),
                        tube.norm + t * beta * np.linalg.norm(m))
    directions = 1 if not np.any(u0) else len(t)
    eps = np.sqrt(np.log(2 * len(groups) * directions / failure_probability) / (2 * counts))
    sd = np.sqrt(np.maximum(np.einsum("ed,cdf,ef->ec", line, population.covs, line), 0.0))
    unit = np.where(sd.max(1) > 0, sd.max(1), 1.0)  # (E,); where v* = 0 the bound is 0
    tau = unit[:, None] * _TAU_GRID[None, :]  # (E, T)
    bounds = np.zeros((len(t), len(problem.names)))
    for i in range(bounds.shape[1]):
        own = mixture.behavior == i
        share = mixture.weights[own] / mixture.weights[own].sum()  # n_c'/n_i
        shift = radius * max(np.linalg.norm(mu) for mu in mixture.means[own])  # ρ
        spread = share @ np.array([_lambda_max(cov) for cov in mixture.covs[own]])  # q
        cdf = np.zeros_like(tau)
        slack = 0.0
        for g, (behavior, true_sign, count) in enumerate(groups):
            if behavior != i:
                continue
            slack += count / per_behavior[i] * eps[g]
            members = np.flatnonzero((population.behavior == i)
                                     & (population.true_signs == true_sign))
            weight = population.weights[members] / population.weights[members].sum()
            for c, w in zip(members, weight):
                mean = population.signs[c] * (line @ population.means[c])  # (E,)
                x = shift[:, None] + tau - mean[:, None]
                scale = sd[:, c][:, None]
                with np.errstate(divide="ignore", invalid="ignore"):
                    law = np.where(scale > 0, family.projection_cdf(x / scale), x >= 0)
                cdf += count / per_behavior[i] * w * law
        chebyshev = radius[:, None] ** 2 * spread / tau**2
        best = (1.0 - cdf - slack - chebyshev).max(1)
        bounds[:, i] = np.where(sd.max(1) > 0, np.maximum(best, 0.0), 0.0)
    return bounds


def initial_loss_slope(mixture: Mixture, *, beta: float) -> np.ndarray:
    """``dL_i/dt`` at ``t = 0`` for each behavior: ``−(β²/2)⟨m_i, m⟩``, shape ``(K,)``.

    One balanced behavior: ``−(β²/8)‖μ⁺ − μ⁻‖²``; several balanced ones:
    ``−(β²/8)⟨d_i, b̄⟩`` with ``b̄ = Σ_j w_j d_j``.
    """
    beta = check_number("beta", beta, gt=0)
    m = mixture.signed_mean()
    return np.array([-(beta**2) / 2 * float(mixture.signed_mean(i) @ m)
                     for i in range(mixture.num_behaviors)])


def first_step(features, signs, *, beta: float, lr: float) -> np.ndarray:
    """The exact first DPO step from the reference: ``Δ_1 = ηβ m̂ = ηβ mean_j s_j g_j``
    (``= (ηβ/2)(μ̂⁺ − μ̂⁻)`` for balanced classes). ``features (n, d)`` → ``(d,)``."""
    beta = check_number("beta", beta, gt=0)
    lr = check_number("lr", lr, gt=0)
    x = np.asarray(features.detach().cpu() if hasattr(features, "detach") else features,
                   dtype=np.float64)
    s = np.asarray(signs.detach().cpu() if hasattr(signs, "detach") else signs, dtype=np.float64)
    return lr * beta * (s @ x) / len(s)


def priority_scores(problem: Problem) -> pd.DataFrame:
    """Predicted learning order (THEORY §2): one row per behavior.

    ``score = ⟨d_i, b̄⟩`` with ``b̄ = Σ_j w_j d_j`` and ``normalised =
    ⟨b̄, d_i⟩/‖b̄‖`` (Im & Li's code) are the balanced-class forms; ``rate =
    ⟨m_i, m⟩`` with ``m_i = E_i[s g]``, ``m = E[s g]`` is the general one
    (``dL_i/dt(0) = −(β²/2)·rate``, see :func:`initial_loss_slope`), which also
    accounts for class imbalance, a common mean and label noise; it equals
    ``w``-weighted ``score/4`` for balanced, noise-free behaviors. ``rank``
    (1 = learned first) orders by ``rate``.
    """
    d = problem.directions
    bbar = problem.weights @ d
    score = d @ bbar
    norm = np.linalg.norm(bbar)
    mixture = population_mixture(problem)
    m = mixture.signed_mean()
    rate = np.array([mixture.signed_mean(i) @ m for i in range(len(problem.behaviors))])
    frame = pd.DataFrame({
        "behavior": problem.names,
        "distinguishability": np.linalg.norm(d, axis=1),
        "score": score,
        "normalised": score / norm if norm > 0 else np.zeros_like(score),
        "rate": rate,
    })
    frame["rank"] = frame["rate"].rank(ascending=False, method="min").astype(int)
    return frame


def certified_order(lower: np.ndarray, upper: np.ndarray, names) -> pd.DataFrame:
    """Pairs ``(ahead, behind)`` and the steps at which Theorem 2 certifies that
    ``ahead``'s loss is below ``behind``'s (``upper_ahead < lower_behind``).

    ``lower``/``upper`` from :func:`loss_envelope`, ``(E, K)``. Columns: ahead,
    behind, first_step, last_step, steps (count); pairs never certified omitted.
    """
    rows = []
    for i, ahead in enumerate(names):
        for j, behind in enumerate(names):
            if i == j:
                continue
            certified = np.flatnonzero(upper[:, i] < lower[:, j])
            if certified.size:
                rows.append(dict(ahead=ahead, behind=behind, first_step=int(certified[0]),
                                 last_step=int(certified[-1]), steps=int(certified.size)))
    return pd.DataFrame(rows, columns=["ahead", "behind", "first_step", "last_step", "steps"])
