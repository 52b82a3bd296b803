"""Sub-exponential families of class-conditional embeddings.

Each family draws a *standardised* vector ``z`` (mean 0, covariance I) and the
generator maps it to ``g = μ + L z`` with ``L Lᵀ = Σ``, so every family has the
same mean and covariance and differs only in its tails:

=========  =======================================  =========================
family     z                                        tail (α-sub-exponential)
=========  =======================================  =========================
gaussian   N(0, I)                                  α = 2 (sub-Gaussian)
laplace    √E · N(0, I),  E ~ Exp(1)                α = 1 (projections are
                                                    Laplace)
uniform    i.i.d. Uniform(−√3, √3)                  bounded (every α)
=========  =======================================  =========================

``gaussian`` and ``laplace`` are Gaussian *scale mixtures*: conditional on the
scale ``w`` (``w ≡ 1``, resp. ``w ~ Exp(1)``), ``g ~ N(μ, wΣ)``, so Stein's
lemma holds conditionally and the population flow needs only one-dimensional
integrals against the law of a standardised projection, with the weight
``E[w | Y]`` (:meth:`Family.projection_rule`); their projection CDFs are closed
forms (:meth:`Family.projection_cdf`). ``uniform`` is not a scale mixture; its
population expectations use quasi-Monte Carlo instead.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import numpy as np
from scipy import special

__all__ = ["FAMILIES", "Family", "get_family"]


@dataclass(frozen=True)
class Family:
    """A standardised distribution on ``R^d``; see the module docstring."""

    name: str
    alpha: float  # sub-exponential order: ψ_α-norm of projections is finite
    description: str

    def sample_standard(self, n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` i.i.d. standardised draws, shape ``(n, dim)``, float64."""
        if self.name == "gaussian":
            return rng.standard_normal((n, dim))
        if self.name == "laplace":
            return np.sqrt(rng.standard_exponential((n, 1))) * rng.standard_normal((n, dim))
        if self.name == "uniform":
            return rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), size=(n, dim))
        raise AssertionError(self.name)  # unreachable: FAMILIES is closed

    def standard_from_unit(self, unit: np.ndarray) -> np.ndarray:
        """Map points of ``(0,1)^(dim+1)`` (e.g. Sobol) to standardised draws.

        The inverse-CDF transform used for quasi-Monte Carlo; the last column is
        spent on the scale of a scale mixture. Shape ``(m, dim+1) -> (m, dim)``.
        """
        body, last = unit[:, :-1], unit[:, -1:]
        if self.name == "gaussian":
            return special.ndtri(body)
        if self.name == "laplace":
            return np.sqrt(-np.log1p(-last)) * special.ndtri(body)
        if self.name == "uniform":
            return np.sqrt(3.0) * (2.0 * body - 1.0)
        raise AssertionError(self.name)

    def projection_rule(self, panel_width: float = 0.1, points: int = 8):
        """A quadrature rule for the standardised projection ``Y = vᵀz/‖v‖``.

        Returns ``(y, p, q)`` with ``E[f(Y)] ≈ Σ p_j f(y_j)`` and
        ``E[w f(Y)] ≈ Σ p_j q_j f(y_j)`` for the mixing scale ``w`` (``q_j =
        E[w | Y = y_j]``, the weight Stein's lemma needs), or ``None`` when the
        family is no Gaussian scale mixture.

        Composite Gauss–Legendre with ``points`` nodes on panels of
        ``panel_width`` (in units of the projection's standard deviation), so
        integrands that turn sharply, like ``σ(β s y)`` for a large logit
        spread ``s``, stay resolved (error ~1e-12 up to ``s`` = 30, ~1e-8 at 50). Gaussian:
        ``Y ~ N(0, 1)`` on ``[−10, 10]``, ``q = 1``. Laplace: ``Y = √w Z`` has
        density ``e^{−√2|y|}/√2`` (variance 1), on ``[−28.3, 28.3]`` split at
        the kink ``y = 0``, and ``E[w | Y = y] = |y|/√2 + ½`` (a ratio of
        Bessel-K integrals, K_{3/2}/K_{1/2}).

        Computed once per process (:func:`_projection_rule`); the caller gets copies.
        """
        rule = _projection_rule(self.name, float(panel_width), int(points))
        return None if rule is None else tuple(a.copy() for a in rule)

    def graded_rule(self, low, high, fine: np.ndarray, *, coarse: float = 0.5,
                    points: int = 8):
        """Per-component rules for an integrand that turns sharply only on a band.

        For component ``c`` the integrand varies on the scale ``fine[c]`` (in units of
        ``Y``) for ``low[c] ≤ y ≤ high[c]`` and on the density's scale elsewhere (e.g.
        ``σ(βh)`` with ``h = m + sd·y``, saturated beyond a few dozen logits). The
        rule is composite Gauss–Legendre with ``points`` nodes on panels of width
        ``coarse`` over the family's range, split at 0, and of width ``fine[c]`` on the
        band: about ``(2L/coarse + (high − low)/fine)·points`` nodes whatever ``fine``
        is, where :meth:`projection_rule` needs ``2L/fine·points``.

        ``low``, ``high``, ``fine`` ``(C,)`` → ``(y, p, q)`` each ``(C, J)``, padded with
        zero weights to a common ``J`` (``q`` as in :meth:`projection_rule`).
        """
        half = 10.0 if self.name == "gaussian" else 40.0 / np.sqrt(2.0)
        if self.projection_rule() is None:
            return None
        # 0 is an edge: the Laplace density and its Stein weight have a kink there
        coarse_edges = np.unique(np.r_[np.arange(-half, 0.0, coarse), np.arange(0.0, half, coarse),
                                       half])
        x, w = special.roots_legendre(points)
        rules = []
        for lo, hi, width in zip(np.atleast_1d(low), np.atleast_1d(high), np.atleast_1d(fine)):
            lo, hi = max(float(lo), -half), min(float(hi), half)
            edges = coarse_edges
            if hi > lo:
                count = max(1, int(np.ceil((hi - lo) / width)))
                band = np.linspace(lo, hi, count + 1)
                # the band keeps 0 as an edge too (the kink), wherever its panels fall
                edges = np.unique(np.r_[coarse_edges[(coarse_edges < lo) | (coarse_edges > hi)],
                                        band, 0.0])
            a, b = edges[:-1, None], edges[1:, None]
            rules.append((((b - a) / 2 * x + (b + a) / 2).ravel(), ((b - a) / 2 * w).ravel()))
        size = max(len(nodes) for nodes, _ in rules)
        y = np.zeros((len(rules), size))
        weight = np.zeros((len(rules), size))
        for i, (nodes, weights) in enumerate(rules):
            y[i, :len(nodes)], weight[i, :len(nodes)] = nodes, weights
        density, q = self.projection_pdf(y), self.stein_weight(y)
        return y, weight * density, q

    def projection_pdf(self, x):
        """Density of the standardised projection ``Y`` (scale mixtures only)."""
        x = np.asarray(x, dtype=np.float64)
        if self.name == "gaussian":
            return np.exp(-x**2 / 2) / np.sqrt(2 * np.pi)
        if self.name == "laplace":
            return np.exp(-np.sqrt(2.0) * np.abs(x)) / np.sqrt(2.0)
        raise ValueError(f"the {self.name} family has no closed-form projection law")

    def stein_weight(self, x):
        """``E[w | Y = x]``, the weight of Stein's lemma for the scale mixture
        (1 for Gaussians; ``|x|/√2 + ½`` for Laplace, see :meth:`projection_rule`)."""
        x = np.asarray(x, dtype=np.float64)
        if self.name == "gaussian":
            return np.ones_like(x)
        if self.name == "laplace":
            return np.abs(x) / np.sqrt(2.0) + 0.5
        raise ValueError(f"the {self.name} family has no closed-form projection law")

    def partial_expectation(self, c):
        """``E[(c − Y)₊]`` for the standardised projection (the hinge's mean):
        ``cΦ(c) + φ(c)`` for Gaussians; for Laplace ``e^{√2c}/(2√2)`` when
        ``c < 0`` and ``c + e^{−√2c}/(2√2)`` otherwise (``∫_{−∞}^c P(Y ≤ y) dy``)."""
        c = np.asarray(c, dtype=np.float64)
        if self.name == "gaussian":
            return c * special.ndtr(c) + np.exp(-c**2 / 2) / np.sqrt(2 * np.pi)
        if self.name == "laplace":
            tail = np.exp(-np.sqrt(2.0) * np.abs(c)) / (2 * np.sqrt(2.0))
            return np.where(c < 0, tail, c + tail)
        raise ValueError(f"the {self.name} family has no closed-form projection law")

    def projection_cdf(self, x):
        """``P(Y ≤ x)`` for the standardised projection (Gaussian scale mixtures
        only): ``Φ(x)``, or ``1 − ½e^{−√2x}`` / ``½e^{√2x}`` for Laplace."""
        x = np.asarray(x, dtype=np.float64)
        if self.name == "gaussian":
            return special.ndtr(x)
        if self.name == "laplace":
            tail = 0.5 * np.exp(-np.sqrt(2.0) * np.abs(x))
            return np.where(x >= 0, 1.0 - tail, tail)
        raise ValueError(f"the {self.name} family has no closed-form projection law")


@dataclass(frozen=True)
class _Rule:
    nodes: np.ndarray
    weights: np.ndarray


def _composite_legendre(half_width: float, panel: float, points: int) -> _Rule:
    """Gauss–Legendre on panels of width ``panel`` tiling ``[−half_width, half_width]``
    symmetrically about 0 (0 is always a panel edge)."""
    per_side = max(1, int(np.ceil(half_width / panel)))
    edges = np.linspace(0.0, half_width, per_side + 1)
    x, w = special.roots_legendre(points)
    lo, hi = edges[:-1, None], edges[1:, None]
    right = ((hi - lo) / 2 * x + (hi + lo) / 2).ravel()
    weight = ((hi - lo) / 2 * w).ravel()
    return _Rule(np.r_[-right[::-1], right], np.r_[weight[::-1], weight])


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("gaussian", 2.0, "N(μ, Σ)"),
        Family("laplace", 1.0, "multivariate Laplace: μ + √E Σ^½ N(0, I), E ~ Exp(1)"),
        Family("uniform", float("inf"), "μ + Σ^½ U, U uniform on [−√3, √3]^d"),
    )
}


def get_family(name: str, *, param: str = "family") -> Family:
    """The family called ``name``; an unknown name is a ParameterError."""
    from synthetic.validation import check_choice

    return FAMILIES[check_choice(param, name, FAMILIES)]


@functools.lru_cache(maxsize=64)
def _projection_rule(name: str, panel_width: float, points: int):
    """:meth:`Family.projection_rule`'s arrays for the family ``name``."""
    if name == "gaussian":
        y = _composite_legendre(10.0, panel_width, points)
        return y.nodes, y.weights * np.exp(-y.nodes**2 / 2) / np.sqrt(2 * np.pi), np.ones(
            y.nodes.size)
    if name == "laplace":
        y = _composite_legendre(40.0 / np.sqrt(2.0), panel_width, points)
        density = np.exp(-np.sqrt(2.0) * np.abs(y.nodes)) / np.sqrt(2.0)
        return y.nodes, y.weights * density, np.abs(y.nodes) / np.sqrt(2.0) + 0.5
    return None
