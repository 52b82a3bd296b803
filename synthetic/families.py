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
scale ``w`` (``w ≡ 1``, resp. ``w ~ Exp(1)``), ``g ~ N(μ, wΣ)``. The population
flow integrates over ``w`` with a quadrature rule (:meth:`Family.scale_nodes`),
which keeps Stein's lemma exact for both. ``uniform`` is not a scale mixture;
its population expectations use quasi-Monte Carlo instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special, stats

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
            return stats.norm.ppf(body)
        if self.name == "laplace":
            return np.sqrt(-np.log1p(-last)) * stats.norm.ppf(body)
        if self.name == "uniform":
            return np.sqrt(3.0) * (2.0 * body - 1.0)
        raise AssertionError(self.name)

    def scale_nodes(self, num: int = 24) -> tuple[np.ndarray, np.ndarray] | None:
        """Quadrature ``(w_k, p_k)`` with ``E[f(w)] ≈ Σ p_k f(w_k)`` for the
        mixing scale ``w``, or ``None`` when the family is no Gaussian scale
        mixture. Gauss–Laguerre is exact for ``w ~ Exp(1)`` against polynomials
        of degree ``2·num − 1``."""
        if self.name == "gaussian":
            return np.ones(1), np.ones(1)
        if self.name == "laplace":
            nodes, weights = special.roots_laguerre(num)
            return nodes, weights
        return None


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
