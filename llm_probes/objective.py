"""The DPO objective of a probe on single-token answers, and its metrics per statement.

The reference log-probabilities ``log π_0`` are those of the model before training,
computed once under ``torch.no_grad`` (the policy *is* the reference at step 0, so
every margin is 0 and the loss is log 2 there). The DPO loss (Rafailov et al. 2023,
eq. 7) is :func:`dynamics.objectives.dpo_loss`, evaluated in float64 on the ``(B,)``
log-probabilities (:func:`single_token_dpo_loss`). :func:`statement_metrics` gives
every name of :data:`METRICS` per statement, :func:`behavior_rows` their means per
behavior, :func:`feature_statistics` the statistics of ``g(x)`` per behavior.

Log-probabilities come in pairs ``(n, 2)`` = (log π(Yes), log π(No)), with the
statements' signs ``(n,)`` (+1: ``y_w = Yes``); :func:`chosen_rejected` picks
``(y_w, y_l)``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from dynamics.metrics import pair_metrics
from dynamics.objectives import dpo_loss
from synthetic.statistics import behavior_statistics

__all__ = ["METRICS", "single_token_dpo_loss", "chosen_rejected", "statement_metrics",
           "behavior_rows", "feature_statistics"]

METRICS = ("loss", "accuracy", "reward_accuracy", "rewards/chosen", "rewards/rejected",
           "rewards/margins", "logps/chosen", "logps/rejected")
"""Per step and behavior, the names of :mod:`dynamics.metrics` (ties count one half)
plus the mean chosen and rejected log-probabilities (TRL's ``logps/*``)."""


def single_token_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                          ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
                          beta: float) -> torch.Tensor:
    """DPO loss per statement for single-token answers, unreduced.

    .. math::
        ℓ = −\\log σ\\big(β\\,[(\\log π(y_w|x) − \\log π_0(y_w|x))
                               − (\\log π(y_l|x) − \\log π_0(y_l|x))]\\big)

    (Rafailov et al. 2023, eq. 7) — :func:`dynamics.objectives.dpo_loss`; the four
    arguments are ``(B,)`` log-probabilities of the answer tokens (``y_w``/``y_l``
    chosen by the statement's sign, :func:`chosen_rejected`). ``beta > 0``.
    """
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, beta=beta)


def chosen_rejected(logps: torch.Tensor, signs: torch.Tensor):
    """``(chosen, rejected)``, each ``(B,)``, from ``logps (B, 2)`` = (log π(Yes),
    log π(No)) and ``signs (B,)``: ``y_w = Yes`` where ``s > 0``, else ``No``."""
    yes, no = logps.unbind(-1)
    positive = signs.to(logps.device) > 0
    return torch.where(positive, yes, no), torch.where(positive, no, yes)


def statement_metrics(logps: torch.Tensor, ref: torch.Tensor, signs: torch.Tensor, *,
                      beta: float) -> dict[str, np.ndarray]:
    """Per statement (float64): every name in :data:`METRICS`, by
    :func:`dynamics.metrics.pair_metrics` (the definitions the dynamics report).

    ``logps``, ``ref`` (n, 2) = log π(Yes), log π(No) of the policy and reference;
    ``signs (n,)``. ``accuracy`` = 1[log π(y_w) > log π(y_l)], ``reward_accuracy`` =
    1[h > 0], ties one half.
    """
    chosen, rejected = chosen_rejected(logps.double(), signs)
    ref_chosen, ref_rejected = chosen_rejected(ref.double(), signs)
    values = pair_metrics(
        loss=single_token_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta),
        chosen_logps=chosen, rejected_logps=rejected,
        chosen_rewards=beta * (chosen - ref_chosen),
        rejected_rewards=beta * (rejected - ref_rejected))
    values.update({"logps/chosen": chosen, "logps/rejected": rejected})
    return {k: values[k].detach().cpu().numpy() for k in METRICS}


def behavior_rows(values: dict[str, np.ndarray], codes: np.ndarray, names: list[str],
                  **fields) -> list[dict]:
    """One row per behavior: the mean of each per-statement metric, ``n``, and
    ``fields`` (step, source, ...)."""
    rows = []
    for code, name in enumerate(names):
        mask = codes == code
        if not mask.any():
            continue
        row = dict(fields, behavior=name, n=int(mask.sum()))
        row.update({k: float(v[mask].mean()) for k, v in values.items()})
        rows.append(row)
    return rows


def feature_statistics(hidden: torch.Tensor, signs, codes: np.ndarray, names: list[str],
                       **fields) -> pd.DataFrame:
    """:func:`synthetic.statistics.behavior_statistics` of ``g(x)`` (n, d), with
    ``fields`` as constant columns. Behaviors with fewer than 2 statements of a sign
    are left out."""
    signs = np.asarray(signs, dtype=np.float64)
    keep = [i for i, _ in enumerate(names)
            if ((codes == i) & (signs > 0)).sum() >= 2 and ((codes == i) & (signs < 0)).sum() >= 2]
    if not keep:
        return pd.DataFrame()
    mask = np.isin(codes, keep)
    remap = {c: j for j, c in enumerate(keep)}
    frame = behavior_statistics(hidden.double().numpy()[mask], signs[mask],
                                np.array([remap[c] for c in codes[mask]]),
                                [names[i] for i in keep])
    for key, value in fields.items():
        frame.insert(0, key, value)
    return frame
