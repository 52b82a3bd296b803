"""Shared checkers for public entry points.

Every check raises :class:`ParameterError`, whose one-line message names the
parameter, shows the value and states the rule, e.g.::

    beta = -0.1 must be > 0

Config loaders re-raise with the full key path (``train.beta``) through
:meth:`ParameterError.at`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable

import numpy as np

__all__ = [
    "ParameterError",
    "close_matches",
    "did_you_mean",
    "check_choice",
    "check_finite_array",
    "check_covariance",
    "check_number",
    "check_integer",
    "short_repr",
]


def short_repr(value, limit: int = 60) -> str:
    """A one-line representation of ``value``, cut to ``limit`` characters."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ParameterError(ValueError):
    """Bad input: ``name = value must <rule>``, on one line."""

    def __init__(self, name: str, value, rule: str):
        self.name, self.value, self.rule = name, value, rule
        super().__init__(f"{name} = {short_repr(value)} {rule}")

    def at(self, prefix: str) -> "ParameterError":
        """The same error with ``prefix`` (a config path) before the name."""
        name = self.name if not prefix else f"{prefix}.{self.name}"
        return ParameterError(name, self.value, self.rule)


def check_number(name: str, value, *, gt=None, ge=None, lt=None, le=None) -> float:
    """``value`` as a finite float obeying the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ParameterError(name, value, "must be a number")
    value = float(value)
    if not math.isfinite(value):
        raise ParameterError(name, value, "must be finite")
    for bound, ok, word in (
        (gt, lambda b: value > b, ">"),
        (ge, lambda b: value >= b, ">="),
        (lt, lambda b: value < b, "<"),
        (le, lambda b: value <= b, "<="),
    ):
        if bound is not None and not ok(bound):
            raise ParameterError(name, value, f"must be {word} {bound}")
    return value


def check_integer(name: str, value, *, ge=None, le=None) -> int:
    """``value`` as an int obeying the given bounds (floats like 3.0 refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ParameterError(name, value, "must be an integer")
    value = int(value)
    if ge is not None and value < ge:
        raise ParameterError(name, value, f"must be >= {ge}")
    if le is not None and value > le:
        raise ParameterError(name, value, f"must be <= {le}")
    return value


def close_matches(value, choices: Iterable[str], *, n: int = 1,
                  cutoff: float = 0.6) -> list[str]:
    """The (at most ``n``) ``choices`` closest to ``str(value)``, best first: those
    whose :class:`difflib.SequenceMatcher` ratio is at least ``cutoff``."""
    return difflib.get_close_matches(str(value), [str(c) for c in choices], n=n,
                                     cutoff=cutoff)


def did_you_mean(value, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.6) -> str:
    """The hint an error message ends with: ``" (did you mean 'x'?)"`` naming the
    closest of ``choices`` to ``value`` (with ``n > 1`` up to ``n`` of them,
    ``" (did you mean 'x', 'y' or 'z'?)"``), or ``""`` when none is close
    (:func:`close_matches`)."""
    close = [repr(c) for c in close_matches(value, choices, n=n, cutoff=cutoff)]
    if not close:
        return ""
    names = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
    return f" (did you mean {names}?)"


def check_choice(name: str, value, choices: Iterable[str]) -> str:
    """``value`` if it is one of ``choices``; else an error suggesting the closest."""
    choices = list(choices)
    if isinstance(value, str) and value in choices:
        return value
    raise ParameterError(name, value, f"must be one of {', '.join(choices)}"
                         f"{did_you_mean(value, choices)}")


def check_finite_array(name: str, value, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` as a float64 array of exactly ``shape`` with finite entries."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ParameterError(name, value, "must be an array of numbers") from None
    if array.shape != tuple(shape):
        raise ParameterError(name, value, f"must have shape {tuple(shape)}, not {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ParameterError(name, value, "must have finite entries (no NaN or inf)")
    return array


def check_covariance(name: str, value, dim: int) -> np.ndarray:
    """``value`` as a symmetric positive semi-definite ``(dim, dim)`` matrix."""
    cov = check_finite_array(name, value, (dim, dim))
    scale = max(1.0, float(np.abs(cov).max(initial=0.0)))
    asym = float(np.abs(cov - cov.T).max(initial=0.0))
    if asym > 1e-10 * scale:
        raise ParameterError(name, value, f"must be symmetric (max |C - C^T| = {asym:.3g})")
    cov = (cov + cov.T) / 2
    low = float(np.linalg.eigvalsh(cov)[0]) if dim else 0.0
    if low < -1e-10 * scale:
        raise ParameterError(
            name, value, f"must be positive semi-definite (smallest eigenvalue {low:.3g})"
        )
    return cov
