"""Figure 14: principle-driven labels (Self-Align; Sun et al. 2023; issue 13, experiment 4).

Three sweeps (``figures/sweeps/principles_*.toml``), told apart by :func:`kind`:

* **judge** (principles swept, ``train.n`` fixed): DPO on statements labelled by a vote
  of ``k`` principles at cosine ``ρ`` with ``d``. :func:`judge_table`: per point the
  final held-out clean accuracy (against the true preference), the training accuracy
  against the judge's labels, and the labels' quality in closed form
  (:func:`synthetic.principles.label_quality`: the vote's and the summed direction's).
* **samples** (principles and ``train.n`` swept): the same DPO on ``n`` judge labels.
* **true** (no principles, ``train.n`` swept): a reward model on ``m`` true labels.
  :func:`samples_table` puts both on one scale (the held-out accuracy against the truth:
  ``heldout/clean_accuracy`` of DPO's policy, ``heldout/reward_accuracy`` of the head,
  whose labels are the truth); :func:`exchange_rate` finds the ``m`` at which true
  labels match the judge's accuracy at its largest ``n``.

Every number is a seed mean of the final recorded step with its sd and 95% t-interval
(theory: the population flow, one run).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from figures.pretraining import _interval, crossing
from figures.style import FORMATS, THEORY_STYLE, plt, ramp, save, theme
from synthetic.principles import label_quality

__all__ = ["FIXED_COSINE", "DRAWN_COUNTS", "kind", "judge_table", "samples_table",
           "exchange_rate", "bayes_accuracy", "plot"]

FILENAME = "fig14_principles"
FIXED_COSINE = 0.4
"""Panel (b)'s cosine: accuracy against the number of principles at this ρ."""
DRAWN_COUNTS = (1, 3, 9)
"""Panel (a)'s numbers of principles."""
CLEAN = "heldout/clean_accuracy"
TRUE = "heldout/reward_accuracy"


def _judge(config: dict) -> dict | None:
    return config["problem"].get("principles")


def kind(sweep) -> str:
    """``"true"`` (no principles), ``"samples"`` (``train.n`` swept) or ``"judge"``."""
    config = next(iter(sweep.configs().values()))
    if _judge(config) is None:
        return "true"
    return "samples" if "train.n" in sweep.keys else "judge"


def _behavior(config: dict) -> dict:
    behaviors = config["problem"]["behaviors"]
    if len(behaviors) != 1:
        raise ValueError("figure 14 needs one behavior per problem")
    return behaviors[0]


def bayes_accuracy(config: dict) -> float:
    """``Φ(δ/2σ)``: the Bayes rule's accuracy on the (isotropic) behavior, the limit of
    the judge's labels as ``k → ∞`` and of training on true labels."""
    b = _behavior(config)
    return float(stats.norm.cdf(b["distinguishability"] / (2 * b.get("sigma", 1.0))))


def _quality(config: dict, combine: str | None = None) -> float:
    judge = _judge(config)
    b = _behavior(config)
    return label_quality(judge["cosine"], judge["count"], b["distinguishability"],
                         sigma=b.get("sigma", 1.0), combine=combine or judge["combine"])


def _final(group: pd.DataFrame, metric: str) -> np.ndarray:
    last = group[group["step"] == group["step"].max()]
    return last.sort_values("seed")[metric].to_numpy(dtype=np.float64)


def _add(row: dict, name: str, values: np.ndarray) -> None:
    row[name], row[f"{name}_sd"], row[f"{name}_low"], row[f"{name}_high"] = _interval(values)


def judge_table(frame: pd.DataFrame, configs: dict) -> pd.DataFrame:
    """Per point × source of judge-labelled runs: ``cosine``, ``count``, ``combine``,
    ``n``; ``clean`` (final held-out clean accuracy) and ``agreement`` (final training
    accuracy against the judge's labels), each with ``_sd``, ``_low``, ``_high``;
    ``quality`` (the labels' quality, closed form), ``summed_quality`` (that of one
    principle along their sum) and ``bayes``."""
    rows = []
    for (pid, source), group in frame.groupby(["point", "source"], observed=True):
        config = configs[pid]
        judge = _judge(config)
        if judge is None:
            continue
        row = dict(point=pid, source=source, cosine=float(judge["cosine"]),
                   count=int(judge["count"]), combine=judge["combine"],
                   n=int(config["train"]["n"]), quality=_quality(config),
                   summed_quality=_quality(config, "sum"), bayes=bayes_accuracy(config))
        _add(row, "clean", _final(group, CLEAN))
        _add(row, "agreement", _final(group, "accuracy"))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["source", "count", "cosine", "n"],
                                          ignore_index=True)


def samples_table(frame: pd.DataFrame, configs: dict) -> pd.DataFrame:
    """Per point × source: ``labels`` (``"judge"`` or ``"true"``), ``cosine`` (NaN for
    true labels), ``n`` and ``accuracy``, the final held-out accuracy against the true
    preference (``_sd``, ``_low``, ``_high``)."""
    rows = []
    for (pid, source), group in frame.groupby(["point", "source"], observed=True):
        config = configs[pid]
        judge = _judge(config)
        row = dict(point=pid, source=source, labels="true" if judge is None else "judge",
                   cosine=np.nan if judge is None else float(judge["cosine"]),
                   count=0 if judge is None else int(judge["count"]),
                   n=int(config["train"]["n"]))
        _add(row, "accuracy", _final(group, TRUE if judge is None else CLEAN))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["source", "labels", "cosine", "n"],
                                          ignore_index=True)


def _per_seed(frame, configs, pids, metric_of) -> tuple[np.ndarray, np.ndarray]:
    """``(ns, A)``: increasing ``n`` and the per-seed final accuracies (S, len(ns))."""
    columns = {}
    for pid in pids:
        rows = frame[(frame["point"] == pid) & (frame["source"] == "simulation")]
        last = rows[rows["step"] == rows["step"].max()]
        columns[int(configs[pid]["train"]["n"])] = last.set_index("seed")[metric_of(pid)]
    table = pd.DataFrame(columns).sort_index(axis=1)
    return table.columns.to_numpy(dtype=np.float64), table.to_numpy(dtype=np.float64)


def exchange_rate(frame: pd.DataFrame, configs: dict, *, boot: int = 2000,
                  seed: int = 0) -> pd.DataFrame:
    """Per judge cosine of the samples sweep: ``judge_n`` (its largest ``n``), ``judge``
    (its seed-mean accuracy there) and ``m``, the true labels at which the reward model's
    seed-mean accuracy first reaches it (:func:`figures.pretraining.crossing`; ``inf``
    if it never does), with ``low``/``high`` the 2.5%/97.5% quantiles over ``boot``
    bootstrap resamples of both runs' seeds."""
    true = [p for p, c in configs.items() if _judge(c) is None]
    judged: dict[float, list] = {}
    for pid, config in configs.items():
        if _judge(config) is not None:
            judged.setdefault(float(_judge(config)["cosine"]), []).append(pid)
    ms, reward = _per_seed(frame, configs, true, lambda _: TRUE)
    rng = np.random.default_rng(seed)
    rows = []
    for cosine, pids in sorted(judged.items()):
        ns, clean = _per_seed(frame, configs, pids, lambda _: CLEAN)
        level = float(clean[:, -1].mean())
        m = crossing(ms, reward.mean(0), level)
        draws = []
        for _ in range(boot):
            a = clean[rng.integers(0, len(clean), len(clean)), -1].mean()
            b = reward[rng.integers(0, len(reward), len(reward))].mean(0)
            draws.append(crossing(ms, b, a))
        rows.append(dict(cosine=cosine, judge_n=int(ns[-1]), judge=level, m=m,
                         low=float(np.quantile(draws, 0.025)),
                         high=float(np.quantile(draws, 0.975))))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- drawing


def _draw_cosine(ax, table) -> None:
    colours = dict(zip(DRAWN_COUNTS, ("C0", "C1", "C2")))
    some = table.iloc[0]
    grid = np.linspace(0, 1, 101)
    for k in DRAWN_COUNTS:
        sim = table[(table["source"] == "simulation") & (table["count"] == k)]
        theory = table[(table["source"] == "theory") & (table["count"] == k)]
        if sim.empty:
            continue
        c = colours[k]
        ax.errorbar(sim["cosine"], sim["clean"], yerr=[sim["clean"] - sim["clean_low"],
                                                       sim["clean_high"] - sim["clean"]],
                    marker="o", ms=5, color=c, capsize=3, lw=1.4,
                    label=f"k = {k}: DPO's clean accuracy")
        ax.plot(theory["cosine"], theory["clean"], color=c, marker="x", **THEORY_STYLE)
        # the labels' quality at this k, for the problem of the sweep
        quality = [label_quality(r, k, _delta(some), sigma=1.0) for r in grid]
        ax.plot(grid, quality, color=c, lw=0.9, alpha=0.7, ls=":")
    ax.axhline(float(some["bayes"]), color="0.3", lw=0.8)
    ax.text(0.02, float(some["bayes"]), f"Bayes Φ(δ/2σ) = {some['bayes']:.3f}", fontsize=7,
            va="bottom", transform=ax.get_yaxis_transform())
    ax.plot([], [], color="0.3", ls=":", label="labels' quality (closed form)")
    ax.plot([], [], color="0.3", marker="x", label="flow (theory)", **THEORY_STYLE)
    ax.set_xlabel("cosine ρ of each principle with d")
    ax.set_ylabel("held-out accuracy on the true preference")
    ax.set_title("(a) DPO on a judge's labels: clean accuracy against ρ\n(mean, 95% "
                 f"interval over seeds; n = {int(some['n'])})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def _delta(row) -> float:
    """δ of the sweep's behavior from the Bayes accuracy (σ = 1 in these sweeps)."""
    return float(2 * stats.norm.ppf(row["bayes"]))


def _draw_count(ax, table) -> None:
    rows = table[np.isclose(table["cosine"], FIXED_COSINE)]
    sim = rows[rows["source"] == "simulation"].sort_values("count")
    theory = rows[rows["source"] == "theory"].sort_values("count")
    ax.errorbar(sim["count"], sim["clean"], yerr=[sim["clean"] - sim["clean_low"],
                                                  sim["clean_high"] - sim["clean"]],
                marker="o", color="C3", capsize=3, lw=1.4, label="DPO's clean accuracy")
    ax.plot(theory["count"], theory["clean"], color="0.2", marker="x", label="flow (theory)",
            **THEORY_STYLE)
    ks = np.arange(1, int(sim["count"].max()) + 1, 2)
    delta = _delta(sim.iloc[0])
    ax.plot(ks, [label_quality(FIXED_COSINE, k, delta) for k in ks], color="C3", ls=":",
            marker=".", label="labels' quality: vote (closed form)")
    ax.plot(ks, [label_quality(FIXED_COSINE, k, delta, combine="sum") for k in ks],
            color="0.5", ls="-.", lw=1.0, label="one principle along their sum")
    bayes = float(sim["bayes"].iloc[0])
    ax.axhline(bayes, color="0.3", lw=0.8)
    ax.text(0.98, bayes, f"Bayes limit Φ(δ/2σ) = {bayes:.3f}", fontsize=7, ha="right",
            va="bottom", transform=ax.get_yaxis_transform())
    ax.set_xlabel("principles combined k (majority vote)")
    ax.set_ylabel("held-out accuracy on the true preference")
    ax.set_title(f"(b) Against the number of principles at ρ = {FIXED_COSINE:g}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def _draw_samples(ax, table, rate) -> None:
    sim = table[table["source"] == "simulation"]
    theory = table[table["source"] == "theory"]
    cosines = sorted(sim["cosine"].dropna().unique())
    colours = ramp(cosines, "flare")
    curves = [("true", np.nan, "black", "reward model on m true labels")]
    curves += [("judge", c, colours[c], f"DPO on n judge labels, ρ = {c:g}") for c in cosines]
    for labels, cosine, colour, label in curves:
        pick = (sim["labels"] == labels) & (np.isnan(cosine) | np.isclose(sim["cosine"], cosine))
        rows = sim[pick].sort_values("n")
        ax.plot(rows["n"], rows["accuracy"], marker="o", ms=4, color=colour, lw=1.5,
                label=label)
        ax.fill_between(rows["n"], rows["accuracy_low"], rows["accuracy_high"],
                        color=colour, alpha=0.15, lw=0)
        pick = (theory["labels"] == labels) & (np.isnan(cosine)
                                               | np.isclose(theory["cosine"], cosine))
        ax.axhline(float(theory[pick]["accuracy"].mean()), color=colour, **THEORY_STYLE)
    for row in rate.itertuples():
        if not np.isfinite(row.m):
            continue
        colour = colours[row.cosine]
        ax.axvspan(row.low, row.high, color=colour, alpha=0.12, lw=0)
        ax.axvline(row.m, color=colour, lw=1.0, ls=":")
        ax.annotate(f"ρ = {row.cosine:g}: {row.judge_n} judge labels\n≈ {row.m:.0f} true "
                    f"[{row.low:.0f}, {row.high:.0f}]", (row.m, 0.03 + 0.1 * row.Index),
                    xycoords=ax.get_xaxis_transform(), fontsize=7, xytext=(4, 0),
                    textcoords="offset points", color=colour)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labelled statements (n judge labels, or m true labels; log)")
    ax.set_ylabel("held-out accuracy on the true preference")
    ax.set_title("(c) What the principles are worth in true labels (k = 3; dashed: "
                 "flow)\nthe judge beats true labels left of its dotted m", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def plot(sweeps, out: Path) -> list[Path]:
    """(a) clean accuracy against ρ for k = 1, 3, 9, the labels' quality and the flow over
    it; (b) against k at ``FIXED_COSINE`` with the Bayes limit; (c) against the number of
    labels: DPO on judge labels beside a reward model on true labels, and the exchange
    rate."""
    sweeps = list(sweeps)
    theme()
    by_kind: dict[str, list] = {}
    for sweep in sweeps:
        by_kind.setdefault(kind(sweep), []).append(sweep)

    def gather(kinds):
        group = [s for k in kinds for s in by_kind.get(k, [])]
        if not group:
            return None, None
        return (pd.concat([s.frame() for s in group], ignore_index=True),
                {pid: c for s in group for pid, c in s.configs().items()})

    fig, axes = plt.subplots(1, 3, figsize=(17.0, 5.4))
    frame, configs = gather(["judge"])
    if frame is not None:
        table = judge_table(frame, configs)
        _draw_cosine(axes[0], table)
        _draw_count(axes[1], table)
    frame, configs = gather(["samples", "true"])
    if frame is not None:
        rate = (exchange_rate(frame, configs) if {"samples", "true"} <= set(by_kind)
                else pd.DataFrame(columns=["cosine", "m"]))
        _draw_samples(axes[2], samples_table(frame, configs), rate)
    for ax in axes:
        if not ax.has_data():
            ax.set_visible(False)
    fig.suptitle("Principle-driven labels: training on a judge's votes, measured against the "
                 "true preference")
    fig.tight_layout()
    return save(fig, Path(out) / FILENAME, formats=FORMATS, palette_png=True)
