"""Preference problems: behaviors with class-conditional means and covariances.

Notation (THEORY §1). A *behavior* ``i`` has positive statements (``s = +1``,
chosen answer ``Yes``) with embeddings ``g ~ D(μ_i⁺, Σ_i⁺)`` and negative ones
(``s = −1``, chosen answer ``No``) with ``g ~ D(μ_i⁻, Σ_i⁻)``; ``D`` is the
problem's family. Its *preference distinguishability* is ``‖μ_i⁺ − μ_i⁻‖₂``.
A *problem* is one or more behaviors in the same ``R^d`` with mixture weights,
a family, and an optional label-flip probability ``ε``.

Letters used in shapes: ``d`` embedding dimension, ``K`` behaviors, ``C``
mixture components (see :func:`synthetic.mixture.population_mixture`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from synthetic.families import Family, get_family
from synthetic.validation import (
    ParameterError,
    check_covariance,
    check_finite_array,
    check_integer,
    check_number,
)

__all__ = [
    "Behavior",
    "Problem",
    "isotropic",
    "diagonal",
    "low_rank_plus_diagonal",
    "with_distinguishability",
    "behaviors_with_angles",
]

RESERVED_NAMES = frozenset({"all"})


@dataclass(frozen=True, eq=False)
class Behavior:
    """One behavior: ``(name, μ⁺, μ⁻, Σ⁺, Σ⁻, weight)`` in ``R^d``.

    ``pos_fraction`` is the share of positive statements (0.5 = balanced; other
    values give class imbalance). Arrays are validated and stored as float64:
    means ``(d,)``, covariances ``(d, d)`` symmetric PSD.
    """

    name: str
    mu_pos: np.ndarray
    mu_neg: np.ndarray
    cov_pos: np.ndarray
    cov_neg: np.ndarray
    weight: float = 1.0
    pos_fraction: float = 0.5

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name in RESERVED_NAMES:
            raise ParameterError("name", self.name, "must be a non-empty string other than 'all'")
        mu_pos = np.asarray(self.mu_pos, dtype=np.float64) if _is_numeric(self.mu_pos) else None
        if mu_pos is None or mu_pos.ndim != 1:
            raise ParameterError("mu_pos", self.mu_pos, "must be a vector of numbers")
        dim = mu_pos.shape[0]
        set_ = object.__setattr__
        set_(self, "mu_pos", check_finite_array("mu_pos", mu_pos, (dim,)))
        set_(self, "mu_neg", check_finite_array("mu_neg", self.mu_neg, (dim,)))
        set_(self, "cov_pos", check_covariance("cov_pos", self.cov_pos, dim))
        set_(self, "cov_neg", check_covariance("cov_neg", self.cov_neg, dim))
        set_(self, "weight", check_number("weight", self.weight, gt=0))
        set_(self, "pos_fraction", check_number("pos_fraction", self.pos_fraction, gt=0, lt=1))
        for array in (self.mu_pos, self.mu_neg, self.cov_pos, self.cov_neg):
            array.setflags(write=False)

    @property
    def dim(self) -> int:
        return self.mu_pos.shape[0]

    @property
    def direction(self) -> np.ndarray:
        """``d = μ⁺ − μ⁻``, shape ``(d,)``."""
        return self.mu_pos - self.mu_neg

    @property
    def distinguishability(self) -> float:
        """``‖μ⁺ − μ⁻‖₂``."""
        return float(np.linalg.norm(self.direction))

    @property
    def concentration(self) -> float:
        """``max(‖Σ⁺‖_op, ‖Σ⁻‖_op)``."""
        return max(_op_norm(self.cov_pos), _op_norm(self.cov_neg))

    @property
    def trace(self) -> float:
        """``max(tr Σ⁺, tr Σ⁻)``."""
        return max(float(np.trace(self.cov_pos)), float(np.trace(self.cov_neg)))

    def replace(self, **changes) -> "Behavior":
        fields = dict(
            name=self.name, mu_pos=self.mu_pos, mu_neg=self.mu_neg, cov_pos=self.cov_pos,
            cov_neg=self.cov_neg, weight=self.weight, pos_fraction=self.pos_fraction,
        )
        fields.update(changes)
        return Behavior(**fields)


@dataclass(frozen=True, eq=False)
class Problem:
    """Behaviors sharing ``R^d``, a family, and a label-flip probability.

    ``label_noise = ε`` flips each observed preference independently with
    probability ``ε`` (the embedding keeps its true class). ``principles`` (a
    :class:`synthetic.principles.Principles`) replaces every observed preference
    by a principle-driven judge's label instead (the two do not combine). Weights
    are normalised to sum to one in :attr:`weights`.
    """

    behaviors: tuple[Behavior, ...]
    family: str = "gaussian"
    label_noise: float = 0.0
    principles: object = None
    _family: Family = field(init=False, repr=False)

    def __post_init__(self):
        behaviors = tuple(self.behaviors)
        if not behaviors or not all(isinstance(b, Behavior) for b in behaviors):
            raise ParameterError("behaviors", self.behaviors, "must be one or more Behavior")
        dim = behaviors[0].dim
        for index, behavior in enumerate(behaviors):
            if behavior.dim != dim:
                raise ParameterError(
                    f"behaviors.{index}.mu_pos", behavior.mu_pos,
                    f"must have dimension {dim} like behaviors.0, not {behavior.dim}",
                )
        names = [b.name for b in behaviors]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ParameterError("behaviors.name", duplicated[0], "must be unique")
        object.__setattr__(self, "behaviors", behaviors)
        object.__setattr__(self, "_family", get_family(self.family))
        object.__setattr__(
            self, "label_noise", check_number("label_noise", self.label_noise, ge=0, lt=0.5)
        )
        if self.principles is not None:
            shape = self.principles.directions.shape
            if shape[0] != len(behaviors) or shape[2] != dim:
                raise ParameterError("principles.directions", list(shape), f"must have shape "
                                     f"({len(behaviors)}, k, {dim}): k principles per behavior")
            if self.label_noise > 0:
                raise ParameterError("label_noise", self.label_noise, "must be 0 with "
                                     "principles (the judge's labels replace the observed ones)")

    @property
    def dim(self) -> int:
        return self.behaviors[0].dim

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.behaviors]

    @property
    def family_spec(self) -> Family:
        return self._family

    @property
    def weights(self) -> np.ndarray:
        """Normalised behavior weights ``w_i``, shape ``(K,)``."""
        raw = np.array([b.weight for b in self.behaviors])
        return raw / raw.sum()

    @property
    def directions(self) -> np.ndarray:
        """Rows ``d_i = μ_i⁺ − μ_i⁻``, shape ``(K, d)``."""
        return np.stack([b.direction for b in self.behaviors])

    @property
    def centers(self) -> np.ndarray:
        """Rows ``c_i = (μ_i⁺ + μ_i⁻)/2``, shape ``(K, d)``."""
        return np.stack([(b.mu_pos + b.mu_neg) / 2 for b in self.behaviors])

    def restrict(self, features: int) -> "Problem":
        """The marginal problem of the first ``features = k`` coordinates of ``g``: each
        behavior's ``μ±[:k]``, ``Σ±[:k, :k]``, weights, class balance, family and label
        noise kept. It is the law of ``g[:k]`` for ``g`` drawn from this problem, so a
        sample drawn here and truncated is a sample of it (common random numbers across
        ``k``). ``k = d`` returns ``self``. Gaussian and Laplace are closed under marginals
        (``g = μ + √w L z``); ``uniform`` (``μ + L z``, ``z`` i.i.d. uniform) is only when
        every covariance is diagonal, and is refused otherwise."""
        k = check_integer("features", features, ge=1, le=self.dim)
        if k == self.dim:
            return self
        if self.principles is not None:
            raise ParameterError("features", k, f"must equal dim = {self.dim} with principles "
                                 "(the judge labels the whole embedding)")
        if self.family == "uniform":
            for b in self.behaviors:
                for cov in (b.cov_pos, b.cov_neg):
                    if np.any(cov != np.diag(np.diag(cov))):
                        raise ParameterError("features", k, f"must equal dim = {self.dim} for "
                                             "the uniform family with a non-diagonal "
                                             f"covariance (behavior {b.name!r}): its marginal "
                                             "is not uniform")
        cut = lambda b: b.replace(mu_pos=b.mu_pos[:k], mu_neg=b.mu_neg[:k],  # noqa: E731
                                  cov_pos=b.cov_pos[:k, :k], cov_neg=b.cov_neg[:k, :k])
        return self.replace(behaviors=tuple(cut(b) for b in self.behaviors))

    def replace(self, **changes) -> "Problem":
        fields = dict(behaviors=self.behaviors, family=self.family, label_noise=self.label_noise,
                      principles=self.principles)
        fields.update(changes)
        return Problem(**fields)


# ----------------------------------------------------------------------------- builders


def isotropic(
    name: str,
    dim: int,
    distinguishability: float,
    *,
    sigma: float = 1.0,
    direction: Sequence[float] | None = None,
    center: Sequence[float] | None = None,
    weight: float = 1.0,
    pos_fraction: float = 0.5,
) -> Behavior:
    """``μ± = center ± (δ/2)·direction/‖direction‖``, ``Σ± = σ² I``.

    ``direction`` defaults to the first basis vector and ``center`` to 0, so
    ``‖μ⁺ − μ⁻‖ = distinguishability`` exactly.
    """
    dim = check_integer("dim", dim, ge=1)
    delta = check_number("distinguishability", distinguishability, ge=0)
    sigma = check_number("sigma", sigma, ge=0)
    unit = _unit(direction, dim)
    mid = np.zeros(dim) if center is None else check_finite_array("center", center, (dim,))
    cov = sigma**2 * np.eye(dim)
    return Behavior(name, mid + delta / 2 * unit, mid - delta / 2 * unit, cov, cov, weight,
                    pos_fraction)


def diagonal(
    name: str,
    mu_pos: Sequence[float],
    mu_neg: Sequence[float],
    variances: Sequence[float],
    *,
    variances_neg: Sequence[float] | None = None,
    weight: float = 1.0,
    pos_fraction: float = 0.5,
) -> Behavior:
    """Diagonal covariances ``diag(variances)`` (and ``variances_neg`` if given)."""
    var = np.asarray(variances, dtype=np.float64)
    var_neg = var if variances_neg is None else np.asarray(variances_neg, dtype=np.float64)
    for key, v in (("variances", var), ("variances_neg", var_neg)):
        if v.ndim != 1 or not np.all(np.isfinite(v)) or np.any(v < 0):
            raise ParameterError(key, v, "must be a vector of finite numbers >= 0")
    return Behavior(name, mu_pos, mu_neg, np.diag(var), np.diag(var_neg), weight, pos_fraction)


def low_rank_plus_diagonal(
    name: str,
    mu_pos: Sequence[float],
    mu_neg: Sequence[float],
    factors: np.ndarray,
    diag: Sequence[float],
    *,
    weight: float = 1.0,
    pos_fraction: float = 0.5,
) -> Behavior:
    """``Σ± = U Uᵀ + diag(diag)`` with ``U = factors`` of shape ``(d, r)``."""
    mu = np.asarray(mu_pos, dtype=np.float64)
    dim = mu.shape[0] if mu.ndim == 1 else -1
    u = np.asarray(factors, dtype=np.float64)
    if u.ndim != 2 or u.shape[0] != dim or not np.all(np.isfinite(u)):
        raise ParameterError("factors", factors, f"must be a finite ({dim}, r) matrix")
    dg = np.asarray(diag, dtype=np.float64)
    if dg.shape != (dim,) or not np.all(np.isfinite(dg)) or np.any(dg < 0):
        raise ParameterError("diag", diag, f"must be {dim} finite numbers >= 0")
    cov = u @ u.T + np.diag(dg)
    return Behavior(name, mu_pos, mu_neg, cov, cov, weight, pos_fraction)


def with_distinguishability(behavior: Behavior, distinguishability: float) -> Behavior:
    """``behavior`` with ``μ⁺ − μ⁻`` rescaled to norm δ, midpoint and Σ kept."""
    delta = check_number("distinguishability", distinguishability, ge=0)
    norm = behavior.distinguishability
    if norm == 0:
        raise ParameterError(
            "distinguishability", delta, "cannot be set on a behavior with μ⁺ = μ⁻ (no direction)"
        )
    mid = (behavior.mu_pos + behavior.mu_neg) / 2
    half = behavior.direction * (delta / norm / 2)
    return behavior.replace(mu_pos=mid + half, mu_neg=mid - half)


def behaviors_with_angles(
    dim: int,
    distinguishabilities: Sequence[float],
    cosines: float | np.ndarray,
    *,
    sigma: float = 1.0,
    names: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
) -> list[Behavior]:
    """Isotropic behaviors whose ``d_i = μ_i⁺ − μ_i⁻`` have given norms and angles.

    ``cosines`` is either one number (every pair has that cosine) or a ``(K, K)``
    matrix with unit diagonal. The ``d_i`` are the rows of the Cholesky factor
    of the Gram matrix ``G_ij = δ_i δ_j cos θ_ij``, so ``⟨d_i, d_j⟩ = G_ij``
    exactly; each behavior is centred at 0 with ``Σ± = σ² I``.
    """
    dim = check_integer("dim", dim, ge=1)
    deltas = np.asarray(distinguishabilities, dtype=np.float64)
    k = deltas.shape[0] if deltas.ndim == 1 else 0
    if k < 1 or np.any(~np.isfinite(deltas)) or np.any(deltas < 0):
        raise ParameterError("distinguishabilities", distinguishabilities,
                             "must be one or more finite numbers >= 0")
    if k > dim:
        raise ParameterError("distinguishabilities", distinguishabilities,
                             f"must have at most dim = {dim} entries")
    if np.ndim(cosines) == 0:
        cos = np.full((k, k), check_number("cosines", cosines, ge=-1, le=1))
        np.fill_diagonal(cos, 1.0)
    else:
        cos = np.asarray(cosines, dtype=np.float64)
    cos = check_finite_array("cosines", cos, (k, k))
    if not np.allclose(np.diag(cos), 1.0) or np.abs(cos).max() > 1 + 1e-12:
        raise ParameterError("cosines", cosines, "must have unit diagonal and entries in [-1, 1]")
    gram = check_covariance("cosines", cos, k) * np.outer(deltas, deltas)
    vals, vecs = np.linalg.eigh(gram)
    rows = vecs * np.sqrt(np.clip(vals, 0, None))  # rows r_i with r_i·r_j = G_ij
    vectors = np.zeros((k, dim))
    vectors[:, :k] = rows
    names = list(names) if names is not None else [f"behavior_{i}" for i in range(k)]
    weights = list(weights) if weights is not None else [1.0] * k
    if len(names) != k or len(weights) != k:
        raise ParameterError("names", names, f"must have {k} entries like distinguishabilities")
    cov = sigma**2 * np.eye(dim)
    return [
        Behavior(names[i], vectors[i] / 2, -vectors[i] / 2, cov, cov, weights[i])
        for i in range(k)
    ]


# ----------------------------------------------------------------------------- helpers


def _is_numeric(value) -> bool:
    try:
        np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return True


def _op_norm(cov: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(cov)[-1]) if cov.size else 0.0


def _unit(direction, dim: int) -> np.ndarray:
    if direction is None:
        unit = np.zeros(dim)
        unit[0] = 1.0
        return unit
    vec = check_finite_array("direction", direction, (dim,))
    norm = np.linalg.norm(vec)
    if norm == 0:
        raise ParameterError("direction", direction, "must be a non-zero vector")
    return vec / norm
