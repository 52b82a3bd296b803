"""Tolerances, the Hypothesis profile, and comparison helpers shared by every test.

Tolerances are named by the *kind* of comparison and defined here once; a test
never writes a bare ``1e-9``. Each is relative to the natural magnitude of the
compared quantity (``|a − b| ≤ tol · (1 + |b|)``, see :func:`assert_close`).

=====================  ======================================================
CLOSED_FORM            two float64 evaluations of the same exact expression in a
                       different order of operations (rounding only)
EXACT_CONSTRUCTION     a builder that constructs a quantity exactly (eigh / Cholesky
                       of a small matrix): rounding of a few flops
QUADRATURE             the flow's projection quadrature against scipy's adaptive
                       ``quad``, inside the claimed range (QUADRATURE_SPREAD)
QMC                    scrambled Sobol integration (8192 points), the "about 1e-4"
                       stated in dynamics/analytic.py
FLOAT32                float32 against float64 of the same computation
FINITE_DIFFERENCE      a one-sided difference quotient against a derivative
BOUND_SLACK            a proven inequality checked in float64 arithmetic
Z_SCORE                Monte Carlo: |estimate − truth| ≤ Z_SCORE · sd / √n
LM_HEAD_IDENTITY       lm_head(g) against the model's own last-position logits,
                       float32, left-padded batch (absolute, logit units)
=====================  ======================================================

Hypothesis: the ``ci`` profile (default) is derandomized, so every run of the
suite draws the same examples; ``HYPOTHESIS_PROFILE=dev`` explores afresh.
Every property test sets its own ``max_examples`` so that the whole suite fits
the CI budget (6 minutes on 2 cores).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from hypothesis import HealthCheck, settings

CLOSED_FORM = 1e-10
EXACT_CONSTRUCTION = 1e-12
QUADRATURE = 1e-8
QMC = 1e-4
FLOAT32 = 1e-5
FINITE_DIFFERENCE = 1e-6
BOUND_SLACK = 1e-9
Z_SCORE = 5.0
LM_HEAD_IDENTITY = 1e-4

# Largest logit spread β·sd(Δᵀg) of one component up to which the flow's
# projection quadrature is held to QUADRATURE (dynamics/analytic.py states
# ~1e-12 below 30, ~1e-8 at 50); measured against scipy quad (and mpmath): drift
# error ≤ 2e-13 up to 20, 4e-9 at 40, 5e-8 at 50, 7e-6 at 80.
QUADRATURE_SPREAD = 30.0

# One intra-op thread: the tests' tensors are small, and with torch's default
# (one thread per core) any other load on the machine — a second xdist worker, a
# benchmark — makes each tiny op wait on a descheduled thread. Measured on the
# 2-core box with one busy core: tests/test_bounds.py + test_agreement.py take
# 290 s with 2 threads, 25 s with 1.
torch.set_num_threads(1)

settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def mc_tolerance(sd, n: int, z: float = Z_SCORE):
    """Monte Carlo bound ``z · sd / √n`` for a mean of ``n`` draws with standard
    deviation ``sd`` (array or number)."""
    return z * np.asarray(sd, dtype=np.float64) / math.sqrt(n)


def assert_close(actual, expected, tol: float, *, scale=None, err_msg: str = ""):
    """``|actual − expected| ≤ tol · (scale or 1 + |expected|)`` elementwise."""
    actual = _np(actual)
    expected = _np(expected)
    scale = 1.0 + np.abs(expected) if scale is None else _np(scale)
    excess = np.abs(actual - expected) - tol * scale
    if np.any(excess > 0) or not (np.all(np.isfinite(actual)) and np.all(np.isfinite(expected))):
        worst = np.unravel_index(np.argmax(excess), np.shape(excess)) if np.ndim(excess) else ()
        raise AssertionError(
            f"{err_msg} not within tol={tol:g} (scaled): worst at {worst}: "
            f"actual={np.asarray(actual)[worst]!r} expected={np.asarray(expected)[worst]!r}\n"
            f"actual={actual!r}\nexpected={expected!r}"
        )


def assert_leq(small, big, tol: float = BOUND_SLACK, *, scale=None, err_msg: str = ""):
    """``small ≤ big + tol · scale`` elementwise (a proven inequality, in floats)."""
    small, big = np.broadcast_arrays(_np(small), _np(big))
    scale = 1.0 + np.abs(big) if scale is None else np.broadcast_to(_np(scale), big.shape)
    excess = small - big - tol * scale
    if np.any(excess > 0) or not (np.all(np.isfinite(small)) and np.all(np.isfinite(big))):
        worst = np.unravel_index(np.argmax(excess), excess.shape)
        raise AssertionError(
            f"{err_msg} bound violated at {worst}: {small[worst]!r} > {big[worst]!r} "
            f"(excess {excess[worst]:.3g})"
        )


def _np(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def run_shrunk_sweeps(root, configs: dict, shrunk: dict) -> dict:
    """Run figure sweeps shrunk for tests: ``configs`` maps a config's stem to its path,
    ``shrunk`` maps it to ``(text substitutions, grids, overrides, seeds)`` (the
    substitutions reach values a ``--set`` cannot, e.g. steps inside swept phase
    tables); returns each stem's loaded sweep."""
    from dynamics.sweep import load_plan, load_sweep, run_sweep

    assert sorted(configs) == sorted(shrunk)
    out = {}
    for stem, (subs, grids, overrides, seeds) in shrunk.items():
        text = configs[stem].read_text(encoding="utf-8")
        for old, new in subs.items():
            assert old in text, (stem, old)
            text = text.replace(old, new)
        plan = load_plan(configs[stem], grids=grids, seeds=seeds, overrides=overrides, text=text)
        report = run_sweep(plan, root / stem, jobs=1, threads=1, progress=False)
        assert not report.failed and not report.missing, report.failed
        out[stem] = load_sweep(root / stem)
    return out
