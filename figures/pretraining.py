"""Figure 13: preference-model pre-training (PMP; Askell et al. 2021 §5; issue 13,
experiment 2).

Two sweeps (``figures/sweeps/pretraining_*.toml``): a reward head pre-trained on a
related behavior and then fine-tuned on ``n`` statements of the target
(``pretraining_pmp``, grid: the behaviors' cosine × ``n``), and the same fine-tuning
from a zero head (``pretraining_scratch``, grid: ``n``). A point is told apart by its
phases (:func:`pmp_of`), so the two may be drawn together or alone.

* :func:`accuracy_table`: per point × source, the target's held-out reward accuracy
  at the start of fine-tuning (after PMP; ½ from scratch) and at its end, seed means
  with sds and 95% t-intervals.
* :func:`samples_needed`: per (PMP, cosine), the target samples at which the seed-mean
  final accuracy first reaches ``level`` (log-linear between the swept ``n``), with a
  bootstrap interval over seeds; ``censored`` says where it is only a bound.
* :func:`target_level`: ``TARGET_FRACTION`` × the population asymptote (the flow's
  final accuracy of the target).

Held-out accuracy is ``heldout/reward_accuracy`` of the target behavior (the reward
head's ranking on a fresh sample per seed; the theory's is the population's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from figures.style import FORMATS, THEORY_STYLE, plt, ramp, save, theme

__all__ = ["TARGET_FRACTION", "ACCURACY", "pmp_of", "target_of", "related_of", "cosine_of",
           "target_n", "accuracy_table", "target_level", "crossing", "samples_needed",
           "transfer_accuracy", "plot"]

FILENAME = "fig13_pretraining"
TARGET_FRACTION = 0.9
"""The stated accuracy of panel (b): this fraction of the population optimum."""
ACCURACY = "heldout/reward_accuracy"
SCRATCH = "no PMP"


def _phases(config: dict) -> list[dict]:
    return list(config["train"]["phases"])


def pmp_of(config: dict) -> bool:
    """Whether the point pre-trains (a phase with ``pretraining = true``)."""
    return any(p.get("pretraining", False) for p in _phases(config))


def target_of(config: dict) -> str:
    """The target behavior: the (one) behavior of the last phase."""
    names = _phases(config)[-1]["behaviors"]
    if len(names) != 1:
        raise ValueError(f"figure 13 needs one target behavior, got {names!r}")
    return names[0]


def related_of(config: dict) -> str:
    """The behavior the point pre-trains on (the other behavior of the problem when it
    does not pre-train)."""
    for phase in _phases(config):
        if phase.get("pretraining", False):
            return phase["behaviors"][0]
    target = target_of(config)
    return next(b["name"] for b in config["problem"]["behaviors"] if b["name"] != target)


def cosine_of(config: dict) -> float:
    """Cosine between the related behavior's and the target's ``d_i`` (from the built
    problem, so any way of placing them counts)."""
    from dynamics.config import build_problem

    problem = build_problem(config)
    names = list(problem.names)
    a, b = (problem.directions[names.index(n)] for n in (related_of(config),
                                                         target_of(config)))
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def target_n(config: dict) -> int:
    """The target statements per seed the fine-tuning phase trains on."""
    phase = _phases(config)[-1]
    if phase.get("n") is not None:
        return int(phase["n"])
    from dynamics.config import build_problem
    from synthetic import allocate

    problem = build_problem(config)
    counts = allocate(int(config["train"]["n"]), problem.weights)
    return int(counts[list(problem.names).index(target_of(config))])


def _interval(values: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, sd and the 95% t-interval of the mean of ``values`` (NaN spreads for one)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, np.nan, np.nan, np.nan
    sd = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sd / np.sqrt(len(values))
    return mean, sd, mean - half, mean + half


def _fine_tuning(frame: pd.DataFrame, config: dict) -> pd.DataFrame:
    """The target's rows of the fine-tuning phase (the last) of one point."""
    last = frame["phase"].max()
    return frame[(frame["phase"] == last) & (frame["behavior"] == target_of(config))]


def accuracy_table(frame: pd.DataFrame, configs: dict) -> pd.DataFrame:
    """Per point × source: ``pmp``, ``cosine`` (NaN without PMP), ``n``; the target's
    held-out accuracy at the start of fine-tuning (``start``) and at its end
    (``final``), seed means with ``_sd`` and the 95% interval ``_low``/``_high`` (theory:
    one run, NaN spreads); ``seeds``."""
    rows = []
    for (pid, source), group in frame.groupby(["point", "source"], observed=True):
        config = configs[pid]
        mine = _fine_tuning(group, config)
        pmp = pmp_of(config)
        row = dict(point=pid, source=source, pmp=pmp,
                   cosine=cosine_of(config) if pmp else np.nan, n=target_n(config),
                   seeds=int(mine["seed"].nunique()) if source == "simulation" else 0)
        for name, step in (("start", mine["step"].min()), ("final", mine["step"].max())):
            values = mine[mine["step"] == step].sort_values("seed")[ACCURACY].to_numpy()
            (row[name], row[f"{name}_sd"], row[f"{name}_low"],
             row[f"{name}_high"]) = _interval(values)
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["source", "pmp", "cosine", "n"],
                                          ascending=[True, True, False, True],
                                          ignore_index=True)


def target_level(table: pd.DataFrame, fraction: float = TARGET_FRACTION) -> tuple[float, float]:
    """``(level, asymptote)``: the population asymptote is the flow's final accuracy of
    the target without pre-training (the population optimum; with PMP the flow ends
    within 2e-4 of it, panel c), and the level is ``fraction`` of it."""
    theory = table[table["source"] == "theory"]
    scratch = theory[~theory["pmp"]]
    asymptote = float((scratch if len(scratch) else theory)["final"].max())
    return fraction * asymptote, asymptote


def crossing(ns, curve, level: float) -> float:
    """The first ``n`` at which ``curve`` (over increasing ``ns``) reaches ``level``,
    log-linear between the grid points: ``ns[0]`` if it starts there (a bound: at most),
    ``inf`` if it never does."""
    ns, curve = np.asarray(ns, dtype=np.float64), np.asarray(curve, dtype=np.float64)
    above = np.flatnonzero(curve >= level)
    if len(above) == 0:
        return np.inf
    j = int(above[0])
    if j == 0:
        return float(ns[0])
    frac = (level - curve[j - 1]) / (curve[j] - curve[j - 1])
    return float(np.exp(np.log(ns[j - 1]) + frac * (np.log(ns[j]) - np.log(ns[j - 1]))))


def _final_matrix(frame: pd.DataFrame, configs: dict, pids) -> tuple[np.ndarray, np.ndarray]:
    """``(ns, A)``: the points' ``n`` in increasing order and their per-seed final held-out
    accuracies ``A`` (S, len(ns)), simulation only, seeds aligned."""
    columns = {}
    for pid in pids:
        mine = _fine_tuning(frame[(frame["point"] == pid) & (frame["source"] == "simulation")],
                            configs[pid])
        last = mine[mine["step"] == mine["step"].max()].set_index("seed")[ACCURACY]
        columns[target_n(configs[pid])] = last
    table = pd.DataFrame(columns).sort_index(axis=1)
    return table.columns.to_numpy(dtype=np.float64), table.to_numpy(dtype=np.float64)


def samples_needed(frame: pd.DataFrame, configs: dict, level: float, *, boot: int = 2000,
                   seed: int = 0) -> pd.DataFrame:
    """Per (``pmp``, ``cosine``): ``needed``, the target samples at which the seed-mean
    final accuracy first reaches ``level`` (:func:`crossing`); ``low``/``high`` the 2.5%
    and 97.5% quantiles of the same over ``boot`` bootstrap resamples of the seeds;
    ``censored`` ``"at most"`` where the smallest ``n`` already reaches it, ``"more
    than"`` where the largest does not, else ``""``."""
    groups: dict[tuple, list] = {}
    for pid, config in configs.items():
        pmp = pmp_of(config)
        groups.setdefault((pmp, round(cosine_of(config), 12) if pmp else np.nan), []).append(pid)
    rng = np.random.default_rng(seed)
    rows = []
    for (pmp, cosine), pids in groups.items():
        ns, acc = _final_matrix(frame, configs, pids)
        needed = crossing(ns, acc.mean(0), level)
        picks = rng.integers(0, len(acc), size=(boot, len(acc)))
        draws = np.array([crossing(ns, acc[p].mean(0), level) for p in picks])
        censored = ("at most" if needed == ns[0] else "more than" if np.isinf(needed) else "")
        rows.append(dict(pmp=pmp, cosine=cosine, needed=min(needed, ns[-1]) if np.isinf(needed)
                         else needed, low=float(np.quantile(draws, 0.025)),
                         high=float(np.quantile(draws, 0.975)), censored=censored,
                         seeds=len(acc), level=level))
    return pd.DataFrame(rows).sort_values(["pmp", "cosine"], ascending=[True, False],
                                          ignore_index=True)


def transfer_accuracy(cosine, distinguishability: float, sigma: float = 1.0):
    """The population's accuracy on the target of a head along the related behavior's
    ``d`` (where pre-training converges for isotropic Gaussian classes):
    ``Φ(cos · δ / (2σ))`` (docs/theory.md §13)."""
    return stats.norm.cdf(np.asarray(cosine, dtype=np.float64) * distinguishability
                          / (2 * sigma))


# ----------------------------------------------------------------------------- drawing


def _target_shape(config: dict) -> tuple[float, float]:
    """``(δ, σ)`` of the target behavior (isotropic builder)."""
    target = next(b for b in config["problem"]["behaviors"] if b["name"] == target_of(config))
    return float(target["distinguishability"]), float(target.get("sigma", 1.0))


def _colours(cosines) -> dict:
    return ramp(cosines, "coolwarm_r")


def _draw_curves(ax, table, level, asymptote) -> None:
    sim = table[table["source"] == "simulation"]
    colours = _colours(sim["cosine"].dropna())
    for (pmp, cosine), rows in sim.groupby(["pmp", "cosine"], dropna=False):
        rows = rows.sort_values("n")
        colour = colours[cosine] if pmp else "black"
        label = f"PMP, cos = {cosine:+.1f}" if pmp else SCRATCH
        ax.plot(rows["n"], rows["final"], marker="o", ms=4, color=colour, lw=1.5, label=label)
        ax.fill_between(rows["n"], rows["final_low"], rows["final_high"], color=colour,
                        alpha=0.15, lw=0)
    ax.axhline(asymptote, color="0.2", **THEORY_STYLE)
    ax.text(0.98, asymptote, f"population asymptote {asymptote:.3f} (flow)", ha="right",
            va="bottom", transform=ax.get_yaxis_transform(), fontsize=7, color="0.2")
    ax.axhline(level, color="0.5", ls=":", lw=1.2)
    ax.text(0.98, level, f"{TARGET_FRACTION:.0%} of it: {level:.3f}", ha="right", va="top",
            transform=ax.get_yaxis_transform(), fontsize=7, color="0.3")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("target statements n (fine-tuning; log)")
    ax.set_ylabel("target held-out accuracy after fine-tuning")
    ax.set_title("(a) Held-out accuracy against the target's samples\n(mean over seeds, "
                 "95% interval; dashed: theory)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")


def _draw_needed(ax, needed) -> None:
    pmp = needed[needed["pmp"]].sort_values("cosine")
    scratch = needed[~needed["pmp"]]
    colours = _colours(pmp["cosine"])
    if len(scratch):
        row = scratch.iloc[0]
        ax.axhspan(row["low"], row["high"], color="black", alpha=0.1, lw=0)
        ax.axhline(row["needed"], color="black", lw=1.4,
                   label=f"{SCRATCH}: {row['needed']:.0f} [{row['low']:.0f}, {row['high']:.0f}]")
    for row in pmp.itertuples():
        marker = {"at most": "v", "more than": "^"}.get(row.censored, "o")
        ax.errorbar(row.cosine, row.needed, yerr=[[row.needed - row.low],
                                                  [max(row.high - row.needed, 0)]],
                    marker=marker, ms=7, color=colours[row.cosine], capsize=4, lw=1.4)
        text = f"{'≤ ' if row.censored == 'at most' else ''}{row.needed:.0f}"
        ax.annotate(text, (row.cosine, row.needed), xytext=(6, 4), textcoords="offset points",
                    fontsize=7)
    ax.plot(pmp["cosine"], pmp["needed"], color="0.4", lw=0.8, label="PMP (▼: at most)")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("cosine between the related behavior's d and the target's")
    ax.set_ylabel("target samples to reach the level (log)")
    level = float(needed["level"].iloc[0])
    ax.set_title(f"(b) Samples needed to reach {level:.3f} ({TARGET_FRACTION:.0%} of the "
                 "optimum)\nbootstrap 95% over seeds; fewer than no-PMP: transfer helps",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper right")


def _draw_start(ax, table, config) -> None:
    delta, sigma = _target_shape(config)
    grid = np.linspace(-1, 1, 201)
    ax.plot(grid, transfer_accuracy(grid, delta, sigma), color="0.2",
            label=f"closed form Φ(cos·δ/2σ), δ = {delta:g}", lw=1.0)
    sim = table[(table["source"] == "simulation") & table["pmp"]].sort_values("cosine")
    theory = table[(table["source"] == "theory") & table["pmp"]]
    theory = theory.groupby("cosine", as_index=False)[["start", "final"]].mean()
    start = sim.groupby("cosine", as_index=False)[["start", "start_sd"]].mean()
    colours = _colours(start["cosine"])
    for row in start.itertuples():
        ax.errorbar(row.cosine, row.start, yerr=row.start_sd, marker="o", ms=6,
                    color=colours[row.cosine], capsize=4)
    ax.plot(theory["cosine"], theory["start"], marker="x", ms=8, color="0.2", lw=0,
            label="flow: start of fine-tuning")
    ax.plot(theory["cosine"], theory["final"], color="0.2", marker="+", ms=8,
            label="flow: end (population asymptote)", **THEORY_STYLE)
    ax.axhline(0.5, color="0.6", lw=0.8)
    ax.set_xlabel("cosine between the related behavior's d and the target's")
    ax.set_ylabel("target held-out accuracy")
    ax.set_title("(c) After PMP, before fine-tuning: simulation (mean ± sd) under\nthe "
                 "flow and the closed form; below ½ where the behaviors point apart",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def plot(sweeps, out: Path) -> list[Path]:
    """(a) final held-out accuracy against n, with and without PMP per cosine; (b) the
    samples needed to reach ``TARGET_FRACTION`` of the optimum against the cosine; (c)
    the accuracy PMP hands to fine-tuning against the cosine, theory over measurement."""
    sweeps = list(sweeps)
    theme()
    frame = pd.concat([s.frame() for s in sweeps], ignore_index=True)
    configs = {pid: c for s in sweeps for pid, c in s.configs().items()}
    table = accuracy_table(frame, configs)
    level, asymptote = target_level(table)
    needed = samples_needed(frame, configs, level)
    fig, axes = plt.subplots(1, 3, figsize=(17.0, 5.4))
    _draw_curves(axes[0], table, level, asymptote)
    _draw_needed(axes[1], needed)
    if table["pmp"].any():
        _draw_start(axes[2], table, next(c for c in configs.values() if pmp_of(c)))
    else:
        axes[2].set_visible(False)
    fig.suptitle("Preference-model pre-training: a reward head pre-trained on a related "
                 "behavior, then fine-tuned on n target statements")
    fig.tight_layout()
    return save(fig, Path(out) / FILENAME, formats=FORMATS, palette_png=True)
