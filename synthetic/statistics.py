"""Estimators of the statistics that matter, on any feature matrix.

They take plain arrays (synthetic samples or real LLM features alike):
``features (n, d)``, ``signs (n,)`` with +1 for statements whose chosen answer
is the behavior-matching one, and ``behavior (n,)`` integer labels with
``names``. Covariances are the unbiased (1/(n−1)) estimates here; the
empirical *measure* used by the bounds is in :mod:`synthetic.mixture`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from synthetic.mixture import _numpy
from synthetic.problem import Behavior, Problem

__all__ = ["behavior_statistics", "problem_statistics", "fit_gaussian"]

COLUMNS = ["behavior", "n_pos", "n_neg", "distinguishability", "concentration", "trace",
           "mean_norm"]


def _moments(x: np.ndarray):
    mean = x.mean(axis=0)
    cov = np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1]) if len(x) > 1 else (
        np.zeros((x.shape[1], x.shape[1])))
    return mean, cov


def fit_gaussian(features, signs, behavior, names, *, family: str = "gaussian") -> Problem:
    """The Gaussian (or other family) problem with the sample's moments.

    Per behavior: ``μ̂±`` and ``Σ̂±`` of the positive and negative statements,
    weight = share of statements, pos_fraction = share of positives. Used to
    draw the analytic prediction over measured (e.g. LLM) dynamics.
    """
    x = _numpy(features).astype(np.float64)
    s = _numpy(signs)
    b = _numpy(behavior)
    behaviors = []
    for index, name in enumerate(names):
        mask = b == index
        pos, neg = x[mask & (s > 0)], x[mask & (s < 0)]
        if len(pos) < 2 or len(neg) < 2:
            raise ValueError(
                f"behavior {name!r} needs >= 2 positive and >= 2 negative statements to fit "
                f"(has {len(pos)} and {len(neg)})"
            )
        (mu_p, cov_p), (mu_n, cov_n) = _moments(pos), _moments(neg)
        behaviors.append(Behavior(name, mu_p, mu_n, cov_p, cov_n, weight=float(mask.mean()),
                                  pos_fraction=len(pos) / mask.sum()))
    return Problem(tuple(behaviors), family=family)


def _row(behavior: Behavior, n_pos, n_neg) -> dict:
    return dict(
        behavior=behavior.name, n_pos=n_pos, n_neg=n_neg,
        distinguishability=behavior.distinguishability, concentration=behavior.concentration,
        trace=behavior.trace,
        mean_norm=float(np.linalg.norm((behavior.mu_pos + behavior.mu_neg) / 2)),
    )


def behavior_statistics(features, signs, behavior, names) -> pd.DataFrame:
    """Per behavior: counts, ``‖μ̂⁺−μ̂⁻‖``, ``max‖Σ̂±‖_op``, ``max tr Σ̂±``, ``‖(μ̂⁺+μ̂⁻)/2‖``."""
    fitted = fit_gaussian(features, signs, behavior, names)
    s, b = _numpy(signs), _numpy(behavior)
    return pd.DataFrame(
        [_row(beh, int(((b == i) & (s > 0)).sum()), int(((b == i) & (s < 0)).sum()))
         for i, beh in enumerate(fitted.behaviors)],
        columns=COLUMNS,
    )


def problem_statistics(problem: Problem) -> pd.DataFrame:
    """The same table from a problem's parameters (population values)."""
    return pd.DataFrame([_row(b, np.nan, np.nan) for b in problem.behaviors], columns=COLUMNS)
