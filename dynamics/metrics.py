"""The metrics both solvers report, and their tidy table.

Per step and per behavior (TRL's names where TRL has one):

====================  =========================================================
loss                  mean objective ``ℓ(h)``
accuracy              policy ranking accuracy: ``log π(y_w) > log π(y_l)``,
                      i.e. ``s (u0 + Δ)ᵀ g > 0`` (what Im & Li's code reports)
reward_accuracy       implicit-reward accuracy, TRL's ``rewards/accuracies``:
                      ``h = s Δᵀg > 0``
weight_change         ``‖W − W0‖_F = ‖Δ‖/√2`` (shared by all behaviors)
rewards/chosen        ``β (log π(y_w) − log π_0(y_w))``
rewards/rejected      ``β (log π(y_l) − log π_0(y_l))``
rewards/margins       ``β h``
====================  =========================================================

Ties (a margin of exactly 0, e.g. every statement at step 0 for
``reward_accuracy``) count one half, so both accuracies are 0.5 for a policy
that cannot tell the answers apart; TRL counts ties as wrong.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = ["METRICS", "BEHAVIOR_METRICS", "tidy_frame", "tie_half"]

BEHAVIOR_METRICS = ("loss", "accuracy", "reward_accuracy", "rewards/chosen", "rewards/rejected",
                    "rewards/margins")
METRICS = BEHAVIOR_METRICS[:3] + ("weight_change",) + BEHAVIOR_METRICS[3:]


def tidy_frame(
    *,
    source: str,
    steps: np.ndarray,
    lr: np.ndarray,
    beta: np.ndarray,
    seeds: list[int | None],
    names: tuple[str, ...],
    per_behavior: dict[str, np.ndarray],
    weight_change: np.ndarray,
) -> pd.DataFrame:
    """One row per seed × run × step × behavior.

    steps (E,) · lr, beta (P,) · seeds: S entries (``None`` for theory)
    per_behavior[metric] (E, S, P, K) · weight_change (E, S, P).
    """
    e, s, p, k = per_behavior["loss"].shape
    grid = np.meshgrid(np.arange(e), np.arange(s), np.arange(p), np.arange(k), indexing="ij")
    ei, si, pi, ki = (g.ravel() for g in grid)
    seed_values = pd.array([seeds[i] for i in si], dtype="Int64")
    frame = pd.DataFrame({
        "source": pd.Categorical([source] * len(ei), categories=["theory", "simulation"]),
        "seed": seed_values,
        "run": pi.astype(np.int64),
        "beta": beta[pi].astype(np.float64),
        "lr": lr[pi].astype(np.float64),
        "step": steps[ei].astype(np.int64),
        "t": (lr[pi] * steps[ei]).astype(np.float64),
        "behavior": pd.Categorical(np.asarray(names, dtype=object)[ki], categories=list(names)),
    })
    for name in METRICS:
        values = weight_change[ei, si, pi] if name == "weight_change" else (
            per_behavior[name][ei, si, pi, ki])
        frame[name] = np.asarray(values, dtype=np.float64)
    return frame


def tie_half(x: torch.Tensor) -> torch.Tensor:
    """``1[x > 0] + ½·1[x = 0]``, elementwise: correctness with ties counted half."""
    return (x > 0).to(x.dtype) + 0.5 * (x == 0).to(x.dtype)
