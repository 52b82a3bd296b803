"""Figure of the ``misalignment`` probe: flipped-preference DPO of a real LLM from the
base model and from the DPO-aligned one.

Three panels against the step of the flipped phase, all statements against the
flipped labels (train statements): the DPO loss, the flipped ranking accuracy (the
misalignment rate) and the implicit-reward margin ``β·h``. A colour per start, the mean
over behaviors thick and each behavior thin. The fourth panel: the features'
distinguishability at each stage (base, aligned, after each flipped run). A function
of ``misalignment.parquet`` and ``misalignment_features.parquet`` only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from figures.style import plt, save, sns, theme

__all__ = ["plot", "draw", "steps_to"]

FILENAME = "misalignment"
PANELS = (("loss", "DPO loss (flipped labels)"),
          ("accuracy", "flipped accuracy (misalignment)"),
          ("rewards/margins", "margin β·h (flipped)"))


def steps_to(curve: pd.DataFrame, threshold: float, metric: str = "accuracy") -> float:
    """The first step at which ``metric`` reaches ``threshold`` (NaN if never)."""
    hit = curve[curve[metric] >= threshold]
    return float(hit["step"].min()) if len(hit) else float("nan")


def draw(frame: pd.DataFrame, features: pd.DataFrame, path, *, formats=("png",)) -> list[Path]:
    """Draw the tables to ``path`` + each suffix of ``formats``."""
    theme()
    flip = frame[(frame["phase"] == "flip") & (frame["source"] == "train")]
    starts = ["base", "aligned"]
    colours = dict(zip(starts, sns.color_palette("colorblind", 2)))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9), layout="constrained")
    notes = []
    for start in starts:
        part = flip[flip["start"] == start]
        mean = part.groupby("step", observed=True)[[m for m, _ in PANELS]].mean().reset_index()
        for ax, (metric, label) in zip(axes, PANELS):
            for _, curve in part.groupby("behavior", observed=True):
                ax.plot(curve["step"], curve[metric], color=colours[start], lw=0.6, alpha=0.4)
            ax.plot(mean["step"], mean[metric], color=colours[start], lw=2.0,
                    label=f"from {start}")
            ax.set_xlabel("step (flipped phase)")
            ax.set_ylabel(label)
        notes.append(f"{start}: acc ≥ 0.5 at step {steps_to(mean, 0.5):g}")
    axes[0].axhline(np.log(2), color="0.5", lw=0.8, ls=":")
    axes[1].axhline(0.5, color="0.5", lw=0.8, ls=":")
    axes[0].legend(fontsize=8)
    stages = list(features["stage"].cat.categories if hasattr(features["stage"], "cat")
                  else pd.unique(features["stage"]))
    sns.barplot(data=features, x="stage", y="distinguishability", hue="behavior",
                order=stages, ax=axes[3], palette="colorblind")
    axes[3].set_xticks(range(len(stages)), [s.replace(" from ", "\nfrom ") for s in stages],
                       fontsize=7)
    axes[3].set_xlabel("")
    axes[3].set_ylabel("distinguishability of g(x)")
    axes[3].legend(fontsize=6)
    row = frame.iloc[0]
    fig.suptitle(f"{row.get('method', '?')} DPO on flipped preferences, reference = base "
                 f"model; aligned by {row.get('align_steps', '?')} steps; " + "; ".join(notes),
                 fontsize=10)
    return save(fig, Path(path), formats=formats)


def plot(out, *, formats=("png",)) -> list[Path]:
    """Read ``out``'s tables and write ``out/misalignment.png``."""
    out = Path(out)
    return draw(pd.read_parquet(out / "misalignment.parquet"),
                pd.read_parquet(out / "misalignment_features.parquet"), out / FILENAME,
                formats=formats)
