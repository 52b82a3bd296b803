"""Shared look of prefdyn figures: theory dashed and dark over measured bands."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never require a display
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

__all__ = ["plt", "sns", "palette", "save", "THEORY_STYLE"]

THEORY_STYLE = dict(linestyle="--", linewidth=1.6, alpha=0.95)


def palette(names) -> dict:
    """One colour per behavior, stable across figures."""
    return dict(zip(names, sns.color_palette("colorblind", n_colors=max(len(names), 3))))


def save(fig, path: str | Path, *, formats=("png",)) -> list[Path]:
    """Save ``fig`` as ``path`` with each suffix in ``formats``; returns the paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix in formats:
        target = path.with_suffix(f".{suffix}")
        fig.savefig(target, dpi=150, bbox_inches="tight")
        written.append(target)
    plt.close(fig)
    return written
