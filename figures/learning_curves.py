"""Loss and accuracy against time per behavior: simulation bands, theory dashed.

A function of a stored tidy metrics table (``metrics.parquet``) only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from figures.style import THEORY_STYLE, palette, plt, save, sns

__all__ = ["plot_learning_curves"]

LABELS = {"loss": "DPO loss", "accuracy": "ranking accuracy",
          "reward_accuracy": "implicit-reward accuracy", "weight_change": "‖W − W₀‖_F"}


def plot_learning_curves(frame: pd.DataFrame, path: str | Path, *,
                         metrics: Sequence[str] = ("loss", "accuracy", "reward_accuracy"),
                         formats=("png",), title: str | None = None) -> list[Path]:
    """One panel per metric against ``t = lr·step``; a colour per behavior.

    Simulation: mean over seeds with a ±1 sd band; theory (population
    prediction): dashed line on top. Returns the written files.
    """
    names = list(frame["behavior"].cat.categories if hasattr(frame["behavior"], "cat")
                 else pd.unique(frame["behavior"]))
    colours = palette(names)
    sim = frame[frame["source"] == "simulation"]
    theory = frame[frame["source"] == "theory"]
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        sns.lineplot(data=sim, x="t", y=metric, hue="behavior", hue_order=names,
                     palette=colours, errorbar="sd", ax=ax, legend=ax is axes[0][0], lw=1.2)
        for name in names:
            curve = theory[theory["behavior"] == name]
            if len(curve):
                ax.plot(curve["t"], curve[metric], color=colours[name], **THEORY_STYLE)
        ax.set_xlabel("t = lr · step")
        ax.set_ylabel(LABELS.get(metric, metric))
    if len(theory):
        axes[0][0].plot([], [], color="0.2", **THEORY_STYLE, label="theory (population)")
        axes[0][0].plot([], [], color="0.2", lw=1.2, label="simulation (mean ± sd)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[0][0].get_legend().remove()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9,
               frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path, formats=formats)
