"""Figure of the ``features`` probe on multi-token preference pairs (``--pairs``).

Left: each pair's log-likelihood margin ``log π(y_w|x) − log π(y_l|x)`` under the model
against the distance ``‖ḡ_w − ḡ_l‖`` between its responses' mean scoring states.
Right: the margin per response token against the responses' lengths' difference.
A function of the stored ``pair_features.parquet`` and its summary only.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from figures.style import FORMATS, plt, save, theme

__all__ = ["plot"]


def plot(table: pd.DataFrame, summary: dict, path: str | Path,
         formats=FORMATS) -> list[Path]:
    """Draw ``table`` (``pair_features.parquet``) to ``path`` + each suffix of ``formats``."""
    theme()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    left.scatter(table.mean_distance, table.logp_margin, s=8, alpha=0.5, color="C0")
    left.axhline(0, color="0.5", lw=0.8)
    left.set_xlabel("‖ḡ_w − ḡ_l‖ (mean scoring states of the two responses)")
    left.set_ylabel("log π(y_w|x) − log π(y_l|x)")
    left.set_title(f"{len(table)} pairs; the model prefers y_w on "
                   f"{summary['reference_accuracy']:.0%}; chosen vs rejected "
                   f"distinguishability {summary['distinguishability']:.3f}", fontsize=9)
    per_token = (table.logp_chosen / table.chosen_tokens
                 - table.logp_rejected / table.rejected_tokens)
    right.scatter(table.chosen_tokens - table.rejected_tokens, per_token, s=8, alpha=0.5,
                  color="C1")
    right.axhline(0, color="0.5", lw=0.8)
    right.set_xlabel("chosen − rejected response tokens")
    right.set_ylabel("difference of mean log π per token")
    right.set_title(summary["tokens"], fontsize=7, wrap=True)
    return save(fig, path, formats=formats)
