"""Figures of ``prefdyn probe rlhf``: reward model, RL from it, and DPO, on a real model.

Persona statements (:func:`plot`): left, the KL to the reference reached along the way
by DPO and by RL (measured: solid; the Gaussian fit's population flow: dashed); middle,
RL's distance to DPO's endpoint (its own optimum when the reward model was trained at
step ``β²·lr``); right, the reward model's held-out accuracy against its number of
training statements, with 95% intervals over random subsets and the population value.

Pairs (:func:`plot_pairs`): the mean margin of DPO and RL against the step with RL's
optimum ``Δr/β``, the KL on the pairs' two responses, and the reward model's curve.
Functions of the stored tables only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from figures.style import FORMATS, plt, save, theme

__all__ = ["plot", "plot_pairs"]


def _reward_curve(ax, learning: pd.DataFrame, label_by: str | None = None) -> None:
    groups = learning.groupby(label_by) if label_by else [("", learning)]
    for j, (name, part) in enumerate(groups):
        part = part.sort_values("n")
        err = np.vstack([part.test_accuracy - part.ci_low, part.ci_high - part.test_accuracy])
        ax.errorbar(part.n, part.test_accuracy, yerr=np.nan_to_num(err), marker="o", ms=4,
                    capsize=3, color=f"C{j}", label=str(name) or None)
        if "population_accuracy" in part:
            ax.axhline(part.population_accuracy.iloc[0], color=f"C{j}", ls=":", lw=0.9)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training samples of the reward model")
    ax.set_ylabel("held-out pair accuracy")
    ax.axhline(0.5, color="0.6", lw=0.8)


def plot(curves: pd.DataFrame, paths: pd.DataFrame, learning: pd.DataFrame,
         summary: pd.DataFrame, path: str | Path, formats=FORMATS) -> list[Path]:
    """Persona behaviors: draw the probe's tables to ``path`` + each suffix."""
    theme()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.3), layout="constrained")
    names = list(dict.fromkeys(summary.behavior))
    for j, name in enumerate(names):
        for method, marker in (("dpo", "-"), ("rlhf", "-.")):
            part = curves[(curves.behavior == name) & (curves.method == method)]
            for source, style in (("simulation", marker), ("theory", ":")):
                rows = part[part.source == source]
                left.plot(rows.step, rows["objective/kl"], style, color=f"C{j}",
                          lw=1.6 if source == "simulation" else 1.0,
                          label=f"{name}, {method}" if source == "simulation" else None)
        for source, style in (("simulation", "-"), ("theory", ":")):
            rows = paths[(paths.behavior == name) & (paths.source == source)]
            middle.semilogy(rows.step, rows.to_dpo_endpoint, style, color=f"C{j}",
                            label=name if source == "simulation" else None)
    left.set_xlabel("step")
    left.set_ylabel("KL(π ‖ π0) on the train statements")
    left.set_title("DPO (solid) and RL from the reward model (dash-dot); theory dotted",
                   fontsize=9)
    left.legend(fontsize=7)
    middle.set_xlabel("RL step")
    middle.set_ylabel("‖Δ_RL − Δ_DPO(T)‖ / ‖Δ_DPO(T)‖")
    middle.set_title("RL's distance to DPO's endpoint, its own optimum (theory dotted)",
                     fontsize=9)
    middle.legend(fontsize=7)
    _reward_curve(right, learning, "behavior")
    right.set_title("reward model ψᵀg: held-out accuracy (population dotted)", fontsize=9)
    right.legend(fontsize=7)
    return save(fig, path, formats=formats)


def plot_pairs(history: pd.DataFrame, learning: pd.DataFrame, summary: dict,
               path: str | Path, formats=FORMATS) -> list[Path]:
    """Pairs: draw the probe's tables to ``path`` + each suffix of ``formats``."""
    theme()
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.3), layout="constrained")
    for method, color in (("dpo", "C0"), ("rlhf", "C3")):
        rows = history[history.method == method]
        left.plot(rows.step, rows.margin, color=color, label=method)
        middle.plot(rows.step, rows.kl, color=color, label=method)
    left.axhline(summary["reward_gap_mean"] / summary["beta"], color="C3", ls=":",
                 label="RL's optimum: mean Δr/β")
    left.set_xlabel("step")
    left.set_ylabel("mean margin Δ_w − Δ_l (train pairs)")
    left.set_title(f"{summary['train_pairs']} train pairs; every output row moves", fontsize=9)
    left.legend(fontsize=8)
    middle.axhline(summary["optimum_kl"], color="C3", ls=":", label="RL's optimum")
    middle.set_xlabel("step")
    middle.set_ylabel("KL on each pair's two responses")
    middle.legend(fontsize=8)
    _reward_curve(right, learning)
    right.set_title(f"reward model ψᵀḡ: held-out accuracy on {summary['test_pairs']} pairs",
                    fontsize=9)
    return save(fig, path, formats=formats)
