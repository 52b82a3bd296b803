"""Figure of the ``displacement`` probe: likelihood displacement under DPO
(Razin et al. 2024).

Left: mean ``log π(y_w)`` (solid) and ``log π(y_l)`` (dashed) of the train statements
against the step, for statements whose chosen answer is Yes, No, and all. Middle: the
tokens with the largest mean gain of probability at the last prompt position. Right:
each statement's CHES score (Definition 2 with the response answer + EOS, from the
model before training) against its change in ``log π(y_w)``, with Spearman's ρ. A
function of the ``displacement*.parquet`` tables only.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from figures.style import plt, save, sns, theme

__all__ = ["plot", "draw"]

FILENAME = "displacement"
TOKENS_SHOWN = 12


def draw(curves: pd.DataFrame, statements: pd.DataFrame, tokens: pd.DataFrame,
         correlations: pd.DataFrame, path, *, formats=("png",)) -> list[Path]:
    """Draw the tables to ``path`` + each suffix of ``formats``."""
    theme()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
    colours = dict(zip(("both", "Yes", "No"), sns.color_palette("colorblind", 3)))
    everyone = curves[curves["behavior"] == "all"]
    for chosen, curve in everyone.groupby("chosen", observed=True):
        label = "all" if chosen == "both" else f"y_w = {chosen}"
        axes[0].plot(curve["step"], curve["logps/chosen"], color=colours[chosen], lw=1.6,
                     label=f"log π(y_w), {label}")
        axes[0].plot(curve["step"], curve["logps/rejected"], color=colours[chosen], lw=1.0,
                     ls="--")
    axes[0].plot([], [], color="0.3", ls="--", label="log π(y_l)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("mean log-probability")
    axes[0].legend(fontsize=7)
    last = everyone[(everyone["chosen"] == "both")].sort_values("step").iloc[-1]
    axes[0].set_title(f"displaced (log π(y_w) below start) at the end: "
                      f"{last['displaced_fraction']:.0%}", fontsize=9)
    top = tokens[tokens["group"] == "all"].sort_values("rank").head(TOKENS_SHOWN)
    axes[1].barh(range(len(top)), top["mean_increase"], color=sns.color_palette("flare", 1))
    axes[1].set_yticks(range(len(top)), [repr(t) for t in top["token"]], fontsize=7)
    axes[1].invert_yaxis()
    axes[1].set_xlabel("mean gain of p(v | x) at the last prompt position")
    axes[1].set_title("tokens that gain the mass", fontsize=9)
    sns.scatterplot(data=statements, x="ches", y="logp_chosen_change", hue="chosen",
                    palette={k: colours[k] for k in ("Yes", "No")}, s=14, ax=axes[2])
    axes[2].axhline(0, color="0.5", lw=0.8, ls=":")
    axes[2].set_xlabel("CHES (answer + EOS, before training)")
    axes[2].set_ylabel("change of log π(y_w)")
    row = correlations[(correlations["behavior"] == "all") & (correlations["chosen"] == "both")
                       & (correlations["predictor"] == "ches")]
    if len(row):
        r = row.iloc[0]
        axes[2].set_title(f"Spearman ρ = {r['rho']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
                          f", n = {r['n']}", fontsize=9)
    fig.suptitle("likelihood displacement under DPO", fontsize=10)
    return save(fig, Path(path), formats=formats)


def plot(out, *, formats=("png",)) -> list[Path]:
    """Read ``out``'s tables and write ``out/displacement.png``."""
    out = Path(out)
    return draw(*(pd.read_parquet(out / f"displacement{suffix}.parquet")
                  for suffix in ("", "_statements", "_tokens", "_ches")),
                out / FILENAME, formats=formats)
