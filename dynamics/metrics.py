"""The metrics both solvers report, and their tidy table.

Per step and per behavior (TRL's names where TRL has one):

====================  =========================================================
loss                  mean objective ``ℓ(h)``
accuracy              policy ranking accuracy: ``log π(y_w) > log π(y_l)``,
                      i.e. ``s (u0 + Δ)ᵀ g > 0`` (what Im & Li's code reports)
reward_accuracy       implicit-reward accuracy, TRL's ``rewards/accuracies``:
                      ``h = s Δᵀg > 0`` (a reward head's: ``r(y_w) > r(y_l)``)
clean_accuracy        ranking accuracy against the true preference, before
                      label noise (equal to ``accuracy`` without noise)
weight_change         ``‖W − W0‖_F = ‖Δ‖/√2`` (shared by all behaviors)
rewards/chosen        ``β (log π(y_w) − log π_0(y_w))``
rewards/rejected      ``β (log π(y_l) − log π_0(y_l))``
rewards/margins       ``β h``
====================  =========================================================

Ties (a margin of exactly 0, e.g. every statement at step 0 for
``reward_accuracy``) count one half, so both accuracies are 0.5 for a policy
that cannot tell the answers apart; TRL counts ties as wrong.

:func:`pair_metrics` is the one definition of these per example, from the
chosen and rejected log-probabilities (or a reward head's rewards); the real-LLM
probes call it, the simulation's evaluator computes the same quantities from
its margins (fast paths, checked against a naive per-example reference for every
objective in ``tests/test_registry.py``), and the population flow takes their
expectations in closed form.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

__all__ = ["METRICS", "BEHAVIOR_METRICS", "RL_METRICS", "RUN_STATISTICS", "HELDOUT_METRICS",
           "tidy_frame",
           "tie_half", "pair_metrics"]

BEHAVIOR_METRICS = ("loss", "accuracy", "reward_accuracy", "rewards/chosen", "rewards/rejected",
                    "rewards/margins", "clean_accuracy")
RL_METRICS = ("objective/kl", "objective/scores", "objective/rlhf_reward")
"""Per behavior where the solver has them (NaN elsewhere): the policy's ``KL(π ‖ π0)``
(every objective that trains all rows), and with a reward head ``E_π[r]`` and
``E_π[r] − β KL``: TRL's PPO names, taken exactly over the answers."""
RUN_STATISTICS = ("policy/clipfrac", "policy/approxkl", "loss/value", "val/ratio",
                  "val/ratio_var", "objective/kl_coef", "pretrain/loss")
"""Per run: a sampled estimator's update statistics (TRL's PPO names), and, with a
pretraining distribution, the alignment tax ``E_pretrain[−log π(y|g)]`` (NaN elsewhere)."""
HELDOUT_METRICS = ("loss", "accuracy", "reward_accuracy", "clean_accuracy", "objective/kl",
                   "objective/rlhf_reward")
"""Also reported on a held-out sample (``train.heldout_n``) as ``heldout/<metric>``; for
the theory they are the population's own (the expectation on unseen data)."""
METRICS = (BEHAVIOR_METRICS[:3] + ("weight_change",) + BEHAVIOR_METRICS[3:] + RL_METRICS
           + RUN_STATISTICS + tuple(f"heldout/{m}" for m in HELDOUT_METRICS))


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
    per_run: dict[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """One row per seed × run × step × behavior.

    steps (E,) · lr, beta (P,) · seeds: S entries (``None`` for theory)
    per_behavior[metric] (E, S, P, K) · weight_change and per_run[statistic] (E, S, P).
    A metric a solver does not report is NaN.
    """
    per_run = per_run or {}
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
        if name == "weight_change":
            values = weight_change[ei, si, pi]
        elif name in per_run:
            values = per_run[name][ei, si, pi]
        elif name in per_behavior:
            values = per_behavior[name][ei, si, pi, ki]
        elif source == "theory" and name.startswith("heldout/") and name[8:] in per_behavior:
            values = per_behavior[name[8:]][ei, si, pi, ki]  # the population is unseen data
        else:
            values = np.full(len(ei), np.nan)
        frame[name] = np.asarray(values, dtype=np.float64)
    return frame


def tie_half(x: torch.Tensor) -> torch.Tensor:
    """``1[x > 0] + ½·1[x = 0]``, elementwise: correctness with ties counted half."""
    return (x > 0).to(x.dtype) + 0.5 * (x == 0).to(x.dtype)


def pair_metrics(*, loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards,
                 agree=None) -> dict:
    """Every per-behavior metric, per example (the caller averages).

    ``chosen_logps``, ``rejected_logps``: ``log π(y_w)``, ``log π(y_l)`` (only their
    difference is used: the ranking); ``chosen_rewards``, ``rejected_rewards``: the
    rewards of the two answers (``β(log π − log π0)`` for a policy, ``r(y)`` for a
    reward head); ``loss``: the objective's loss; ``agree``: ``s_true·s`` (±1, default
    1), whether the observed preference is the true one. All ``(..., n)``.
    """
    ranking = chosen_logps - rejected_logps
    margins = chosen_rewards - rejected_rewards
    return {
        "loss": loss,
        "accuracy": tie_half(ranking),
        "reward_accuracy": tie_half(margins),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": margins,
        "clean_accuracy": tie_half(ranking if agree is None else agree * ranking),
    }

