"""Figure 11: RLHF's stability (issue 12, question 3): the alignment tax against
PPO-ptx, forgetting and selective rehearsal, unequal reward scales and the advantage
model.

Three sweeps (``figures/sweeps/rlhf_stability_*.toml``), told apart by their swept keys
(:func:`kind`):

* **ptx** (``train.objective.ptx_coef`` swept): RL with the exact gradient from a
  reference that is the pretraining distribution's own optimum, on a head whose
  direction the pretraining features share. :func:`ptx_table`: per point the
  reference's and the final ``pretrain/loss`` (held-out draw; the *tax* is their
  difference), the final ``objective/rlhf_reward`` and ``clean_accuracy``.
* **rehearsal** (``train.phases`` swept): SFT on both behaviors, then RL on a head that
  under-rewards behavior B, with ``rehearsal = "none"`` or ``"selective"`` at several
  ``select_below``. :func:`rehearsal_table`: per point and behavior the accuracy at the
  start, after SFT (the RL phase's start) and at the end; ``forgetting`` is the fall
  over the RL phase (negative: a gain).
* **scales** (``train.objective.score`` swept with B's ``reward_scale``): two behaviors
  alike but for B's reward scale, RL on the raw reward or on the advantage model's
  score. :func:`scales_table`: per point and behavior the final return, KL, expected
  reward in the behavior's own units and accuracy; :func:`crowd_out`: A's
  KL-regularised return at each ratio against its value at ratio 1.

Every number is a seed mean of the final recorded step (sd over seeds beside it; NaN
for theory, which is one population run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dynamics.config import objective_name
from dynamics.objectives import resolve_objective
from figures.style import FORMATS, THEORY_STYLE, palette, plt, ramp, save, theme

__all__ = ["CHOSEN_SELECT_BELOW", "HAD_RIGHT", "kind", "rehearsal_of", "ptx_table",
           "rehearsal_table", "scales_table", "crowd_out", "plot"]

FILENAME = "fig11_rlhf_stability"
CHOSEN_SELECT_BELOW = -0.6
"""The selective-rehearsal threshold the figure's middle panel draws (documented in
``rlhf_stability_rehearsal.toml``)."""
HAD_RIGHT = 0.8
"""A behavior the SFT policy "had right": clean accuracy at the RL phase's start ≥ this."""
TAX = "pretrain/loss"
RETURN = "objective/rlhf_reward"
ACCURACY = "clean_accuracy"


def kind(sweep) -> str:
    """``"ptx"``, ``"scales"`` or ``"rehearsal"`` from a sweep's swept keys."""
    keys = set(sweep.keys)
    if "train.objective.ptx_coef" in keys:
        return "ptx"
    if "train.objective.score" in keys:
        return "scales"
    return "rehearsal"


def _rl_hyper(config: dict) -> dict:
    """The checked hyperparameters of the config's RL phase (the last rlhf one)."""
    train = config["train"]
    specs = [p["objective"] for p in train["phases"]] if "phases" in train else [
        train["objective"]]
    rl = [s for s in specs if objective_name(s) == "rlhf"]
    return resolve_objective(rl[-1])[1]


def rehearsal_of(config: dict) -> tuple[str, float]:
    """``(rehearsal, select_below)`` of the RL phase (select_below NaN without it)."""
    hyper = _rl_hyper(config)
    return hyper["rehearsal"], float(hyper.get("select_below", np.nan))


def _final(frame: pd.DataFrame, metrics) -> pd.DataFrame:
    """Per point × source × seed × behavior: ``metrics`` at the point's last step."""
    last = frame[frame["step"] == frame.groupby("point")["step"].transform("max")]
    return last[["point", "source", "seed", "behavior", *metrics]]


def _mean_sd(values: pd.Series) -> tuple[float, float]:
    values = values.to_numpy(dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else np.nan


# ----------------------------------------------------------------------------- (a) PPO-ptx


def ptx_table(frame: pd.DataFrame, configs: dict) -> pd.DataFrame:
    """Per point × source: ``ptx_coef``; ``reference_tax`` (``pretrain/loss`` at step 0,
    the reference policy, seed mean); ``final_tax`` and ``final_tax_sd``; ``tax``
    (final − reference, seed mean of the per-seed differences); ``final_return``,
    ``final_accuracy`` (behavior means) with their sds."""
    metrics = [TAX, RETURN, ACCURACY]
    per_seed = (frame.groupby(["point", "source", "seed", "step"], observed=True,
                              dropna=False)[metrics].mean().reset_index())
    rows = []
    for (pid, source), group in per_seed.groupby(["point", "source"], observed=True):
        start = group[group["step"] == group["step"].min()].set_index("seed", drop=False)
        end = group[group["step"] == group["step"].max()].set_index("seed", drop=False)
        row = dict(point=pid, source=source,
                   ptx_coef=float(_rl_hyper(configs[pid])["ptx_coef"]),
                   reference_tax=float(start[TAX].mean()))
        for name, metric in (("final_tax", TAX), ("final_return", RETURN),
                             ("final_accuracy", ACCURACY)):
            row[name], row[f"{name}_sd"] = _mean_sd(end[metric])
        row["tax"], row["tax_sd"] = _mean_sd(end[TAX] - start[TAX].reindex(end.index))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["source", "ptx_coef"], ignore_index=True)


# ----------------------------------------------------------------------------- (b) rehearsal


def rehearsal_table(frame: pd.DataFrame, configs: dict) -> pd.DataFrame:
    """Per point × source × behavior: ``rehearsal``, ``select_below``; the seed-mean
    ``clean_accuracy`` at the start (``start``), at the RL phase's start (``sft``: the
    SFT policy) and at the end (``final``); ``forgetting`` = sft − final (seed mean of
    the per-seed falls; negative: RL improved it) and ``forgetting_sd``; ``had_right``
    (``sft ≥ HAD_RIGHT``)."""
    rl_phase = frame[frame["objective"] == "rlhf"]
    first_rl = rl_phase.groupby("point")["step"].transform("min")
    at_rl = rl_phase[rl_phase["step"] == first_rl]  # repeats the SFT phase's last state
    keys = ["point", "source", "seed", "behavior"]
    start = frame[frame["step"] == 0].groupby(keys, observed=True, dropna=False)[ACCURACY].mean()
    sft = at_rl.groupby(keys, observed=True, dropna=False)[ACCURACY].mean()
    final = _final(frame, [ACCURACY]).groupby(keys, observed=True, dropna=False)[ACCURACY].mean()
    rows = []
    for (pid, source, behavior), _ in sft.groupby(level=["point", "source", "behavior"],
                                                  observed=True):
        pick = lambda s: s.xs((pid, source, behavior), level=["point", "source",  # noqa: E731
                                                              "behavior"])
        a, b, c = pick(start), pick(sft), pick(final)
        rehearsal, below = rehearsal_of(configs[pid])
        fall, fall_sd = _mean_sd(b - c.reindex(b.index))
        rows.append(dict(point=pid, source=source, behavior=behavior, rehearsal=rehearsal,
                         select_below=below, start=float(a.mean()), sft=float(b.mean()),
                         final=float(c.mean()), forgetting=fall, forgetting_sd=fall_sd,
                         had_right=bool(b.mean() >= HAD_RIGHT)))
    out = pd.DataFrame(rows)
    # none first, then selective from the highest threshold (most RL) to the lowest
    out["_order"] = np.where(out["rehearsal"] == "none", np.inf, out["select_below"])
    return (out.sort_values(["source", "_order", "behavior"], ascending=[True, False, True])
            .drop(columns="_order").reset_index(drop=True))


# ----------------------------------------------------------------------------- (c) scales


def _scales(config: dict) -> dict:
    return {b["name"]: float(b["reward_scale"]) for b in config["problem"]["behaviors"]}


def scales_table(frame: pd.DataFrame, configs: dict) -> pd.DataFrame:
    """Per point × source × behavior: ``score``, ``ratio`` (the largest reward_scale
    over the smallest), ``reward_scale``; the final ``objective/rlhf_reward`` (``return``,
    in the run's units: the scaled reward minus β KL), ``objective/kl`` (``kl``),
    ``own_reward`` (``objective/scores`` / reward_scale: the expected reward in the
    behavior's own units) and ``clean_accuracy`` (``accuracy``), seed means with sds."""
    metrics = {"return": RETURN, "kl": "objective/kl", "own_reward": "objective/scores",
               "accuracy": ACCURACY}
    last = _final(frame, list(metrics.values()))
    rows = []
    for (pid, source, behavior), group in last.groupby(["point", "source", "behavior"],
                                                       observed=True):
        config = configs[pid]
        scales = _scales(config)
        row = dict(point=pid, source=source, behavior=behavior,
                   score=_rl_hyper(config)["score"],
                   ratio=max(scales.values()) / min(scales.values()),
                   reward_scale=scales[behavior])
        for name, metric in metrics.items():
            values = group[metric] / (scales[behavior] if name == "own_reward" else 1.0)
            row[name], row[f"{name}_sd"] = _mean_sd(values)
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["source", "score", "ratio", "behavior"],
                                          ignore_index=True)


def crowd_out(table: pd.DataFrame, behavior: str) -> pd.DataFrame:
    """Per source × score × ratio, for ``behavior`` (one whose reward_scale is 1 at every
    point): its final return and ``crowd_out`` = 1 − return / (its return at ratio 1
    with the same score and source): the share of its KL-regularised return lost to
    the other behavior's larger scale."""
    mine = table[table["behavior"] == behavior]
    parts = []
    for _, group in mine.groupby(["source", "score"]):
        group = group.sort_values("ratio")[["source", "score", "ratio", "return"]]
        base = float(group.loc[group["ratio"] == 1.0, "return"].iloc[0])
        parts.append(group.assign(crowd_out=1.0 - group["return"] / base))
    return pd.concat(parts, ignore_index=True)


# ----------------------------------------------------------------------------- drawing


def _sym(ax, values) -> None:
    positive = sorted(v for v in set(values) if v > 0)
    ax.set_xscale("symlog", linthresh=positive[0] if positive else 1.0, base=2)


def _draw_ptx(axes, frame, configs) -> None:
    ax_tax, ax_ret, ax_trade = axes
    table = ptx_table(frame, configs)
    sim, theory = (table[table["source"] == s] for s in ("simulation", "theory"))
    colour = palette(["ptx"])["ptx"]
    for ax, name, label in ((ax_tax, "final_tax", "final pretrain/loss (held-out draw)"),
                            (ax_ret, "final_return", "final objective/rlhf_reward")):
        ax.errorbar(sim["ptx_coef"], sim[name], yerr=sim[f"{name}_sd"].fillna(0), marker="o",
                    color=colour, capsize=3, lw=1.4, label="simulation (mean ± sd)")
        ax.plot(theory["ptx_coef"], theory[name], color="0.2", marker="x",
                label="theory (exact RL + QMC)", **THEORY_STYLE)
        _sym(ax, table["ptx_coef"])
        ax.set_xlabel("ptx_coef γ (symlog)")
        ax.set_ylabel(label)
    ref = float(theory["reference_tax"].iloc[0])
    ax_tax.axhline(ref, color="0.4", ls=":", lw=1.2)
    ax_tax.text(0.03, ref, "the reference (the pretraining optimum)", ha="left", va="bottom",
                transform=ax_tax.get_yaxis_transform(), fontsize=7, color="0.3")
    first = sim.iloc[0]
    ax_tax.set_title(f"(a) The alignment tax against PPO-ptx's γ: {first['tax']:.3f} at γ = 0,"
                     f"\n{sim.iloc[-1]['tax']:.3f} at γ = {sim.iloc[-1]['ptx_coef']:g} "
                     "(final − reference)", fontsize=9)
    ax_ret.set_title("The preference reward it costs (β = 1)", fontsize=9)
    ax_tax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 0.9))
    ax_trade.plot(sim["tax"], sim["final_return"], marker="o", color=colour, lw=1.4,
                  label="simulation")
    ax_trade.plot(theory["tax"], theory["final_return"], marker="x", color="0.2",
                  label="theory", **THEORY_STYLE)
    for row in sim.itertuples():
        ax_trade.annotate(f"γ={row.ptx_coef:g}", (row.tax, row.final_return), fontsize=7,
                          xytext=(4, -9), textcoords="offset points")
    ax_trade.set_xlabel("alignment tax: final − reference pretrain/loss")
    ax_trade.set_ylabel("final objective/rlhf_reward")
    ax_trade.set_title("The trade-off: reward against tax, one point per γ", fontsize=9)
    ax_trade.legend(fontsize=7, loc="lower right")


def _draw_accuracy_phases(ax, frame, pid, names, colours, title) -> None:
    data = frame[frame["point"] == pid]
    curves = (data.groupby(["source", "behavior", "phase", "step"], observed=True)[ACCURACY]
              .agg(["mean", "std"]).reset_index())
    for name in names:
        for source in ("simulation", "theory"):
            c = curves[(curves["source"] == source) & (curves["behavior"] == name)]
            c = c.sort_values(["phase", "step"])
            if source == "simulation":
                ax.plot(c["step"], c["mean"], color=colours[name], lw=1.4)
                sd = c["std"].fillna(0.0)
                ax.fill_between(c["step"], c["mean"] - sd, c["mean"] + sd, color=colours[name],
                                alpha=0.18, lw=0)
            else:
                ax.plot(c["step"], c["mean"], color=colours[name], **THEORY_STYLE)
    boundary = int(data[data["objective"] == "rlhf"]["step"].min())
    ax.axvline(boundary, color="0.5", lw=1.0)
    ax.text(boundary / 2, 0.02, "SFT", ha="center", transform=ax.get_xaxis_transform(),
            fontsize=8, color="0.3")
    ax.text((boundary + data["step"].max()) / 2, 0.02, "RL", ha="center",
            transform=ax.get_xaxis_transform(), fontsize=8, color="0.3")
    ax.set_xlabel("step (SFT, then RL)")
    ax.set_ylabel("clean accuracy")
    ax.set_title(title, fontsize=9)


def _rehearsal_label(rehearsal: str, below: float) -> str:
    return "none" if rehearsal == "none" else f"τ = {below:g}"


def _draw_rehearsal(axes, frame, configs) -> None:
    table = rehearsal_table(frame, configs)
    names = list(dict.fromkeys(table["behavior"]))
    colours = palette(names)
    sim = table[table["source"] == "simulation"]
    none = sim[sim["rehearsal"] == "none"]["point"].iloc[0]
    chosen = sim[np.isclose(sim["select_below"], CHOSEN_SELECT_BELOW)]["point"].iloc[0]
    for ax, pid in ((axes[0], none), (axes[1], chosen)):
        rows = sim[sim["point"] == pid].set_index("behavior")
        rehearsal, below = rehearsal_of(configs[pid])
        falls = ", ".join(f"{b.split(' ')[0]} {rows.loc[b, 'forgetting']:+.3f}" for b in names)
        how = "none" if rehearsal == "none" else f"selective, select_below = {below:g}"
        title = (f"(b) SFT, then RL on a head under-rewarding B; rehearsal {how}"
                 f"\nforgetting over RL (SFT's end − end): {falls}")
        _draw_accuracy_phases(ax, frame, pid, names, colours, title)
    ax = axes[2]
    order = list(dict.fromkeys(sim["point"]))
    labels = [_rehearsal_label(*rehearsal_of(configs[p])) for p in order]
    x = np.arange(len(order))
    for k, name in enumerate(names):
        for source, style in (("simulation", dict(marker="o", lw=1.4, capsize=3)),
                              ("theory", dict(marker="x", **THEORY_STYLE))):
            rows = table[(table["source"] == source) & (table["behavior"] == name)]
            rows = rows.set_index("point").loc[order]
            shift = (k - (len(names) - 1) / 2) * 0.08
            if source == "simulation":
                ax.errorbar(x + shift, rows["forgetting"], yerr=rows["forgetting_sd"].fillna(0),
                            color=colours[name], label=name, **style)
            else:
                ax.plot(x + shift, rows["forgetting"], color=colours[name], **style)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xticks(x, labels)
    ax.set_xlabel("rehearsal (τ = select_below; lower τ: fewer prompts get RL)")
    ax.set_ylabel("forgetting over RL (SFT's end − end)")
    ax.set_title("Forgetting against the threshold (negative: RL improved it)", fontsize=9)
    ax.legend(fontsize=7)


def _draw_scales(axes, frame, configs) -> None:
    ax_curve, ax_return, ax_acc = axes
    table = scales_table(frame, configs)
    names = list(dict.fromkeys(table["behavior"]))
    small = [b for b in names if (table[table["behavior"] == b]["reward_scale"] == 1).all()][0]
    crowd = crowd_out(table, small)
    ratios = sorted(set(table["ratio"]))
    colours = ramp(ratios, "crest")
    # A's return through training under the raw reward, one curve per ratio
    data = frame[frame["behavior"] == small]
    for pid, config in configs.items():
        score = _rl_hyper(config)["score"]
        scales = _scales(config)
        ratio = max(scales.values()) / min(scales.values())
        if score == "advantage" and ratio != ratios[-1]:
            continue  # the advantage model's runs coincide at every ratio; draw one
        mine = data[data["point"] == pid]
        colour = "black" if score == "advantage" else colours[ratio]
        label = ("advantage (every ratio)" if score == "advantage"
                 else f"reward, ratio {ratio:g}")
        sim = mine[mine["source"] == "simulation"].groupby("step")[RETURN].agg(["mean", "std"])
        ax_curve.plot(sim.index, sim["mean"], color=colour, lw=1.4, label=label)
        ax_curve.fill_between(sim.index, sim["mean"] - sim["std"], sim["mean"] + sim["std"],
                              color=colour, alpha=0.15, lw=0)
        theory = mine[mine["source"] == "theory"].set_index("step")[RETURN]
        ax_curve.plot(theory.index, theory, color=colour, **THEORY_STYLE)
    ax_curve.set_xlabel("RL step")
    ax_curve.set_ylabel(f"{small}: objective/rlhf_reward (its own units)")
    ax_curve.set_title(f"(c) Unequal reward scales: {small}'s KL-regularised return",
                       fontsize=9)
    ax_curve.legend(fontsize=7)
    markers = {"reward": "o", "advantage": "s"}
    for score in ("reward", "advantage"):
        for source in ("simulation", "theory"):
            rows = table[(table["score"] == score) & (table["source"] == source)]
            a = rows[rows["behavior"] == small]
            style = (dict(marker=markers[score], lw=1.4, capsize=3) if source == "simulation"
                     else dict(marker="x", **THEORY_STYLE))
            if source == "simulation":
                ax_return.errorbar(a["ratio"], a["return"], yerr=a["return_sd"].fillna(0),
                                   color="black" if score == "advantage" else "C0",
                                   label=f"score = {score}", **style)
            else:
                ax_return.plot(a["ratio"], a["return"], color="0.2", **style)
            for name in names:
                b = rows[rows["behavior"] == name]
                kwargs = dict(color=palette(names)[name])
                if source == "simulation":
                    ax_acc.errorbar(b["ratio"], b["accuracy"], yerr=b["accuracy_sd"].fillna(0),
                                    mfc="white" if score == "advantage" else None,
                                    label=f"{name}, {score}", **kwargs, **style)
                else:
                    ax_acc.plot(b["ratio"], b["accuracy"], **kwargs, **style)
    sim_crowd = crowd[(crowd["source"] == "simulation") & (crowd["score"] == "reward")]
    text = "\n".join(f"ratio {r.ratio:g}: crowd-out {100 * r.crowd_out:.0f}%"
                     for r in sim_crowd.itertuples() if r.ratio != 1)
    ax_return.text(0.03, 0.04, "score = reward (simulation)\n" + text,
                   transform=ax_return.transAxes, fontsize=7, family="monospace", va="bottom",
                   bbox=dict(boxstyle="round", fc="white", ec="0.7", alpha=0.9))
    for ax in (ax_return, ax_acc):
        ax.set_xscale("log")
        ax.set_xlabel("reward-scale ratio (B / A)")
    ax_return.set_ylabel(f"{small}: final objective/rlhf_reward")
    ax_return.set_title(f"Crowd-out: 1 − {small.split(' ')[0]}'s return / its return at "
                        "ratio 1", fontsize=9)
    ax_return.legend(fontsize=7, loc="upper right")
    ax_acc.set_ylabel("final clean accuracy")
    ax_acc.set_title("Accuracy barely moves (open: advantage)", fontsize=9)
    ax_acc.legend(fontsize=6.5, ncol=2)


def plot(sweeps, out: Path) -> list[Path]:
    """Row (a): tax and reward against ptx_coef, and the trade-off; row (b): accuracy
    through SFT and RL without and with selective rehearsal, and forgetting against the
    threshold; row (c): the small-scale behavior's return through training and against
    the ratio, and every behavior's accuracy."""
    sweeps = list(sweeps)
    theme()
    fig, axes = plt.subplots(3, 3, figsize=(16.5, 14.0))
    draw = {"ptx": _draw_ptx, "rehearsal": _draw_rehearsal, "scales": _draw_scales}
    rows = {"ptx": 0, "rehearsal": 1, "scales": 2}
    by_kind: dict[str, list] = {}
    for sweep in sweeps:
        by_kind.setdefault(kind(sweep), []).append(sweep)
    for name, group in by_kind.items():
        frame = pd.concat([s.frame() for s in group], ignore_index=True)
        configs = {pid: c for s in group for pid, c in s.configs().items()}
        draw[name](axes[rows[name]], frame, configs)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    fig.suptitle("RLHF's stability (theory dashed over simulation, mean ± sd over seeds): "
                 "the alignment tax, forgetting, unequal reward scales")
    fig.tight_layout()
    return save(fig, Path(out) / FILENAME, formats=FORMATS, palette_png=True)
