"""Figure of ``prefdyn probe displacement --pairs``: likelihood displacement on real
multi-token pairs (Razin et al. 2024).

Left: mean ``log π(y_w)`` (solid) and ``log π(y_l)`` (dashed) change since step 0
against the step, with the displaced fraction at the end. Middle: each pair's CHES
(Definition 2, from the model before training) against its change in ``log π(y_w)``,
with Spearman's ρ and its bootstrap interval. Right: the mitigation, the mean change of
``log π(y_w)`` on the kept pairs after dropping the highest-CHES pairs or as many at
random, each seed a dot, the mean over seeds with its t interval. A function of the
``pair_displacement*.parquet`` tables only.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from figures.style import plt, save, sns, theme

__all__ = ["plot", "draw"]

FILENAME = "pair_displacement"


def draw(curves: pd.DataFrame, pairs: pd.DataFrame, correlations: pd.DataFrame,
         mitigation: pd.DataFrame, summary: pd.DataFrame, path, *,
         formats=("png",)) -> list[Path]:
    """Draw the tables to ``path`` + each suffix of ``formats``."""
    theme()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), layout="constrained")
    colours = sns.color_palette("colorblind", 3)
    axes[0].plot(curves["step"], curves["chosen_change"], color=colours[0], lw=1.6,
                 label="log π(y_w)")
    axes[0].plot(curves["step"], curves["rejected_change"], color=colours[1], lw=1.2,
                 ls="--", label="log π(y_l)")
    axes[0].axhline(0, color="0.5", lw=0.8, ls=":")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("mean change since step 0")
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"displaced (log π(y_w) below start) at the end: "
                      f"{curves['displaced_fraction'].iloc[-1]:.0%} of {len(pairs)} pairs",
                      fontsize=9)
    sns.scatterplot(data=pairs, x="ches", y="logp_chosen_change", s=16, color=colours[2],
                    ax=axes[1])
    axes[1].axhline(0, color="0.5", lw=0.8, ls=":")
    axes[1].set_xlabel("CHES (Razin et al. Def. 2, before training)")
    axes[1].set_ylabel("change of log π(y_w)")
    row = correlations[correlations["predictor"] == "ches"]
    if len(row):
        r = row.iloc[0]
        axes[1].set_title(f"Spearman ρ = {r['rho']:.2f} [{r['ci_low']:.2f}, "
                          f"{r['ci_high']:.2f}], n = {r['n']}", fontsize=9)
    if len(mitigation):
        rules = list(dict.fromkeys(mitigation["rule"]))
        for x, rule in enumerate(rules):
            points = mitigation[mitigation["rule"] == rule]["chosen_change"]
            axes[2].scatter([x] * len(points), points, color=colours[x % 3], s=14, alpha=0.6)
            s = summary[(summary["rule"] == rule) & (summary["metric"] == "chosen_change")]
            if len(s):
                s = s.iloc[0]
                low, high = s["mean"] - s["ci_low"], s["ci_high"] - s["mean"]
                axes[2].errorbar([x + 0.15], [s["mean"]], yerr=[[low], [high]], fmt="o",
                                 color="0.2", capsize=3)
        axes[2].set_xticks(range(len(rules)), [f"drop by {r}" for r in rules])
        axes[2].set_xlim(-0.5, len(rules) - 0.5)
        axes[2].axhline(0, color="0.5", lw=0.8, ls=":")
        axes[2].set_ylabel("mean change of log π(y_w), kept pairs")
        k = int(mitigation["dropped"].iloc[0])
        axes[2].set_title(f"mitigation: {k} pairs dropped, {mitigation['seed'].nunique()} "
                          f"seeds (mean, 95% t interval)", fontsize=9)
    else:
        axes[2].set_axis_off()
    fig.suptitle("likelihood displacement under DPO on preference pairs", fontsize=10)
    return save(fig, Path(path), formats=formats)


def plot(out, *, formats=("png",)) -> list[Path]:
    """Read ``out``'s tables and write ``out/pair_displacement.png``."""
    out = Path(out)
    return draw(*(pd.read_parquet(out / f"pair_displacement{suffix}.parquet")
                  for suffix in ("", "_pairs", "_ches", "_mitigation",
                                 "_mitigation_summary")),
                out / FILENAME, formats=formats)
