"""Figure 9: the priority effect under RLHF (issue 12, question 1).

The three behaviors of figures 3 and 8 (``δ = 3, 2, 1``, orthogonal ``d_i``, shared
Yes/No rows), two pipelines on the same samples: a Bradley–Terry reward model,
then RL with the exact policy gradient on that frozen head; and DPO. One column
per *stage*: (a) the reward model (``reward_model`` phase), (b) the policy's RL from
its head (``rlhf`` phase), (c) DPO. Top: each stage's own objective, as progress from
its start (reward model and DPO: ``L_i(0) − L_i(t)``; RL: ``J_i(t) − J_i(0)`` with
``J = objective/rlhf_reward``). Bottom: the mean reward margin ``rewards/margins``
per behavior, on one scale for all three: ``r(y_w) − r(y_l)`` of the head, and
``β(log π/π0)(y_w) − β(log π/π0)(y_l)`` of the policy (RL and DPO end at the same
population policy ``βΔ* = ψ*``, so their margins end at the head's).

The learning order of a stage and metric ranks the behaviors by their *half-gain
time*: the first (linearly interpolated) step, counted from the stage's start, at
which the seed-mean curve has made half of its final gain. A behavior whose final
gain is not positive has no half-gain time (NaN, ranked last): under DPO and the
reward model the weak behavior's loss dips and then ends above its start, as in
figure 3. The prediction is :func:`dynamics.bounds.priority_scores` (``⟨d_i, b̄⟩``).
:func:`summary_table` holds the numbers the README quotes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dynamics.config import objective_name
from figures.priority import predicted_order
from figures.style import FORMATS, THEORY_STYLE, palette, plt, save, theme

__all__ = ["STAGES", "stage_frame", "half_gain_step", "half_gain_table", "summary_table",
           "order_table", "plot"]

FILENAME = "fig9_rlhf_priority"
MARGIN = "rewards/margins"
STAGES = {"reward_model": ("(a) reward model", "loss"),
          "rlhf": ("(b) RL on the frozen head (exact gradient)", "objective/rlhf_reward"),
          "dpo": ("(c) DPO", "loss")}
"""Stage (the phase's objective) → panel title and the stage's own objective column."""
RISING = {"objective/rlhf_reward", MARGIN}
"""Metrics whose gain is a rise (the losses' is a fall)."""


def _phase_objectives(config: dict) -> list[str]:
    train = config["train"]
    specs = ([p["objective"] for p in train["phases"]] if "phases" in train
             else [train["objective"]])
    return [objective_name(spec) for spec in specs]


def stage_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of every stage: ``stage`` (the phase's objective) and ``local_step``,
    ``local_t`` counted from the stage's first recorded step (a phase's first row
    repeats the previous phase's last state)."""
    out = frame[frame["objective"].isin(list(STAGES))].copy()
    out["stage"] = out["objective"].astype(str)
    keys = ["point", "phase"]
    out["local_step"] = out["step"] - out.groupby(keys, observed=True)["step"].transform("min")
    out["local_t"] = out["t"] - out.groupby(keys, observed=True)["t"].transform("min")
    return out


def half_gain_step(steps, values) -> float:
    """First step at which ``values`` has made half of its final gain over its first
    value, interpolated linearly between recorded steps; NaN when the final gain is
    not positive. ``steps`` increasing, both 1-D."""
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    gain = values - values[0]
    half = 0.5 * gain[-1]
    if not gain[-1] > 0:
        return np.nan
    k = int(np.argmax(gain >= half))
    if k == 0:
        return float(steps[0])
    fraction = (half - gain[k - 1]) / (gain[k] - gain[k - 1])
    return float(steps[k - 1] + fraction * (steps[k] - steps[k - 1]))


def _gain(metric: str, values: np.ndarray) -> np.ndarray:
    return values if metric in RISING else -values


def half_gain_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per stage × metric (the stage's own objective and ``rewards/margins``) × source ×
    behavior: ``start``, ``final`` (seed-mean curve), ``gain`` (final − start, a
    fall for a loss) and ``half_step`` (:func:`half_gain_step` of the seed-mean curve,
    stage-local steps)."""
    stages = stage_frame(frame)
    rows = []
    for stage, (_, own) in STAGES.items():
        mine = stages[stages["stage"] == stage]
        for metric in (own, MARGIN):
            curves = (mine.groupby(["source", "behavior", "local_step"], observed=True)[metric]
                      .mean().reset_index())
            for (source, behavior), curve in curves.groupby(["source", "behavior"],
                                                            observed=True):
                curve = curve.sort_values("local_step")
                values = _gain(metric, curve[metric].to_numpy(dtype=np.float64))
                rows.append(dict(stage=stage, metric=metric, source=source,
                                 behavior=behavior, start=float(curve[metric].iloc[0]),
                                 final=float(curve[metric].iloc[-1]),
                                 gain=float(values[-1] - values[0]),
                                 half_step=half_gain_step(curve["local_step"], values)))
    return pd.DataFrame(rows)


def _ranked(table: pd.DataFrame) -> tuple[str, ...]:
    """Behaviors by half-gain step, earliest first; NaN (no gain) last."""
    ordered = table.sort_values(["half_step", "behavior"], na_position="last", kind="stable")
    return tuple(ordered["behavior"])


def summary_table(sweeps) -> pd.DataFrame:
    """Per stage × metric × behavior: the predicted rank and score ``⟨d_i, b̄⟩``, the
    half-gain steps (simulation, theory), the final gains, and the orders: ``predicted``,
    ``measured`` (simulation), ``theory``, each a tuple (first learned first); ``holds``
    = measured is predicted."""
    sweeps = list(sweeps)
    frame = pd.concat([s.frame() for s in sweeps], ignore_index=True)
    config = next(iter(sweeps[0].configs().values()))
    order = predicted_order(config).set_index("behavior")
    predicted = tuple(order.index)
    table = half_gain_table(frame)
    wide = (table.set_index(["stage", "metric", "behavior", "source"])[["half_step", "gain"]]
            .unstack("source"))
    wide.columns = [f"{value}_{source}" for value, source in wide.columns]
    wide = wide.reset_index()
    wide["rank"] = [int(order.loc[b, "rank"]) for b in wide["behavior"]]
    wide["score"] = [float(order.loc[b, "score"]) for b in wide["behavior"]]
    wide["predicted"] = [predicted] * len(wide)
    for column, source in (("measured", "simulation"), ("theory", "theory")):
        orders = {key: _ranked(group) for key, group in
                  table[table["source"] == source].groupby(["stage", "metric"])}
        wide[column] = [orders[(s, m)] for s, m in zip(wide["stage"], wide["metric"])]
    wide["holds"] = [m == p for m, p in zip(wide["measured"], wide["predicted"])]
    stage_rank = {s: i for i, s in enumerate(STAGES)}
    wide = wide.assign(_s=wide["stage"].map(stage_rank), _m=wide["metric"] == MARGIN)
    return (wide.sort_values(["_s", "_m", "rank"]).drop(columns=["_s", "_m"])
            .reset_index(drop=True))


def order_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per stage × metric of a :func:`summary_table`: the three orders and
    whether the measured one is the predicted one."""
    keep = ["stage", "metric", "predicted", "measured", "theory", "holds"]
    return summary.drop_duplicates(["stage", "metric"])[keep].reset_index(drop=True)


def _short(order) -> str:
    return " > ".join(str(b).split(" ")[0] for b in order)


def _draw(ax, stages, stage, metric, names, colours, halves=None) -> None:
    data = stages[stages["stage"] == stage]
    curves = (data.groupby(["source", "behavior", "local_step"], observed=True)
              .agg(t=("local_t", "first"), mean=(metric, "mean"), sd=(metric, "std"))
              .reset_index())
    for name in names:
        for source in ("simulation", "theory"):
            c = curves[(curves["source"] == source) & (curves["behavior"] == name)]
            c = c.sort_values("local_step")
            if not len(c):
                continue
            start = c["mean"].iloc[0]
            sign = 1.0 if metric in RISING else -1.0
            y = sign * (c["mean"] - start) if metric != MARGIN else c["mean"]
            if source == "simulation":
                ax.plot(c["t"], y, color=colours[name], lw=1.4)
                sd = c["sd"].fillna(0.0)
                ax.fill_between(c["t"], y - sd, y + sd, color=colours[name], alpha=0.18, lw=0)
            else:
                ax.plot(c["t"], y, color=colours[name], **THEORY_STYLE)
        if halves is not None:
            row = halves[(halves["behavior"] == name) & (halves["source"] == "simulation")]
            if len(row) and np.isfinite(row["half_step"].iloc[0]):
                lr = float(data["local_t"].max() / max(data["local_step"].max(), 1))
                ax.axvline(row["half_step"].iloc[0] * lr, color=colours[name], ls=":", lw=1.2)


def plot(sweeps, out: Path) -> list[Path]:
    """Two rows (own objective; reward margin with half-gain marks) × three stages."""
    sweeps = list(sweeps)
    frame = pd.concat([s.frame() for s in sweeps], ignore_index=True)
    stages = stage_frame(frame)
    summary = summary_table(sweeps)
    halves = half_gain_table(frame)
    names = list(summary.sort_values("rank")["behavior"].drop_duplicates())
    colours = palette(names)
    theme()
    fig, axes = plt.subplots(2, len(STAGES), figsize=(5.0 * len(STAGES), 7.6), squeeze=False)
    for col, (stage, (title, own)) in enumerate(STAGES.items()):
        _draw(axes[0, col], stages, stage, own, names, colours)
        if stage == "dpo":  # DPO at β is the reward model run β² times faster (ψ = βΔ)
            beta = float(next(iter(sweeps[0].configs().values()))["train"]["beta"])
            title += f" (β = {beta:g}; ψ = βΔ: the reward model's margins at t·β²)"
        axes[0, col].set_title(title, fontsize=10)
        axes[0, col].set_ylabel("J_i(t) − J_i(0)" if own in RISING else "L_i(0) − L_i(t)")
        mine = halves[(halves["stage"] == stage) & (halves["metric"] == MARGIN)]
        _draw(axes[1, col], stages, stage, MARGIN, names, colours, halves=mine)
        axes[1, col].set_ylabel("mean reward margin (rewards/margins)")
        lines = []
        for metric, ax in ((own, axes[0, col]), (MARGIN, axes[1, col])):
            rows = summary[(summary["stage"] == stage) & (summary["metric"] == metric)]
            first = rows.iloc[0]
            steps = ", ".join(f"{s:.1f}" if np.isfinite(s) else "—"
                              for s in rows.sort_values("rank")["half_step_simulation"])
            lines = [f"half-gain step (sim): {steps}",
                     f"predicted: {_short(first['predicted'])}",
                     f"measured:  {_short(first['measured'])}"
                     + ("  (holds)" if first["holds"] else "  (differs)"),
                     f"theory:    {_short(first['theory'])}"]
            ax.text(0.97, 0.04, "\n".join(lines), transform=ax.transAxes, ha="right",
                    va="bottom", multialignment="left", fontsize=6.5, family="monospace",
                    bbox=dict(boxstyle="round", fc="white", ec="0.7", alpha=0.9))
        for ax in axes[:, col]:
            ax.set_xlabel("t = lr · step, from the stage's start")
    handles = [plt.Line2D([], [], color=colours[n], lw=2.5, label=n) for n in names]
    handles += [plt.Line2D([], [], color="0.2", lw=1.4, label="simulation (mean ± sd)"),
                plt.Line2D([], [], color="0.2", **THEORY_STYLE, label="theory (population GD)"),
                plt.Line2D([], [], color="0.2", ls=":", lw=1.2, label="half of the final gain")]
    fig.legend(handles=handles, loc="lower center", ncol=6, bbox_to_anchor=(0.5, -0.01),
               fontsize=8.5, frameon=False)
    fig.suptitle("Priority under RLHF: reward model, then RL on its frozen head, beside DPO "
                 "(orders by half-gain time; prediction ⟨d_i, b̄⟩)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save(fig, Path(out) / FILENAME, formats=FORMATS, palette_png=True)

