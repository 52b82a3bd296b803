"""Figure of the ``finetune`` probe: full or LoRA DPO of a real LLM.

Left and middle: the DPO loss and the ranking accuracy of every behavior against
step on all train statements (solid), with the test statements at the
first and last step (markers) and the implicit-reward accuracy (thin dashed). Right:
the distinguishability ``‖μ̂⁺ − μ̂⁻‖`` of the features ``g(x)`` (train statements)
before and after training, per behavior. A function of the stored tables
``finetune.parquet`` and ``finetune_features.parquet`` only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from figures.style import FORMATS, palette, plt, save, theme

__all__ = ["plot", "draw"]

FILENAME = "finetune"


def draw(frame: pd.DataFrame, features: pd.DataFrame, path: str | Path, *,
         formats=FORMATS) -> list[Path]:
    """Draw the tables to ``path`` + each suffix of ``formats``."""
    theme()
    names = list(frame["behavior"].cat.categories if hasattr(frame["behavior"], "cat")
                 else pd.unique(frame["behavior"]))
    colours = palette(names)
    train = frame[frame["source"] == "train"]
    test = frame[frame["source"] == "test"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0), layout="constrained")
    for ax, metric, label in ((axes[0], "loss", "DPO loss"),
                              (axes[1], "accuracy", "ranking accuracy")):
        for name in names:
            curve = train[train["behavior"] == name]
            ax.plot(curve["step"], curve[metric], color=colours[name], lw=1.4, label=name)
            held = test[test["behavior"] == name]
            ax.plot(held["step"], held[metric], "o", color=colours[name], ms=5, mfc="white")
            if metric == "accuracy":
                ax.plot(curve["step"], curve["reward_accuracy"], color=colours[name], lw=0.8,
                        ls="--")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    axes[0].axhline(np.log(2), color="0.5", lw=0.8, ls=":")
    axes[0].plot([], [], "o", color="0.3", mfc="white", label="test statements")
    axes[1].plot([], [], color="0.3", lw=0.8, ls="--", label="reward accuracy")
    axes[1].legend(fontsize=7, loc="best")
    axes[0].legend(fontsize=7, loc="best")
    feats = features[features["split"] == "train"] if "split" in features else features
    x = np.arange(len(names))
    width = 0.38
    for offset, stage, shade in ((-width / 2, "before", 0.55), (width / 2, "after", 1.0)):
        values = [feats[(feats["behavior"] == n) & (feats["stage"] == stage)][
            "distinguishability"].mean() for n in names]
        axes[2].bar(x + offset, values, width, color=[colours[n] for n in names],
                    alpha=shade, label=stage)
    axes[2].set_xticks(x, [n if len(n) < 24 else n[:23] + "…" for n in names], rotation=20,
                       ha="right", fontsize=7)
    axes[2].set_ylabel("distinguishability ‖μ̂⁺ − μ̂⁻‖ of g(x)")
    axes[2].legend(fontsize=7, title="training", title_fontsize=7)
    row = frame.iloc[0]
    fig.suptitle(f"{row.get('method', '?')} DPO ({row.get('optimizer', '?')}, lr "
                 f"{row.get('lr', float('nan')):g}, β {row.get('beta', float('nan')):g}, "
                 f"completion {row.get('completion', '?')})", fontsize=10)
    return save(fig, Path(path), formats=formats)


def plot(out: str | Path, *, formats=("png",)) -> list[Path]:
    """Read ``out``'s tables and write ``out/finetune.png``."""
    out = Path(out)
    return draw(pd.read_parquet(out / "finetune.parquet"),
                pd.read_parquet(out / "finetune_features.parquet"), out / FILENAME,
                formats=formats)
