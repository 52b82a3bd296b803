"""Principle-driven labels (AI feedback; Self-Align, Sun et al. 2023).

Instead of the true preference, a judge labels each statement by a few written
principles. In the last-layer model a principle is a direction ``p`` in feature
space: the judge scores a statement ``g`` of behavior ``i`` by ``pᵀ(g − c_i)``,
``c_i = (μ_i⁺ + μ_i⁻)/2`` the behavior's centre, and prefers Yes when the score is
positive. With ``k`` principles ``p_i1 … p_ik`` the label is

* ``vote``: the majority of the ``k`` signs, a tie broken by the sign of the summed
  scores;
* ``sum``: the sign of the summed scores (one principle ``Σ_j p_ij``).

The embedding keeps its true class, so the label's quality ``P(ŝ = s)`` and the
trained model's accuracy against the true preference (``clean_accuracy``) are both
measured. One principle along ``d_i = μ_i⁺ − μ_i⁻`` labels like the Bayes rule of an
isotropic behavior; when the behavior has no spread along ``d_i`` its labels are the
true ones exactly.

:func:`principles_with_cosine` builds principles at a chosen cosine ``ρ`` with each
behavior's ``d_i``: ``p_ij = ρ d̂_i + √(1 − ρ²) u_ij`` with the ``u_ij`` orthonormal and
orthogonal to ``d̂_i`` (drawn from a seed), so two principles of a behavior have
cosine ``ρ²`` and, for an isotropic behavior, independent errors given the class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synthetic.validation import ParameterError, check_choice, check_integer, check_number

__all__ = ["Principles", "principles_with_cosine", "shared_principles", "label_quality",
           "summed_cosine", "COMBINE"]

COMBINE = ("vote", "sum")


@dataclass(frozen=True, eq=False)
class Principles:
    """Principle directions per behavior and how their verdicts combine.

    directions (K, k, d)  p_ij: behavior i's j-th principle (any length: only the
                          sign of a score counts, and for ``sum`` the relative lengths)
    centers    (K, d)     c_i: the point a score is measured from
    combine               "vote" or "sum"
    orientation           +1, or −1 for flipped labels (training on swapped preferences)
    """

    directions: np.ndarray
    centers: np.ndarray
    combine: str = "vote"
    orientation: float = 1.0

    def __post_init__(self):
        directions = np.asarray(self.directions, dtype=np.float64)
        if directions.ndim != 3 or directions.shape[1] < 1:
            raise ParameterError("principles.directions", directions.shape,
                                 "must be a non-empty set: shape (K, k, d) with k >= 1")
        if not np.all(np.isfinite(directions)):
            raise ParameterError("principles.directions", "non-finite", "must be finite")
        if np.any(np.linalg.norm(directions, axis=-1) == 0):
            raise ParameterError("principles.directions", "a zero vector",
                                 "must be non-zero directions")
        centers = np.asarray(self.centers, dtype=np.float64)
        if centers.shape != (directions.shape[0], directions.shape[2]):
            raise ParameterError("principles.centers", centers.shape,
                                 f"must have shape {(directions.shape[0], directions.shape[2])}")
        object.__setattr__(self, "directions", directions)
        object.__setattr__(self, "centers", centers)
        object.__setattr__(self, "combine", check_choice("principles.combine", self.combine,
                                                         COMBINE))
        if self.orientation not in (1.0, -1.0):
            raise ParameterError("principles.orientation", self.orientation, "must be +1 or -1")

    @property
    def count(self) -> int:
        """``k``: principles per behavior."""
        return self.directions.shape[1]

    def flipped(self) -> "Principles":
        """The same judge with its verdicts swapped."""
        return Principles(self.directions, self.centers, self.combine, -self.orientation)

    def scores(self, features, behavior) -> np.ndarray:
        """``p_ijᵀ(g − c_i)`` for features ``(..., n, d)`` of behaviors ``(n,)``,
        (the last axis one score per principle)."""
        g = np.asarray(features, dtype=np.float64)
        b = np.asarray(behavior)
        return np.einsum("...nd,nkd->...nk", g - self.centers[b], self.directions[b])

    def labels(self, features, behavior) -> np.ndarray:
        """The judge's sign ``ŝ ∈ {+1, −1}`` per statement, shape ``features.shape[:-1]``."""
        scores = self.scores(features, behavior)
        total = scores.sum(-1)
        if self.combine == "vote":
            votes = np.sign(scores).sum(-1)
            total = np.where(votes != 0, votes, total)
        return self.orientation * np.where(total >= 0, 1.0, -1.0)


def principles_with_cosine(directions, centers, cosine: float, count: int, *, seed: int = 0,
                           combine: str = "vote") -> Principles:
    """``count`` principles per behavior at cosine ``cosine`` with its ``d_i`` (rows of
    ``directions`` ``(K, d)``; see the module docstring). Needs ``count < d`` unless
    ``cosine = ±1``."""
    d = np.asarray(directions, dtype=np.float64)
    rho = check_number("principles.cosine", cosine, ge=-1, le=1)
    count = check_integer("principles.count", count, ge=1)
    num, dim = d.shape
    if abs(rho) < 1 and count > dim - 1:
        raise ParameterError("principles.count", count, f"must be <= problem.dim − 1 = "
                             f"{dim - 1} (orthonormal residuals orthogonal to d_i)")
    rng = np.random.default_rng(check_integer("principles.seed", seed, ge=0))
    out = np.empty((num, count, dim))
    for i, row in enumerate(d):
        unit = row / np.linalg.norm(row)
        if abs(rho) == 1:
            out[i] = rho * unit
            continue
        # a Gaussian matrix's QR after d̂_i: orthonormal directions orthogonal to d̂_i
        basis, _ = np.linalg.qr(np.column_stack([unit, rng.standard_normal((dim, count))]))
        residual = basis[:, 1:count + 1].T
        out[i] = rho * unit + np.sqrt(1 - rho * rho) * residual
    return Principles(out, centers, combine)


def shared_principles(vectors, num_behaviors: int, centers, *,
                      combine: str = "vote") -> Principles:
    """The same ``k`` principle vectors ``(k, d)`` for every behavior."""
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim != 2 or v.shape[0] < 1:
        raise ParameterError("principles.directions", list(v.shape),
                             "must be a non-empty list of principle vectors (k × d, k >= 1)")
    return Principles(np.broadcast_to(v, (num_behaviors,) + v.shape).copy(), centers, combine)


def summed_cosine(cosine: float, count: int) -> float:
    """The cosine of ``Σ_j p_ij`` with ``d_i`` for :func:`principles_with_cosine`'s ``count``
    unit principles at cosine ``ρ``: ``ρ√k / √(1 + ρ²(k − 1))`` (``|Σ_j p_j|² = k + k(k−1)ρ²``,
    since two principles have cosine ``ρ²``)."""
    rho = check_number("cosine", cosine, ge=-1, le=1)
    k = check_integer("count", count, ge=1)
    return rho * np.sqrt(k) / np.sqrt(1 + rho * rho * (k - 1))


def label_quality(cosine: float, count: int, distinguishability: float, *, sigma: float = 1.0,
                  combine: str = "vote") -> float:
    """``P(ŝ = s)``: the share of true labels from :func:`principles_with_cosine`'s judge
    on a Gaussian behavior with ``Σ± = σ² I`` and ``‖d_i‖ = δ`` (docs/theory.md §14).

    Given the shared noise ``a = d̂ᵀ(g − μ_s) ~ N(0, σ²)`` along ``d̂`` (class +; the − class
    is its mirror), principle ``j`` scores ``ρ(δ/2 + a) + √(1 − ρ²) e_j`` with the ``e_j``
    independent ``N(0, σ²)``, so each votes truly with probability
    ``q(a) = Φ(ρ(δ/2 + a) / (√(1 − ρ²) σ))`` and

    * ``vote`` (``k`` odd): ``P = ∫ Σ_{j > k/2} C(k, j) q(a)^j (1 − q(a))^{k−j} φ_σ(a) da``,
      a one-dimensional integral (adaptive quadrature);
    * ``sum``: one principle along ``Σ_j p_j``, ``P = Φ(c δ / (2σ))`` with ``c`` its cosine
      (:func:`summed_cosine`), in closed form.

    Both tend to the Bayes rule's ``Φ(δ/(2σ))`` as ``k → ∞`` for any ``ρ > 0``; ``ρ = 1``
    is that rule for every ``k``, ``ρ = 0`` is a coin (½)."""
    from scipy import integrate, special, stats

    rho = check_number("cosine", cosine, ge=-1, le=1)
    k = check_integer("count", count, ge=1)
    delta = check_number("distinguishability", distinguishability, ge=0)
    sigma = check_number("sigma", sigma, gt=0)
    combine = check_choice("combine", combine, COMBINE)
    if combine == "sum" or k == 1:
        return float(stats.norm.cdf(summed_cosine(rho, k) * delta / (2 * sigma)))
    if k % 2 == 0:
        raise ParameterError("count", k, "must be odd for combine = 'vote' (an even vote's "
                             "ties are broken by the summed scores, which this integral "
                             "does not follow)")
    if abs(rho) == 1:
        return float(stats.norm.cdf(rho * delta / (2 * sigma)))
    wins = np.arange(k // 2 + 1, k + 1)
    log_choose = special.gammaln(k + 1) - special.gammaln(wins + 1) - special.gammaln(k - wins + 1)

    def given(a: float) -> float:
        z = rho * (delta / 2 + a) / (np.sqrt(1 - rho * rho) * sigma)
        log_q, log_miss = special.log_ndtr(z), special.log_ndtr(-z)  # log q, log(1 − q)
        majority = np.exp(log_choose + wins * log_q + (k - wins) * log_miss).sum()
        return majority * stats.norm.pdf(a, scale=sigma)

    # the integrand's mass lies within a few σ of 0; its steep part near a = −δ/2
    value, _ = integrate.quad(given, -12 * sigma, 12 * sigma, points=[-delta / 2],
                              epsabs=1e-12, epsrel=1e-10, limit=200)
    return float(value)
