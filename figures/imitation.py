"""Figure 15: imitation (``sft``), binary discrimination (``binary``) and ranked preference
(``reward_model``) trained on the same preference data (issue 13, experiment 1; HHH §4;
docs/theory.md §12): held-out preference accuracy against the number of training pairs
and against the head's capacity.

The accuracy (:data:`METRIC`): a reward head's ``heldout/reward_accuracy``
(``r(y_w) > r(y_l)``) and the imitating policy's ``heldout/accuracy``
(``log π(y_w) > log π(y_l)``), each on a held-out draw per seed; both are the ranking of
the chosen over the rejected answer, and for V = 2 and a linear head Proposition 11 (1)
makes them the same function of the difference vector. Theory rows: the population's.

Six sweeps (``figures/sweeps/imitation_*.toml``), told apart by :func:`kind`:

* **samples** (``train.n`` and ``train.objective``) and **start** (``train.n`` and
  ``model.init_scale``, imitation only): against n at a fixed step budget
  (:data:`BUDGET_STEP`) and at the end; the flow's value is the asymptote.
* **features** (``model.features``): against the feature dimension k the head sees, with
  the marginal problem's flow.
* **mlp** (``model.hidden_units``) and **linear** (neither: the linear head on the same
  problem, with its flow): against the MLP's hidden units H.
* **vocab** (``train.n`` at ``model.vocab_size`` > 2, imitation only).

:func:`per_seed` is the accuracy of every point × source × seed at a step,
:func:`summary` its seed mean with the 95% t interval (:func:`interval`), and
:func:`paired` the per-seed difference of two objectives at equal n (the same seed draws
the same sample for every objective, so the difference is paired).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from figures.tables import combine, interval  # noqa: F401 (re-exported)
from figures.style import FORMATS, THEORY_STYLE, palette, plt, save, theme

__all__ = ["METRIC", "BUDGET_STEP", "kind", "combine", "interval", "per_seed", "summary",
           "paired", "plot"]

FILENAME = "fig15_imitation_vs_preference"
METRIC = {"sft": "heldout/accuracy", "binary": "heldout/reward_accuracy",
          "reward_model": "heldout/reward_accuracy"}
"""The held-out preference accuracy each objective is read by."""
BUDGET_STEP = 2
"""The fixed step budget (t = 1 at the sweeps' lr 0.5), before any head has converged."""
NAMES = {"sft": "imitation (sft)", "binary": "binary discrimination",
         "reward_model": "ranked preference (reward_model)"}


def kind(sweep) -> str:
    """``samples``, ``start``, ``features``, ``mlp``, ``linear`` or ``vocab``, from a
    sweep's swept keys (and, for ``vocab``, its configs' vocab_size)."""
    keys = set(sweep.keys)
    if "model.features" in keys:
        return "features"
    if "model.hidden_units" in keys:
        return "mlp"
    if "model.init_scale" in keys:
        return "start"
    if "train.n" in keys:
        vocab = {c["model"]["vocab_size"] for c in sweep.configs().values()}
        return "vocab" if max(vocab) > 2 else "samples"
    return "linear"


def _describe(config: dict) -> dict:
    model, train = config["model"], config["train"]
    objective = train["objective"]
    return dict(objective=objective if isinstance(objective, str) else objective["name"],
                n=train["n"], k=model.get("features", config["problem"]["dim"]),
                H=model.get("hidden_units", 0), init_scale=model["init_scale"],
                vocab=model["vocab_size"])


def per_seed(frame: pd.DataFrame, configs: dict, step: int | None = None) -> pd.DataFrame:
    """Per point × source × seed: the held-out preference accuracy ``accuracy``
    (:data:`METRIC` of the point's objective, behavior-weighted over the behaviors) at
    ``step`` (``None``: each point's last), with the point's ``objective``, ``n``, ``k``
    (features seen), ``H`` (hidden units, 0 for the linear head), ``init_scale`` and
    ``vocab``. A ValueError if a point did not record ``step``."""
    rows = []
    for pid, group in frame.groupby("point", sort=False):
        info = _describe(configs[pid])
        at = group["step"].max() if step is None else step
        here = group[group["step"] == at]
        if here.empty:
            raise ValueError(f"step = {step} was not recorded for point {pid!r} "
                             f"(train.eval_every = {configs[pid]['train']['eval_every']})")
        weights = {b["name"]: b.get("weight", 1.0) for b in configs[pid]["problem"]["behaviors"]}
        weight = here["behavior"].map(weights).astype(np.float64)
        value = here[METRIC[info["objective"]]] * weight
        total = (pd.DataFrame({"source": here["source"], "seed": here["seed"], "v": value,
                               "w": weight})
                 .groupby(["source", "seed"], dropna=False)[["v", "w"]].sum())
        for (source, seed), row in total.iterrows():
            rows.append(dict(point=pid, source=source, seed=seed, step=at, **info,
                             accuracy=row["v"] / row["w"]))
    return pd.DataFrame(rows)


def summary(seeds: pd.DataFrame) -> pd.DataFrame:
    """Per point × source: the seed mean of :func:`per_seed`'s accuracy with ``_sd`` and
    ``_half`` (the 95% interval's half-width; NaN on theory rows) and ``seeds``."""
    keys = ["point", "source", "step", "objective", "n", "k", "H", "init_scale", "vocab"]
    rows = []
    for key, group in seeds.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, key), seeds=len(group))
        row["accuracy"], row["accuracy_sd"], row["accuracy_half"] = interval(group["accuracy"])
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["source", "objective", "init_scale", "n", "k", "H"],
                                          ignore_index=True)


def paired(seeds: pd.DataFrame, a: str, b: str, by: str = "n") -> pd.DataFrame:
    """Per value of ``by``: objective ``a``'s accuracy minus ``b``'s, seed by seed
    (simulation rows of equal ``by``), its mean ``diff`` with ``_sd``, ``_half`` and
    ``seeds``."""
    sim = seeds[seeds["source"] == "simulation"]
    rows = []
    for value, group in sim.groupby(by):
        left = group[group["objective"] == a].set_index("seed")["accuracy"]
        right = group[group["objective"] == b].set_index("seed")["accuracy"]
        if left.empty or right.empty:
            continue
        diff = (left - right).dropna()
        row = {by: value, "seeds": len(diff)}
        row["diff"], row["diff_sd"], row["diff_half"] = interval(diff)
        rows.append(row)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- drawing


def _colours() -> dict:
    return palette(list(NAMES))


def _errorbar(ax, table, x, colour, label, **kw):
    sim = table[table["source"] == "simulation"].sort_values(x)
    ax.errorbar(sim[x], sim["accuracy"], yerr=sim["accuracy_half"], color=colour, marker="o",
                ms=4, capsize=3, lw=1.4, label=label, **kw)


def _by_n(ax, tables, colours, title, theory_table):
    """Accuracy against n for the three objectives (imitation at init_scale 1) and
    imitation's other starts; the flow's value at that step per objective (and for
    imitation from the strong reference) dashed."""
    samples, start = tables
    for objective in NAMES:
        rows = samples[samples["objective"] == objective]
        _errorbar(ax, rows, "n", colours[objective], NAMES[objective])
    if start is not None:
        for scale, style in ((0.0, dict(ls=":", mfc="white")), (3.0, dict(ls="-.",
                                                                             mfc="white"))):
            rows = start[start["init_scale"] == scale]
            if not rows.empty:
                _errorbar(ax, rows, "n", colours["sft"], f"imitation, init_scale {scale:g}",
                          alpha=0.75, **style)
            flow = rows[rows["source"] == "theory"]["accuracy"]
            if len(flow) and scale != 0.0:  # u0 = 0: ranked preference's flow, drawn
                ax.axhline(float(flow.mean()), color=colours["sft"], lw=1.0, ls="--",
                           alpha=0.6)
    for objective in NAMES:
        flow = theory_table[(theory_table["objective"] == objective)
                            & (theory_table["source"] == "theory")]["accuracy"]
        if len(flow):
            ax.axhline(float(flow.mean()), color=colours[objective], lw=1.0,
                       **{k: v for k, v in THEORY_STYLE.items() if k != "linewidth"})
    ax.plot([], [], color="0.3", label="population flow (each objective's colour)",
            **THEORY_STYLE)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training pairs n")
    ax.set_ylabel("held-out preference accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")


def _draw_features(ax, table, colours):
    for objective in NAMES:
        rows = table[table["objective"] == objective]
        _errorbar(ax, rows, "k", colours[objective], NAMES[objective])
    theory = (table[table["source"] == "theory"].groupby("k")["accuracy"].mean())
    ax.plot(theory.index, theory.to_numpy(), color="0.15", label="population flow "
            "(marginal problem)", **THEORY_STYLE)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("features the head sees, k (of d = 16)")
    ax.set_ylabel("held-out preference accuracy at the end")
    sim = table[table["source"] == "simulation"]
    ranked = sim[sim["objective"] == "reward_model"].set_index("k")["accuracy"]
    n = int(sim["n"].iloc[0])
    ax.set_title(f"(c) Capacity as features k (n = {n}, end): ranked preference "
                 f"{ranked.iloc[0]:.3f} at k = {ranked.index[0]},\n{ranked.max():.3f} at "
                 f"k = {ranked.idxmax()}, {ranked.iloc[-1]:.3f} at k = {ranked.index[-1]}; "
                 f"the flow {theory.iloc[0]:.3f} to {theory.iloc[-1]:.3f}", fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")


def _draw_mlp(ax, table, linear, colours):
    for objective in NAMES:
        rows = table[table["objective"] == objective]
        _errorbar(ax, rows, "H", colours[objective], NAMES[objective])
    if linear is not None:
        for objective in NAMES:
            rows = linear[(linear["objective"] == objective)
                          & (linear["source"] == "simulation")]
            if len(rows):
                ax.axhline(float(rows["accuracy"].mean()), color=colours[objective], lw=0.9,
                           ls=(0, (1, 1)))
        flow = linear[linear["source"] == "theory"]["accuracy"]
        ax.axhline(float(flow.mean()), color="0.15", label="linear head: flow (dashed), "
                   "simulation (dotted)", **THEORY_STYLE)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MLP hidden units H")
    ax.set_ylabel("held-out preference accuracy at the end")
    n = int(table["n"].iloc[0])
    ax.set_title(f"(d) Capacity as an MLP head on classes that differ in covariance\n"
                 f"(n = {n}, end; Bayes 0.796, every linear ranking at chance)", fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")


def _draw_vocab(ax, vocab_budget, vocab_end, samples_budget, samples_end, colours):
    for table, step_name, style in ((vocab_budget, "budget", "-"), (vocab_end, "end", "--")):
        step = int(table["step"].iloc[0])
        _errorbar(ax, table, "n", colours["sft"], f"imitation, V = 8, step {step}", ls=style)
    for table, style in ((samples_budget, "-"), (samples_end, "--")):
        step = int(table["step"].iloc[0])
        rows = table[table["objective"] == "reward_model"]
        _errorbar(ax, rows, "n", colours["reward_model"], f"ranked preference, step {step}",
                  ls=style, alpha=0.7)
    for table in (vocab_budget, vocab_end):
        flow = table[table["source"] == "theory"]["accuracy"]
        if len(flow):
            ax.axhline(float(flow.mean()), color=colours["sft"], lw=1.0, ls="--", alpha=0.9)
    ax.plot([], [], color=colours["sft"], ls="--", label="imitation's flow, V = 8")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training pairs n")
    ax.set_ylabel("held-out preference accuracy")
    big = vocab_budget[vocab_budget["source"] == "simulation"].sort_values("n").iloc[-1]
    ref = samples_budget[(samples_budget["source"] == "simulation")
                         & (samples_budget["objective"] == "reward_model")
                         & (samples_budget["n"] == big["n"])]["accuracy"]
    ax.set_title(f"(e) V = 8: imitation also pushes six other rows; at step "
                 f"{int(big['step'])}, n = {int(big['n'])}: {big['accuracy']:.3f}\nagainst ranked "
                 f"preference's {float(ref.mean()):.3f}; the same at the end", fontsize=9)
    ax.legend(fontsize=6.5, loc="lower right")


def _draw_gaps(ax, budget_seeds, end_seeds, colours):
    for seeds, style, when in ((budget_seeds, "-", "budget"), (end_seeds, "--", "end")):
        step = int(seeds["step"].iloc[0]) if when == "budget" else None
        for other in ("sft", "binary"):
            gap = paired(seeds, "reward_model", other)
            if gap.empty:
                continue
            label = (f"ranked − {NAMES[other].split(' (')[0]}, "
                     + (f"step {step}" if step is not None else "end"))
            ax.errorbar(gap["n"], gap["diff"], yerr=gap["diff_half"], color=colours[other],
                        ls=style, marker="o", ms=4, capsize=3, lw=1.3, label=label)
    ax.axhline(0.0, color="0.3", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training pairs n")
    ax.set_ylabel("accuracy difference (paired by seed)")
    ax.set_title("(f) Does ranked preference beat, and scale better than, the others?\n"
                 "Paired per-seed differences, 95% intervals", fontsize=9)
    ax.legend(fontsize=6.5, loc="upper right")


def plot(sweeps, out: Path) -> list[Path]:
    """(a, b) accuracy against n at the step budget and at the end, with imitation's
    other starts and the flow; (c) against the features k; (d) against the MLP's hidden
    units H with the linear head; (e) V = 8; (f) ranked preference minus the others,
    paired by seed, against n."""
    sweeps = list(sweeps)
    theme()
    colours = _colours()
    fig, axes = plt.subplots(2, 3, figsize=(17.0, 10.0))
    by_kind: dict[str, list] = {}
    for sweep in sweeps:
        by_kind.setdefault(kind(sweep), []).append(sweep)

    def load(name):
        return combine(by_kind[name]) if name in by_kind else None

    samples, start = load("samples"), load("start")
    if samples is not None:
        budget = per_seed(*samples, step=BUDGET_STEP)
        end = per_seed(*samples)
        start_budget = summary(per_seed(*start, step=BUDGET_STEP)) if start else None
        start_end = summary(per_seed(*start)) if start else None
        _by_n(axes[0, 0], (summary(budget), start_budget), colours,
              f"(a) Against n at a fixed budget (step {BUDGET_STEP}, t = "
              f"{BUDGET_STEP * _lr(samples[1]):g}); imitation from u0 = 0\nis ranked "
              f"preference exactly, from a strong reference it lags", summary(budget))
        _by_n(axes[0, 1], (summary(end), start_end), colours,
              f"(b) Against n near convergence (step {int(end['step'].max())}): the three "
              f"coincide\nfrom n = 16 (Proposition 11), the flow's value the asymptote",
              summary(end))
        _draw_gaps(axes[1, 2], budget, end, colours)
    features = load("features")
    if features is not None:
        _draw_features(axes[0, 2], summary(per_seed(*features)), colours)
    mlp = load("mlp")
    if mlp is not None:
        linear = load("linear")
        _draw_mlp(axes[1, 0], summary(per_seed(*mlp)),
                  summary(per_seed(*linear)) if linear else None, colours)
    vocab = load("vocab")
    if vocab is not None and samples is not None:
        _draw_vocab(axes[1, 1], summary(per_seed(*vocab, step=BUDGET_STEP)),
                    summary(per_seed(*vocab)), summary(budget), summary(end), colours)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    fig.suptitle("Imitation, binary discrimination and ranked preference on the same "
                 "preference data (mean and 95% interval over seeds; theory dashed)")
    fig.tight_layout()
    return save(fig, Path(out) / FILENAME, formats=FORMATS, palette_png=True)


def _lr(configs: dict) -> float:
    return float(next(iter(configs.values()))["train"]["lr"])
