"""Bounded Hypothesis strategies for preference problems, and naive references.

Every float strategy excludes NaN and infinity and caps magnitudes, so a
property fails only for a real reason: means in [-2, 2], covariances
``A Aᵀ + c I`` with ``A`` entries in [-1, 1] and ``c`` in [0.05, 1] (so
``λ_min ≥ 0.05``), class shares in [0.2, 0.8], label noise in [0, 0.3].
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from synthetic import Behavior, Problem


def bounded(low: float, high: float):
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


def vectors(dim: int, low: float = -2.0, high: float = 2.0):
    return arrays(np.float64, (dim,), elements=bounded(low, high))


@st.composite
def covariances(draw, dim: int) -> np.ndarray:
    """``A Aᵀ + c I``: symmetric with eigenvalues in [0.05, 1 + dim]."""
    a = draw(arrays(np.float64, (dim, dim), elements=bounded(-1.0, 1.0)))
    c = draw(bounded(0.05, 1.0))
    return a @ a.T + c * np.eye(dim)


@st.composite
def behaviors(draw, dim: int, name: str, *, balanced: bool = False) -> Behavior:
    mu_pos, mu_neg = draw(vectors(dim)), draw(vectors(dim))
    shared = draw(st.booleans())
    cov_pos = draw(covariances(dim))
    cov_neg = cov_pos if shared else draw(covariances(dim))
    weight = draw(bounded(0.2, 1.0))
    pos_fraction = 0.5 if balanced else draw(bounded(0.2, 0.8))
    return Behavior(name, mu_pos, mu_neg, cov_pos, cov_neg, weight, pos_fraction)


@st.composite
def problems(draw, *, families=("gaussian", "laplace", "uniform"), max_dim: int = 6,
             max_behaviors: int = 3, label_noise: bool = True, balanced: bool = False) -> Problem:
    dim = draw(st.integers(1, max_dim))
    k = draw(st.integers(1, max_behaviors))
    family = draw(st.sampled_from(families))
    eps = draw(bounded(0.0, 0.3)) if label_noise else 0.0
    members = tuple(draw(behaviors(dim, f"b{i}", balanced=balanced)) for i in range(k))
    return Problem(members, family=family, label_noise=eps)


def naive_signed_mean(problem: Problem, index: int | None = None) -> np.ndarray:
    """``E[s g]`` from the behaviors' parameters, summed by hand."""
    eps = problem.label_noise
    picks = range(len(problem.behaviors)) if index is None else [index]
    total_w = sum(problem.weights[i] for i in picks)
    m = np.zeros(problem.dim)
    for i in picks:
        b, w = problem.behaviors[i], problem.weights[i] / total_w
        m += w * (1 - 2 * eps) * (b.pos_fraction * b.mu_pos - (1 - b.pos_fraction) * b.mu_neg)
    return m


def naive_second_moment(problem: Problem, index: int | None = None) -> np.ndarray:
    """``E[g gᵀ]`` from the behaviors' parameters (labels play no part)."""
    picks = range(len(problem.behaviors)) if index is None else [index]
    total_w = sum(problem.weights[i] for i in picks)
    s = np.zeros((problem.dim, problem.dim))
    for i in picks:
        b, w = problem.behaviors[i], problem.weights[i] / total_w
        p = b.pos_fraction
        s += w * (p * (b.cov_pos + np.outer(b.mu_pos, b.mu_pos))
                  + (1 - p) * (b.cov_neg + np.outer(b.mu_neg, b.mu_neg)))
    return s
