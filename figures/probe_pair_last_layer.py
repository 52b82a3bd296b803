"""Figure of ``prefdyn probe last-layer --pairs``: whole-output-layer DPO on frozen states.

Left: the mean change of ``log π(y_w)`` and ``log π(y_l)`` from the start, train
(solid) and held-out (dashed) pairs, against the step. Middle: every response's
predicted one-step change (Ren & Sutherland's decomposition) against the measured
change, at the first and the last recorded step. Right: the relative error of the
prediction, ``‖measured − predicted‖ / ‖measured‖`` over the responses, per step.
A function of the stored ``pair_last_layer.parquet``, ``pair_last_layer_changes.parquet``
and the summary only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from figures.style import FORMATS, plt, save, theme

__all__ = ["plot"]


def plot(curves: pd.DataFrame, changes: pd.DataFrame, summary: dict, path: str | Path,
         formats=FORMATS) -> list[Path]:
    """Draw the probe's tables to ``path`` + each suffix of ``formats``."""
    theme()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.3), layout="constrained")
    steps = curves.iloc[:-1] if len(curves) > 1 else curves
    for role, color in (("chosen", "C0"), ("rejected", "C3")):
        for split, style in (("train", "-"), ("test", "--")):
            column = f"{split}_{role}_change"
            if column in steps and steps[column].notna().any():
                left.plot(steps.step, steps[column], style, color=color,
                          label=f"log π(y_{'w' if role == 'chosen' else 'l'}), {split}")
    left.axhline(0, color="0.5", lw=0.8)
    left.set_xlabel("step")
    left.set_ylabel("mean change of log π from the start")
    left.set_title(f"loss {curves.loss.iloc[0]:.3f} → {summary['final_loss']:.3f}; "
                   f"log π(y_w) fell on {summary['train_chosen_fell']:.0%} of train pairs",
                   fontsize=9)
    left.legend(fontsize=8)

    recorded = sorted(changes.step.unique())
    for step, marker in zip([recorded[0], recorded[-1]], ("o", "x")):
        part = changes[changes.step == step]
        for role, color in (("chosen", "C0"), ("rejected", "C3")):
            rows = part[part.role == role]
            middle.scatter(rows.measured, rows.predicted, s=14, marker=marker, color=color,
                           alpha=0.6, label=f"{role}, step {step}")
    span = np.abs(changes[["measured", "predicted"]].to_numpy()).max()
    middle.plot([-span, span], [-span, span], color="0.5", lw=0.8)
    middle.set_xlabel("measured change of log π(y|x) in one step")
    middle.set_ylabel("predicted: −η Σ A K G (first order)")
    middle.set_title("one-step prediction, every response", fontsize=9)
    middle.legend(fontsize=7)

    for split, style in (("train", "-"), ("test", "--")):
        column = f"{split}_prediction_error"
        if steps[column].notna().any():
            right.semilogy(steps.step, steps[column], style, color="C2", label=split)
    right.set_xlabel("step")
    right.set_ylabel("‖measured − predicted‖ / ‖measured‖")
    right.set_title(f"lr {summary['lr']:.3g} = {summary['lr_fraction_of_limit']:.2f} × the "
                    f"Gauss–Newton limit; β = {summary['beta']:g}", fontsize=9)
    right.legend(fontsize=8)
    return save(fig, path, formats=formats)
