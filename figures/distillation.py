"""Figure 12: context distillation (issue 13, experiment 3; docs/theory.md §11): the gap
``KL(π_T ‖ π)`` between the prompted teacher and the unprompted student against steps and
against the number of training prompts, and how much of the prompt's effect survives
without the prompt.

Three sweeps (``figures/sweeps/distillation_*.toml``), told apart by their swept keys
(:func:`kind`):

* **steps** (``model.prompt_offset`` swept), twice: on a problem whose prompts share a
  constant feature ``g_0 ≡ 1`` (:func:`constant_feature`; Proposition 10 (ii): the gap
  closes) and on the same problem with ``g_0`` varying (Proposition 10 (iii): a gap
  remains). :func:`gap_curves`: per point × source × step, the behavior-weighted gap on
  the training sample (``loss``) and on the held-out draw (``heldout/loss``; theory: the
  population's), seed means with their 95% intervals. :func:`survival_table`: per point
  × source × behavior, the share of the prompt's Yes−No logit change :func:`prompt_shift`
  that the student reproduces at the end.
* **samples** (``train.n`` swept): :func:`samples_table`: per point × source, the final
  training and held-out gaps against n; the flow's value is the asymptote.

The survival share is read from stored columns: distillation never looks at the labels,
so the sweeps draw them independently of the prompt (``μ⁺ = μ⁻``, ``Σ⁺ = Σ⁻``) with
``pos_fraction = p ≠ ½``; then ``rewards/margins = β E[s (Δ_Yes − Δ_No)ᵀg] =
β (2p − 1) E[(Δ_Yes − Δ_No)ᵀg]`` exactly (``s = ±1`` the label, ``Δ = W − W_start``),
the student's mean Yes−No logit change on the behavior's prompts, which the prompt itself
makes ``(W_start c)_Yes − (W_start c)_No`` on every prompt. :func:`survival_table`
refuses a behavior whose labels depend on the prompt.

Intervals: ``mean ± t_{0.975, S−1}·sd/√S`` over the S seeds (:func:`interval`); theory,
one population run, has none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dynamics.config import build_problem
from dynamics.model import NO, YES, reference_weights
from figures.tables import combine, interval  # noqa: F401 (re-exported)
from figures.style import FORMATS, THEORY_STYLE, palette, plt, ramp, save, theme

__all__ = ["combine", "kind", "constant_feature", "prompt_shift", "interval", "gap_curves",
           "samples_table", "survival_table", "plot"]

FILENAME = "fig12_distillation"
GAP = "loss"
HELDOUT_GAP = "heldout/loss"
MARGINS = "rewards/margins"


def kind(sweep) -> str:
    """``"samples"`` (``train.n`` swept) or ``"steps"``, from a sweep's swept keys."""
    return "samples" if "train.n" in set(sweep.keys) else "steps"


def constant_feature(config: dict) -> bool:
    """Whether some coordinate of g is one nonzero constant on every prompt: zero
    variance in every behavior's Σ⁺ and Σ⁻ and the same nonzero mean in every μ⁺, μ⁻
    (Proposition 10 (ii): the student can then absorb the prompt exactly)."""
    problem = build_problem(config)
    means = np.array([m for b in problem.behaviors for m in (b.mu_pos, b.mu_neg)])  # (2K, d)
    variances = np.array([np.diag(c) for b in problem.behaviors
                          for c in (b.cov_pos, b.cov_neg)])  # (2K, d)
    same = np.all(means == means[0], axis=0) & (means[0] != 0)
    return bool(np.any(same & np.all(variances == 0, axis=0)))


def prompt_shift(config: dict) -> float:
    """The change the prompt makes to every prompt's Yes−No logit:
    ``(W_start c)_Yes − (W_start c)_No`` with ``c = model.prompt_offset`` and
    ``W_start`` the reference (the distill phase's start in these sweeps)."""
    model = config["model"]
    w0 = reference_weights(config["problem"]["dim"], vocab_size=model["vocab_size"],
                           scale=model["init_scale"], seed=model["init_seed"],
                           given=model.get("reference"))
    shift = np.asarray(w0, dtype=np.float64) @ np.asarray(model["prompt_offset"], np.float64)
    return float(shift[YES] - shift[NO])


def _weights(config: dict) -> dict:
    problem = build_problem(config)
    return dict(zip(problem.names, problem.weights))


def _mixture(frame: pd.DataFrame, configs: dict, metrics) -> pd.DataFrame:
    """Per point × source × seed × step: the behavior-weighted mean of ``metrics`` (the
    gap over the whole prompt distribution)."""
    weight = pd.Series([_weights(configs[p])[b] for p, b in zip(frame["point"],
                                                                frame["behavior"])],
                       index=frame.index, dtype=np.float64)
    weighted = frame[list(metrics)].mul(weight, axis=0)
    weighted[["point", "source", "seed", "step"]] = frame[["point", "source", "seed", "step"]]
    return (weighted.groupby(["point", "source", "seed", "step"], observed=True, dropna=False)
            [list(metrics)].sum().reset_index())


def _summarise(per_seed: pd.DataFrame, keys, metrics) -> pd.DataFrame:
    rows = []
    for key, group in per_seed.groupby(keys, observed=True, dropna=False):
        row = dict(zip(keys, key))
        row["seeds"] = len(group)
        for name, metric in metrics.items():
            row[name], row[f"{name}_sd"], row[f"{name}_half"] = interval(group[metric])
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- (a) steps


def gap_curves(frame: pd.DataFrame, configs: dict) -> pd.DataFrame:
    """Per point × source × step: ``shift`` (:func:`prompt_shift`), ``constant``
    (:func:`constant_feature`), ``t``; the behavior-weighted gap on the training sample
    (``gap``) and on the held-out draw (``heldout``; theory: both the population's),
    seed means with ``_sd`` and ``_half`` (the 95% interval's half-width)."""
    per_seed = _mixture(frame, configs, [GAP, HELDOUT_GAP])
    table = _summarise(per_seed, ["point", "source", "step"], {"gap": GAP,
                                                               "heldout": HELDOUT_GAP})
    lr = {p: configs[p]["train"]["lr"] for p in configs}
    table["t"] = table["point"].map(lr) * table["step"]
    table["shift"] = table["point"].map({p: prompt_shift(c) for p, c in configs.items()})
    table["constant"] = table["point"].map({p: constant_feature(c) for p, c in configs.items()})
    return table.sort_values(["constant", "shift", "source", "step"], ascending=[False, True,
                                                                                True, True],
                             ignore_index=True)


# ----------------------------------------------------------------------------- (b) samples


def samples_table(frame: pd.DataFrame, configs: dict) -> pd.DataFrame:
    """Per point × source: ``n`` (train.n) and, at the point's last step, the
    behavior-weighted gap on the training sample (``gap``) and on the held-out draw
    (``heldout``), seed means with ``_sd`` and ``_half``."""
    last = frame[frame["step"] == frame.groupby("point")["step"].transform("max")]
    per_seed = _mixture(last, configs, [GAP, HELDOUT_GAP])
    table = _summarise(per_seed, ["point", "source"], {"gap": GAP, "heldout": HELDOUT_GAP})
    table["n"] = table["point"].map({p: c["train"]["n"] for p, c in configs.items()})
    return table.sort_values(["source", "n"], ignore_index=True)


# ----------------------------------------------------------------------------- (c) survival


def _label_free(config: dict) -> dict:
    """Each behavior's ``2p − 1``; a ValueError where the labels depend on the prompt
    (the margins then do not measure the mean logit change) or are balanced."""
    out = {}
    for b in build_problem(config).behaviors:
        if not (np.array_equal(b.mu_pos, b.mu_neg) and np.array_equal(b.cov_pos, b.cov_neg)):
            raise ValueError(f"behavior {b.name!r}: μ⁺, Σ⁺ must equal μ⁻, Σ⁻ (labels drawn "
                             "independently of the prompt) to read the logit change from "
                             "rewards/margins")
        if b.pos_fraction == 0.5:
            raise ValueError(f"behavior {b.name!r}: pos_fraction == 0.5, must differ from "
                             "0.5 (rewards/margins is then 0 whatever the student does)")
        out[b.name] = 2 * b.pos_fraction - 1
    return out


def survival_table(frame: pd.DataFrame, configs: dict) -> pd.DataFrame:
    """Per point × source × behavior at the point's last step: ``shift`` (the prompt's
    Yes−No logit change), ``constant``, ``reproduced`` = ``rewards/margins / (β (2p −
    1))`` (the student's mean Yes−No logit change on the behavior's prompts) and
    ``share`` = reproduced / shift, seed means with ``_sd`` and ``_half``."""
    last = frame[frame["step"] == frame.groupby("point")["step"].transform("max")]
    rows = []
    for (pid, source, behavior), group in last.groupby(["point", "source", "behavior"],
                                                       observed=True):
        config = configs[pid]
        shift = prompt_shift(config)
        reproduced = group[MARGINS] / (config["train"]["beta"] * _label_free(config)[behavior])
        row = dict(point=pid, source=source, behavior=behavior, shift=shift,
                   constant=constant_feature(config), seeds=len(group))
        row["reproduced"], row["reproduced_sd"], row["reproduced_half"] = interval(reproduced)
        row["share"], row["share_sd"], row["share_half"] = interval(reproduced / shift)
        rows.append(row)
    return (pd.DataFrame(rows).sort_values(["constant", "shift", "source", "behavior"],
                                           ascending=[False, True, True, True])
            .reset_index(drop=True))


# ----------------------------------------------------------------------------- drawing


def _case(constant: bool, shift: float) -> str:
    return f"{'constant g₀' if constant else 'no constant feature'}, prompt shift {shift:g}"


def _colours(table: pd.DataFrame) -> dict:
    """One colour per (constant, shift): blues with a constant feature, oranges without."""
    out = {}
    for constant, name in ((True, "Blues"), (False, "Oranges")):
        shifts = sorted(set(table[table["constant"] == constant]["shift"]))
        ramped = ramp([0, *shifts], name)  # skip the palest shade
        out.update({(constant, s): ramped[s] for s in shifts})
    return out


def _draw_steps(ax, curves: pd.DataFrame, colours: dict) -> None:
    for (constant, shift), group in curves.groupby(["constant", "shift"], sort=False):
        colour = colours[(constant, shift)]
        sim = group[group["source"] == "simulation"]
        theory = group[group["source"] == "theory"]
        ax.plot(sim["step"], sim["heldout"], color=colour, lw=1.4,
                label=_case(constant, shift))
        low = (sim["heldout"] - sim["heldout_half"]).where(lambda v: v > 0)
        ax.fill_between(sim["step"], low, sim["heldout"] + sim["heldout_half"], color=colour,
                        alpha=0.25, lw=0)
        ax.plot(theory["step"], theory["heldout"], color="0.15", **THEORY_STYLE)
    ax.plot([], [], color="0.15", label="population flow (QMC)", **THEORY_STYLE)
    ax.set_yscale("log")
    ax.set_xlabel("step (lr = 1)")
    ax.set_ylabel("held-out gap KL(π_T ‖ π) (behavior mean)")
    final = curves[(curves["step"] == curves["step"].max())
                   & (curves["source"] == "simulation")]
    closed = final[final["constant"]].sort_values("shift").iloc[-1]
    stays = final[~final["constant"]].sort_values("shift").iloc[-1]
    ax.set_title(f"(a) The gap against steps: with a constant feature it closes "
                 f"({closed['heldout']:.1e} at the end),\nwithout one it stays "
                 f"({stays['heldout']:.4f}; both at shift {stays['shift']:g})", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")


def _draw_samples(ax, table: pd.DataFrame) -> None:
    sim = table[table["source"] == "simulation"]
    flow = float(table[table["source"] == "theory"]["heldout"].mean())
    colour = palette(["held-out"])["held-out"]
    ax.errorbar(sim["n"], sim["heldout"], yerr=sim["heldout_half"], marker="o", color=colour,
                capsize=3, lw=1.4, label="held-out gap (mean, 95% interval)")
    ax.errorbar(sim["n"], sim["gap"], yerr=sim["gap_half"], marker="o", mfc="white",
                color="0.45", capsize=3, lw=1.0, label="training gap")
    ax.axhline(flow, color="0.15", label=f"population flow: {flow:.4f}", **THEORY_STYLE)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("training prompts n (both behaviors)")
    ax.set_ylabel("gap at the end (behavior mean)")
    first, last = sim.iloc[0], sim.iloc[-1]
    ax.set_title(f"(b) No constant feature, shift 2: the held-out gap against n,\n"
                 f"{first['heldout']:.3f} at n = {first['n']:g}, {last['heldout']:.4f} at "
                 f"n = {last['n']:g}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")


def _draw_survival(ax, table: pd.DataFrame, colours: dict) -> None:
    names = list(dict.fromkeys(table["behavior"]))
    cases = list(dict.fromkeys(zip(table["constant"], table["shift"])))
    width = 0.8 / len(cases)
    x = np.arange(len(names))
    for k, case in enumerate(cases):
        rows = table[(table["constant"] == case[0]) & (table["shift"] == case[1])]
        sim = rows[rows["source"] == "simulation"].set_index("behavior").loc[names]
        theory = rows[rows["source"] == "theory"].set_index("behavior").loc[names]
        at = x + (k - (len(cases) - 1) / 2) * width
        ax.bar(at, sim["share"], width * 0.9, yerr=sim["share_half"], capsize=3,
               ecolor="0.45", color=colours[case], label=_case(*case))
        ax.plot(at, theory["share"], ls="none", marker="x", ms=7, mew=1.6, color="0.1")
    ax.plot([], [], ls="none", marker="x", ms=7, mew=1.6, color="0.1", label="population flow")
    ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
    ax.set_xticks(x, [f"behavior {n}" for n in names])
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("student's mean Yes−No logit change / the prompt's")
    sim = table[(table["source"] == "simulation") & ~table["constant"]]
    worst = sim.loc[sim["share"].idxmin()]
    ax.set_title(f"(c) How much of the prompt's effect survives without it: all of it with\n"
                 f"a constant feature, as little as {100 * worst['share']:.0f}% "
                 f"(behavior {worst['behavior']}, shift {worst['shift']:g}) without", fontsize=9)
    ax.legend(fontsize=7, loc="upper right", ncol=2)


def plot(sweeps, out: Path) -> list[Path]:
    """(a) the held-out gap against steps for each problem and prompt, the flow dashed
    over it; (b) the final gaps against the number of training prompts, the flow's as the
    asymptote; (c) the share of the prompt's Yes−No logit change the student reproduces,
    per behavior."""
    sweeps = list(sweeps)
    theme()
    fig, axes = plt.subplots(1, 3, figsize=(17.0, 5.2))
    steps = [s for s in sweeps if kind(s) == "steps"]
    samples = [s for s in sweeps if kind(s) == "samples"]
    if steps:
        frame, configs = combine(steps)
        curves = gap_curves(frame, configs)
        colours = _colours(curves)
        _draw_steps(axes[0], curves, colours)
        _draw_survival(axes[2], survival_table(frame, configs), colours)
    if samples:
        frame, configs = combine(samples)
        _draw_samples(axes[1], samples_table(frame, configs))
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    fig.suptitle("Context distillation, KL(π_start(·|g + c) ‖ π(·|g)): theory dashed over "
                 "simulation (mean and 95% interval over seeds)")
    fig.tight_layout()
    return save(fig, Path(out) / FILENAME, formats=FORMATS, palette_png=True)
