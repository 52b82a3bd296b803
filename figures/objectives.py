"""Figure 8: one problem, every objective; and DPO's relatives under label noise.

Top: the same three behaviors (``δ = 3, 2, 1``, orthogonal ``d_i``, trained
together on shared rows) under each registered objective, theory dashed over
simulation. Each panel draws the loss *progress* ``L_i(0) − L_i(t)`` per behavior
(the objectives' losses have different scales) and states the learning order three
ways: predicted by ``⟨d_i, b̄⟩`` (:func:`dynamics.bounds.priority_scores`; for a
margin objective every behavior's initial loss slope is ``−G ℓ'(0)²⟨m_i, m⟩``, so
the order is the same for all of them), from the theory's first step, and
measured (the simulated initial slopes). "holds" when measured = predicted.

Bottom: the accuracy against the *true* preferences (``clean_accuracy``, mean
over behaviors) against the label noise ``ε`` of the training data, for DPO, cDPO
and robust DPO with their ``ε`` set to the noise, early in the run (a tenth of it)
and at the end; and, early, over the grid of objective ``ε`` × data noise for cDPO
and robust DPO (what a wrong ``ε`` costs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dynamics.config import objective_name
from dynamics.objectives import OBJECTIVES
from figures.priority import initial_slopes, measured_order, predicted_order
from figures.style import FORMATS, THEORY_STYLE, palette, plt, save, sns, theme

__all__ = ["objective_label", "objective_epsilon", "priority_table", "noise_table",
           "matched", "early_step", "plot"]

FILENAME = "fig8_objectives"
NOISE_OBJECTIVES = ("dpo", "cdpo", "robust_dpo")


def objective_label(spec) -> str:
    """``cdpo (ε=0.1)`` for a table with hyperparameters, the name otherwise."""
    if isinstance(spec, str):
        return spec
    rest = ", ".join(f"{'ε' if k == 'epsilon' else k}={v:g}" for k, v in spec.items()
                     if k != "name")
    return f"{spec['name']} ({rest})" if rest else spec["name"]


def objective_epsilon(spec) -> float:
    """The objective's ``epsilon`` (0 for an objective that has none)."""
    return 0.0 if isinstance(spec, str) else float(spec.get("epsilon", 0.0))


def priority_table(frame: pd.DataFrame, configs: dict) -> pd.DataFrame:
    """Per point: ``objective``, ``label``, and the behaviors in the order predicted by
    ``⟨d_i, b̄⟩`` (``predicted``), by the theory's first step (``theory``) and by the
    simulation's (``measured``), each a tuple, rank 1 first; ``holds`` = measured is
    predicted."""
    slopes = initial_slopes(frame)
    rows = []
    for pid, config in configs.items():
        spec = config["train"]["objective"]
        rows.append(dict(
            point=pid, objective=objective_name(spec), label=objective_label(spec),
            predicted=tuple(predicted_order(config)["behavior"]),
            theory=tuple(measured_order(slopes, pid, "theory")),
            measured=tuple(measured_order(slopes, pid, "simulation"))))
    table = pd.DataFrame(rows)
    table["holds"] = [m == p for m, p in zip(table["measured"], table["predicted"])]
    return table


def noise_table(frame: pd.DataFrame, configs: dict, metric: str = "clean_accuracy",
                step: int | None = None) -> pd.DataFrame:
    """Per point × source at ``step`` (default: the last): ``objective``, ``epsilon``
    (the objective's), ``label_noise`` (the data's), and ``metric`` averaged over
    behaviors (weighted equally) then over seeds, with its sd over seeds
    (``METRIC_sd``; NaN for theory)."""
    last = frame[frame["step"] == (frame["step"].max() if step is None else step)]
    per_seed = (last.groupby(["point", "source", "seed"], observed=True, dropna=False)[metric]
                .mean().reset_index())
    rows = []
    for (pid, source), group in per_seed.groupby(["point", "source"], observed=True):
        spec = configs[pid]["train"]["objective"]
        values = group[metric].to_numpy(dtype=np.float64)
        rows.append(dict(point=pid, source=source, objective=objective_name(spec),
                         epsilon=objective_epsilon(spec),
                         label_noise=float(configs[pid]["problem"]["label_noise"]),
                         **{metric: values.mean(),
                            f"{metric}_sd": values.std(ddof=1) if len(values) > 1 else np.nan}))
    return pd.DataFrame(rows)


def matched(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a :func:`noise_table` whose objective ``ε`` is the data's noise
    (every noise level for DPO, which has no ``ε``). Without noise cDPO and robust
    DPO with ``ε = 0`` are DPO (tests/test_objective_limits.py), so DPO's noise-free
    rows stand for them there when the grid has no ``ε = 0`` point of its own."""
    keep = (table["objective"] == "dpo") | np.isclose(table["epsilon"], table["label_noise"])
    out = [table[keep]]
    clean_dpo = table[(table["objective"] == "dpo") & (table["label_noise"] == 0)]
    for name in NOISE_OBJECTIVES[1:]:
        own = table[keep & (table["objective"] == name) & (table["label_noise"] == 0)]
        if own.empty and not clean_dpo.empty:
            out.append(clean_dpo.assign(objective=name, epsilon=0.0))
    return pd.concat(out, ignore_index=True)


def _is_noise_sweep(sweep) -> bool:
    return any(key == "problem.label_noise" for key in sweep.keys)


def _progress(frame: pd.DataFrame) -> pd.DataFrame:
    """Per point × source × behavior × step: mean loss over seeds and its fall from step 0."""
    curves = (frame.groupby(["point", "source", "behavior", "step"], observed=True)
              [["t", "loss"]].mean().reset_index())
    start = curves[curves["step"] == 0].set_index(["point", "source", "behavior"])["loss"]
    index = pd.MultiIndex.from_frame(curves[["point", "source", "behavior"]])
    curves["progress"] = start.reindex(index).to_numpy() - curves["loss"].to_numpy()
    return curves


def _draw_priority(axes, frame, configs) -> None:
    table = priority_table(frame, configs).set_index("point")
    progress = _progress(frame)
    names = list(pd.unique(frame["behavior"]))
    colours = palette(names)
    ranks = {name: i for i, name in enumerate(OBJECTIVES)}  # the registry's order
    order = sorted(configs, key=lambda p: (ranks.get(table.loc[p, "objective"], 99), p))
    for ax, pid in zip(axes, order):
        row = table.loc[pid]
        data = progress[progress["point"] == pid]
        for name in names:
            sim = data[(data["source"] == "simulation") & (data["behavior"] == name)]
            theory = data[(data["source"] == "theory") & (data["behavior"] == name)]
            ax.plot(sim["t"], sim["progress"], color=colours[name], lw=1.4)
            ax.plot(theory["t"], theory["progress"], color=colours[name], **THEORY_STYLE)
        short = lambda order: " > ".join(b.split(" ")[0] for b in order)  # noqa: E731
        ax.text(0.03, 0.97, f"predicted: {short(row['predicted'])}\n"
                f"theory:    {short(row['theory'])}\nmeasured:  {short(row['measured'])}",
                transform=ax.transAxes, ha="left", va="top", fontsize=6.5, family="monospace",
                bbox=dict(boxstyle="round", fc="white", ec="0.7", alpha=0.9))
        verdict = "holds" if row["holds"] else "does not hold"
        ax.set_title(f"{row['label']}: order {verdict}", fontsize=9)
        ax.set_xlabel("t = lr · step")
        ax.set_ylabel("L_i(0) − L_i(t)")
    for ax in axes[len(order):]:
        ax.set_visible(False)


def early_step(frame: pd.DataFrame) -> int:
    """The recorded step nearest a tenth of the run (where the objectives still
    differ: by the end every one of them has nearly converged)."""
    steps = np.unique(frame["step"])
    return int(steps[np.argmin(np.abs(steps - steps.max() / 10))])


def _draw_noise(line_axes, heat_axes, frame, configs) -> None:
    colours = dict(zip(NOISE_OBJECTIVES, sns.color_palette("colorblind", 3)))
    early = early_step(frame)
    for ax, step in zip(line_axes, (early, None)):
        pairs = matched(noise_table(frame, configs, step=step))
        for name in NOISE_OBJECTIVES:
            rows = pairs[pairs["objective"] == name].sort_values("label_noise")
            sim, theory = rows[rows["source"] == "simulation"], rows[rows["source"] == "theory"]
            label = name if name == "dpo" else f"{name} (ε = noise)"
            ax.errorbar(sim["label_noise"], sim["clean_accuracy"],
                        yerr=sim["clean_accuracy_sd"].fillna(0), color=colours[name],
                        marker="o", lw=1.4, capsize=3, label=label)
            ax.plot(theory["label_noise"], theory["clean_accuracy"], color=colours[name],
                    **THEORY_STYLE)
        ax.set_xlabel("label noise of the training data")
        ax.set_ylabel("accuracy on the true preferences")
        last = int(frame["step"].max())
        ax.set_title(f"clean accuracy at step {early if step else last}", fontsize=9)
    line_axes[0].legend(fontsize=8)
    table = noise_table(frame, configs, step=early)
    sim = table[table["source"] == "simulation"]
    for ax, name in zip(heat_axes, NOISE_OBJECTIVES[1:]):
        grid = sim[sim["objective"] == name].pivot_table(index="epsilon", columns="label_noise",
                                                         values="clean_accuracy")
        sns.heatmap(grid.sort_index(ascending=False), annot=True, fmt=".3f", cmap="crest",
                    cbar=False, ax=ax, annot_kws=dict(fontsize=7))
        ax.set_title(f"{name}: simulated clean accuracy, step {early}", fontsize=9)
        ax.set_xlabel("label noise of the data")
        ax.set_ylabel("objective ε")


def plot(sweeps, out: Path) -> list[Path]:
    """The priority panels (one per objective) over the noise panels."""
    sweeps = list(sweeps)
    noise = [s for s in sweeps if _is_noise_sweep(s)]
    priority = [s for s in sweeps if not _is_noise_sweep(s)]
    theme()
    columns = 4
    prio_configs = {pid: c for s in priority for pid, c in s.configs().items()}
    rows = max(1, -(-len(prio_configs) // columns))
    fig = plt.figure(figsize=(4.2 * columns, 3.3 * (rows + 1.2)))
    grid = fig.add_gridspec(rows + 1, columns, height_ratios=[1] * rows + [1.2])
    prio_axes = [fig.add_subplot(grid[r, c]) for r in range(rows) for c in range(columns)]
    if priority:
        frame = pd.concat([s.frame() for s in priority], ignore_index=True)
        _draw_priority(prio_axes, frame, prio_configs)
    if noise:
        frame = pd.concat([s.frame() for s in noise], ignore_index=True)
        configs = {pid: c for s in noise for pid, c in s.configs().items()}
        line_axes = [fig.add_subplot(grid[rows, 0]), fig.add_subplot(grid[rows, 1])]
        heat_axes = [fig.add_subplot(grid[rows, 2]), fig.add_subplot(grid[rows, 3])]
        _draw_noise(line_axes, heat_axes, frame, configs)
    fig.suptitle("Every objective on one problem (theory dashed over simulation), and "
                 "DPO's relatives under label noise")
    fig.tight_layout()
    return save(fig, Path(out) / FILENAME, formats=FORMATS, palette_png=True)
