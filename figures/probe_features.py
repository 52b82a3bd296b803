"""Figure of the ``features`` probe: per-behavior statistics of a real LLM's ``g(x)``.

Left: preference distinguishability ``‖μ̂⁺ − μ̂⁻‖`` against concentration
``max‖Σ̂±‖_op``, one labelled point per behavior, coloured by the reference model's
own ranking accuracy. Right: the behaviors sorted by distinguishability, with
``√(max tr Σ̂±)`` (the spread over all directions) for scale. A function of the
stored table ``features_stats.parquet`` only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from figures.style import FORMATS, plt, save, sns, theme

__all__ = ["plot"]

LABEL_CHARS = 34  # behavior names are cut to this many characters on the plot


def _short(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[:LABEL_CHARS - 1] + "…"


def plot(stats: pd.DataFrame, path: str | Path, *, lm_head_diff: float | None = None,
         formats=FORMATS) -> list[Path]:
    """Draw ``stats`` (``features_stats.parquet``) to ``path`` + each suffix of ``formats``."""
    theme()
    stats = stats.sort_values("distinguishability").reset_index(drop=True)
    k = len(stats)
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, max(4.0, 0.25 * k + 1.5)),
                                   gridspec_kw={"width_ratios": [1.1, 1]}, layout="constrained")
    hue = "reference_accuracy" if "reference_accuracy" in stats else None
    sns.scatterplot(data=stats, x="concentration", y="distinguishability", hue=hue,
                    palette="viridis" if hue else None, s=45, ax=ax, legend=bool(hue))
    for _, row in stats.iterrows():
        ax.annotate(_short(str(row["behavior"])), (row["concentration"],
                                                   row["distinguishability"]),
                    xytext=(4, 2), textcoords="offset points", fontsize=6.5, color="0.2")
    ax.set_xlabel("concentration  max ‖Σ̂±‖_op")
    ax.set_ylabel("distinguishability  ‖μ̂⁺ − μ̂⁻‖")
    if hue:
        ax.legend(title="reference\naccuracy", fontsize=7, title_fontsize=7, loc="best")
    ax.set_title("persona behaviors: signal against spread", fontsize=10)

    y = np.arange(k)
    bars.barh(y, stats["distinguishability"], color=sns.color_palette("flare", k), alpha=0.9,
              label="‖μ̂⁺ − μ̂⁻‖")
    bars.plot(np.sqrt(stats["trace"]), y, "k|", markersize=8, label="√(max tr Σ̂±)")
    bars.set_yticks(y, [_short(str(b)) for b in stats["behavior"]], fontsize=7)
    bars.set_xlabel("norm")
    bars.legend(fontsize=7, loc="lower right")
    model = stats["model"].iloc[0] if "model" in stats else "model"
    n = int(stats["n_pos"].sum() + stats["n_neg"].sum())
    title = f"{model}: g(x) of {n} train statements, {k} behaviors"
    if lm_head_diff is not None:
        title += f"; max |lm_head(g) − logits| = {lm_head_diff:.1e}"
    fig.suptitle(title, fontsize=10)
    return save(fig, Path(path), formats=formats)
