"""The mixture view of a problem, shared by the analytic and simulated dynamics.

Both the population flow and the bounds need only the *components* of the
feature distribution: groups with a common observed sign ``s_c``, a weight
``π_c``, a mean ``μ_c`` and a covariance ``Σ_c``. A :class:`Mixture` holds them
for

* a problem's population (:func:`population_mixture`): one component per
  behavior × true class × observed sign (label noise splits each class in two),
  all drawn from the problem's family;
* a finite sample (:func:`empirical_mixture`): one component per behavior ×
  observed sign, with the sample mean and the *biased* (1/n) covariance, so the
  empirical measure of the sample is represented exactly in its first two
  moments. Every bound in :mod:`dynamics.bounds` holds for any probability
  measure, so it applies verbatim to a training set through this view.

Shapes: ``C`` components, ``d`` dimension, ``K`` behaviors.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import numpy as np

from synthetic.problem import Problem

__all__ = ["Mixture", "population_mixture", "empirical_mixture"]


@dataclass(frozen=True, eq=False)
class Mixture:
    """Components of a feature distribution with observed preference signs.

    weights  (C,)      π_c, summing to 1 over all components
    signs    (C,)      s_c ∈ {+1, −1}: the observed (training) sign
    behavior (C,)      index of the behavior in ``names``
    means    (C, d)    μ_c
    covs     (C, d, d) Σ_c
    family             name of the family (``"empirical"`` for a sample)
    true_signs (C,)    the sign before label noise (default: ``signs``), for the
                       accuracy against the true preferences
    principles         a :class:`synthetic.principles.Principles` whose per-point
                       labels replace ``signs`` (then ``signs = true_signs``, the
                       classes; the population flow goes to quasi-Monte Carlo)
    """

    weights: np.ndarray
    signs: np.ndarray
    behavior: np.ndarray
    means: np.ndarray
    covs: np.ndarray
    names: tuple[str, ...]
    family: str
    true_signs: np.ndarray | None = None
    principles: object = None

    def __post_init__(self):
        if self.true_signs is None:
            object.__setattr__(self, "true_signs", self.signs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_behaviors(self) -> int:
        return len(self.names)

    @functools.cached_property
    def diagonal_covs(self) -> np.ndarray | None:
        """The covariances' diagonals ``(C, d)`` (contiguous) when every ``Σ_c`` is
        diagonal, else ``None``; computed once per mixture (the flow's set-up asks)."""
        diagonal = np.ascontiguousarray(np.einsum("cii->ci", self.covs), dtype=np.float64)
        # diagonal exactly when no entry off the diagonal is nonzero
        return diagonal if np.count_nonzero(self.covs) == np.count_nonzero(diagonal) else None

    def behavior_weights(self) -> np.ndarray:
        """``w_i = Σ_{c ∈ i} π_c``, shape ``(K,)``."""
        return np.bincount(self.behavior, weights=self.weights, minlength=self.num_behaviors)

    def signed_mean(self, behavior: int | None = None) -> np.ndarray:
        """``m = E[s g]`` over the whole mixture, or conditional on one behavior.

        For balanced, noise-free classes ``m_i = (μ_i⁺ − μ_i⁻)/2``: the preference
        signal every DPO step starts from (THEORY §2), shape ``(d,)``.
        """
        mask = (np.ones_like(self.signs, dtype=bool) if behavior is None
                else self.behavior == behavior)
        w = self.weights[mask] / self.weights[mask].sum()
        return (w * self.signs[mask]) @ self.means[mask]

    def second_moment(self, behavior: int | None = None) -> np.ndarray:
        """``S = E[g gᵀ] = Σ_c π_c (Σ_c + μ_c μ_cᵀ)``, shape ``(d, d)``."""
        mask = (np.ones_like(self.signs, dtype=bool) if behavior is None
                else self.behavior == behavior)
        w = self.weights[mask] / self.weights[mask].sum()
        mu = self.means[mask]
        return np.einsum("c,cij->ij", w, self.covs[mask]) + (w[:, None] * mu).T @ mu


def population_mixture(problem: Problem) -> Mixture:
    """Components of ``problem``'s population: behavior × true class × observed sign."""
    eps = problem.label_noise
    rows = []
    for index, (behavior, w) in enumerate(zip(problem.behaviors, problem.weights)):
        for true_sign, frac, mu, cov in (
            (+1, behavior.pos_fraction, behavior.mu_pos, behavior.cov_pos),
            (-1, 1 - behavior.pos_fraction, behavior.mu_neg, behavior.cov_neg),
        ):
            for flipped, prob in ((False, 1 - eps), (True, eps)):
                if prob > 0:
                    sign = -true_sign if flipped else true_sign
                    rows.append((w * frac * prob, sign, index, mu, cov, true_sign))
    weights, signs, beh, means, covs, true = zip(*rows)
    return Mixture(
        np.array(weights), np.array(signs, dtype=np.float64), np.array(beh), np.stack(means),
        np.stack(covs), tuple(problem.names), problem.family, np.array(true, dtype=np.float64),
        problem.principles,
    )


def empirical_mixture(features, signs, behavior, names) -> Mixture:
    """The empirical measure of a sample as a Mixture (one component per group).

    features (n, d) · signs (n,) observed ±1 · behavior (n,) ints in [0, K).
    Groups are behavior × observed sign; empty groups are dropped.
    """
    x = _numpy(features).astype(np.float64)
    s = _numpy(signs).astype(np.float64)
    b = _numpy(behavior).astype(np.int64)
    n = x.shape[0]
    rows = []
    for index in range(len(names)):
        for sign in (+1.0, -1.0):
            mask = (b == index) & (s == sign)
            count = int(mask.sum())
            if count:
                group = x[mask]
                mean = group.mean(axis=0)
                centred = group - mean
                rows.append((count / n, sign, index, mean, centred.T @ centred / count))
    weights, sgn, beh, means, covs = zip(*rows)
    return Mixture(np.array(weights), np.array(sgn), np.array(beh), np.stack(means),
                   np.stack(covs), tuple(names), "empirical")


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)
