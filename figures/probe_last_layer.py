"""Figures of the ``last-layer`` probe: DPO on a real LLM's features, theory over measurement.

:func:`plot` (``probe_last_layer``), behaviors trained separately: the measured loss
and implicit-reward accuracy against ``t = lr·step`` (solid), with the population
prediction from each behavior's Gaussian fit dashed over them, coloured by
distinguishability; and each behavior's learning speed (the loss drop at the last
step) against its distinguishability, names labelled, with Spearman's ρ and its
bootstrap interval over behaviors.

:func:`plot_together` (``probe_last_layer_together``), behaviors trained together
on the shared Yes/No rows: per-behavior loss (theory dashed), and the measured
initial slope against the predicted one ``(β²/2)⟨m_i, m⟩``
(:func:`dynamics.bounds.priority_scores`), with both orders written out.

Functions of the stored tables (``last_layer*.parquet``) only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from figures.style import FORMATS, THEORY_STYLE, plt, save, sns, theme

__all__ = ["plot", "plot_together"]

LEGEND_MAX = 8  # up to this many behaviors get a legend; more get a colour bar
LABEL_CHARS = 28


def _short(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[:LABEL_CHARS - 1] + "…"


def _colours(order: pd.Series) -> dict:
    """Colour per behavior by distinguishability (light = low), plus the scalar map."""
    values = order.to_numpy(dtype=float)
    norm = plt.Normalize(values.min(), values.max() if values.max() > values.min()
                         else values.min() + 1)
    cmap = sns.color_palette("flare", as_cmap=True)
    return {b: cmap(norm(v)) for b, v in order.items()}, plt.cm.ScalarMappable(norm, cmap)


def _curves(ax, frame: pd.DataFrame, metric: str, colours: dict) -> None:
    for behavior, part in frame.groupby("behavior", observed=True):
        colour = colours.get(behavior, "0.3")
        measured = part[part["source"] == "measured"].sort_values("t")
        theory = part[part["source"] == "theory"].sort_values("t")
        ax.plot(measured["t"], measured[metric], color=colour, lw=1.4,
                label=_short(str(behavior)))
        ax.plot(theory["t"], theory[metric], color="0.1", **{**THEORY_STYLE, "linewidth": 1.0})


def _finish_colours(fig, axes, colours: dict, mappable, legend_ax) -> None:
    if len(colours) <= LEGEND_MAX:
        legend_ax.legend(fontsize=7, loc="best", title="measured (theory dashed)",
                         title_fontsize=7)
    else:
        bar = fig.colorbar(mappable, ax=list(axes), fraction=0.03, pad=0.01)
        bar.set_label("distinguishability ‖μ̂⁺ − μ̂⁻‖", fontsize=8)


def plot(curves: pd.DataFrame, speeds: pd.DataFrame, summary: pd.DataFrame,
         path: str | Path, *, formats=FORMATS) -> list[Path]:
    """Draw the separate-training figure from ``last_layer.parquet``,
    ``last_layer_speed.parquet`` and ``last_layer_summary.parquet``."""
    theme()
    frame = curves[curves["mode"] == "separate"]
    order = speeds.set_index("behavior")["distinguishability"].sort_values()
    colours, mappable = _colours(order)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    loss_ax, acc_ax, speed_ax = axes
    _curves(loss_ax, frame, "loss", colours)
    loss_ax.axhline(np.log(2), color="0.6", lw=0.8, ls=":")
    loss_ax.set(xlabel="t = lr · step", ylabel="training loss",
                title="DPO loss: measured, Gaussian-fit theory dashed")
    _curves(acc_ax, frame, "reward_accuracy", colours)
    acc_ax.set(xlabel="t = lr · step", ylabel="implicit-reward accuracy (train)",
               title="reward accuracy")
    _finish_colours(fig, axes[:2], colours, mappable, loss_ax)

    primary = summary[summary["primary"].astype(bool)].iloc[0]
    speed = str(primary["speed"])
    speed_ax.scatter(speeds["distinguishability"], speeds[speed],
                     c=[colours[b] for b in speeds["behavior"]], s=40, zorder=3,
                     label="measured")
    if f"{speed}_theory" in speeds:
        speed_ax.scatter(speeds["distinguishability"], speeds[f"{speed}_theory"],
                         facecolors="none", edgecolors="0.1", s=40, zorder=2,
                         label="theory (Gaussian fit)")
    for _, row in speeds.iterrows():
        speed_ax.annotate(_short(str(row["behavior"])), (row["distinguishability"], row[speed]),
                          xytext=(4, 2), textcoords="offset points", fontsize=6.5, color="0.2")
    ci = ("" if not np.isfinite(primary["ci_low"]) else
          f" [{primary['ci_low']:.2f}, {primary['ci_high']:.2f}]")
    speed_ax.set(xlabel="distinguishability ‖μ̂⁺ − μ̂⁻‖ (train)",
                 ylabel=f"{speed.replace('_', ' ')} at t = {frame['t'].max():g}",
                 title=f"Spearman ρ = {primary['rho']:.2f}{ci} "
                       f"({int(primary['behaviors'])} behaviors)")
    speed_ax.legend(fontsize=7, loc="best")
    feats = str(curves["features"].iloc[0]) if "features" in curves else "raw"
    beta, lr = float(frame["beta"].iloc[0]), float(frame["lr"].iloc[0])
    fig.suptitle(f"Last-layer DPO on cached LLM features ({feats}), β = {beta:g}, "
                 f"lr = {lr:g}: only the Yes/No rows move", fontsize=10)
    return save(fig, Path(path), formats=formats)


def plot_together(curves: pd.DataFrame, priority: pd.DataFrame, path: str | Path, *,
                  formats=FORMATS) -> list[Path]:
    """Draw the trained-together figure from ``last_layer.parquet`` (mode together)
    and ``last_layer_priority.parquet``."""
    theme()
    frame = curves[curves["mode"] == "together"]
    order = priority.set_index("behavior")["distinguishability"].sort_values()
    colours, mappable = _colours(order)
    fig, (loss_ax, slope_ax) = plt.subplots(1, 2, figsize=(12.5, 4.8), layout="constrained")
    _curves(loss_ax, frame, "loss", colours)
    loss_ax.axhline(np.log(2), color="0.6", lw=0.8, ls=":")
    loss_ax.set(xlabel="t = lr · step", ylabel="training loss of each behavior",
                title="trained together (theory dashed)")
    _finish_colours(fig, [loss_ax], colours, mappable, loss_ax)

    slope_ax.scatter(priority["predicted_slope"], priority["slope_measured"],
                     c=[colours[b] for b in priority["behavior"]], s=40, zorder=3)
    for _, row in priority.iterrows():
        slope_ax.annotate(_short(str(row["behavior"])),
                          (row["predicted_slope"], row["slope_measured"]), xytext=(4, 2),
                          textcoords="offset points", fontsize=6.5, color="0.2")
    low = float(min(priority["predicted_slope"].min(), priority["slope_measured"].min()))
    high = float(max(priority["predicted_slope"].max(), priority["slope_measured"].max()))
    slope_ax.plot([low, high], [low, high], color="0.5", lw=0.8, ls=":", label="y = x")
    slope_ax.set(xlabel="predicted initial slope (β²/2)⟨m_i, m⟩",
                 ylabel="measured initial slope −ΔL/Δt",
                 title="priority: predicted against measured")
    slope_ax.legend(fontsize=7, loc="upper left")
    predicted = priority.sort_values(["rank", "behavior"])["behavior"].tolist()
    measured = priority.sort_values(["measured_rank", "behavior"])["behavior"].tolist()
    same = int((priority["rank"] == priority["measured_rank"]).sum())
    rho = priority[["rate", "slope_measured"]].rank().corr().iloc[0, 1]
    text = (f"Spearman ρ(predicted, measured) = {rho:.3f}\n{same} of {len(priority)} ranks "
            f"equal\nfirst predicted: {_short(predicted[0])}\nfirst measured: "
            f"{_short(measured[0])}")
    rising = priority[priority["loss_drop_measured"] < 0]["behavior"].tolist()
    if rising:
        text += f"\nloss rises at the end: {len(rising)} behavior(s)"
    slope_ax.text(0.98, 0.02, text, transform=slope_ax.transAxes, ha="right", va="bottom",
                  fontsize=7, color="0.2", bbox=dict(facecolor="white", alpha=0.8, lw=0))
    fig.suptitle("Last-layer DPO, behaviors sharing the Yes/No rows", fontsize=10)
    return save(fig, Path(path), formats=formats)
