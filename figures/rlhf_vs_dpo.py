"""Figure 10: DPO against RLHF, and what sampling the answers costs (issue 12,
questions 2 and 4).

Three sweeps (``figures/sweeps/rlhf_vs_dpo_*.toml``), told apart by their swept keys:

* **β × label noise** (``train.beta`` swept): DPO against RL with the exact gradient
  on a Bradley–Terry head trained first (not recorded, so both count the policy's
  steps from 0), from a random reference. Per point: the steps until the
  behavior-mean clean accuracy of the seed-mean curve first reaches
  :data:`TARGET_ACCURACY` (linear interpolation between recorded steps; NaN when
  never), and the final ``objective/kl`` (behavior mean).
* **a separable sample** (only ``train.phases`` swept): n = 16 < d = 32. DPO's
  ``‖W − W0‖`` grows like log step; RL stops at the finite optimum ``D = Φ/β`` of a
  head trained for N steps. With β = 1 and ``W0 = 0`` the head after N steps is
  exactly DPO's ``βΔ`` after N steps (the two are one logistic regression), so that
  optimum is DPO's weight change at step N, drawn as a mark.
* **estimators** (``train.objective`` swept): RL on one fixed head with the exact
  gradient, REINFORCE on rollouts of B prompts, PPO. Every seed shares its sample with
  the exact run, so ``sampled − exact`` on the same seed is the estimator's own noise;
  its sd over seeds at the last step against B, fitted on log–log axes
  (:func:`rollout_slope`; 1/√B expected for the policy).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from dynamics.config import objective_name
from dynamics.objectives import resolve_objective
from figures.style import FORMATS, THEORY_STYLE, plt, save, sns, theme

__all__ = ["TARGET_ACCURACY", "kind", "method", "crossing_step", "beta_table",
           "separable_table", "estimator_table", "rollout_slope", "plot"]

FILENAME = "fig10_rlhf_vs_dpo"
TARGET_ACCURACY = 0.62
"""The clean accuracy (behavior mean) whose first crossing the β panel counts."""
SPREAD_METRICS = ("weight_change", "objective/rlhf_reward")
"""The final quantities whose spread about the exact run the rollout panel fits."""


def kind(sweep) -> str:
    """``"beta"``, ``"estimators"`` or ``"separable"`` from a sweep's swept keys."""
    keys = set(sweep.keys)
    if "train.beta" in keys:
        return "beta"
    if "train.objective" in keys:
        return "estimators"
    return "separable"


def _phases(config: dict) -> list[dict]:
    train = config["train"]
    return train.get("phases") or [dict(objective=train["objective"], steps=train["steps"])]


def method(config: dict) -> str:
    """``"rlhf"`` when a phase is RL, ``"dpo"`` otherwise."""
    names = [objective_name(p["objective"]) for p in _phases(config)]
    return "rlhf" if "rlhf" in names else "dpo"


def reward_steps(config: dict) -> int:
    """Steps of the reward-model phase before the RL (0 when there is none)."""
    return sum(int(p["steps"]) for p in _phases(config)
               if objective_name(p["objective"]) == "reward_model")


def crossing_step(steps, values, target: float) -> float:
    """First step at which ``values`` reaches ``target``, interpolated linearly between
    recorded steps; NaN when it never does."""
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    above = np.flatnonzero(values >= target)
    if not len(above):
        return np.nan
    k = int(above[0])
    if k == 0:
        return float(steps[0])
    fraction = (target - values[k - 1]) / (values[k] - values[k - 1])
    return float(steps[k - 1] + fraction * (steps[k] - steps[k - 1]))


def _behavior_mean(frame: pd.DataFrame, metrics) -> pd.DataFrame:
    """Per point × source × seed × step: each metric averaged over behaviors."""
    return (frame.groupby(["point", "source", "seed", "step"], observed=True, dropna=False)
            [list(metrics)].mean().reset_index())


def beta_table(frame: pd.DataFrame, configs: dict,
               target: float = TARGET_ACCURACY) -> pd.DataFrame:
    """Per point × source: ``method``, ``beta``, ``label_noise``, ``steps_to_target``
    (:func:`crossing_step` of the seed-mean behavior-mean ``clean_accuracy``),
    ``final_accuracy``, ``final_kl`` (behavior mean, seed mean) and ``final_kl_sd``
    (over seeds; NaN for theory)."""
    per_seed = _behavior_mean(frame, ["clean_accuracy", "objective/kl"])
    rows = []
    for (pid, source), group in per_seed.groupby(["point", "source"], observed=True):
        config = configs[pid]
        curve = group.groupby("step")[["clean_accuracy", "objective/kl"]].mean()
        last = group[group["step"] == group["step"].max()]["objective/kl"].to_numpy()
        rows.append(dict(point=pid, source=source, method=method(config),
                         beta=float(config["train"]["beta"]),
                         label_noise=float(config["problem"]["label_noise"]),
                         steps_to_target=crossing_step(curve.index, curve["clean_accuracy"],
                                                       target),
                         final_accuracy=float(curve["clean_accuracy"].iloc[-1]),
                         final_kl=float(curve["objective/kl"].iloc[-1]),
                         final_kl_sd=float(np.std(last, ddof=1)) if len(last) > 1 else np.nan))
    return pd.DataFrame(rows).sort_values(["label_noise", "method", "beta", "source"],
                                          ignore_index=True)


def separable_table(frame: pd.DataFrame, configs: dict) -> pd.DataFrame:
    """Per point × source: ``method``, ``reward_steps``, the final ``weight_change`` and
    ``objective/kl`` (seed means, with sd), ``per_decade`` (the seed-mean weight change
    at the last step minus at a tenth of it) and, for RL, ``optimum``: DPO's seed-mean
    weight change at step ``reward_steps`` from the same table (NaN past DPO's run)."""
    means = (frame.groupby(["point", "source", "step"], observed=True)
             [["weight_change", "objective/kl"]].mean())
    per_seed_last = frame[frame["step"] == frame.groupby("point")["step"].transform("max")]
    dpo = [p for p, c in configs.items() if method(c) == "dpo"]
    rows = []
    for (pid, source), curve in means.groupby(level=["point", "source"]):
        curve = curve.droplevel(["point", "source"])
        steps = curve.index.to_numpy()
        last, tenth = steps.max(), steps[np.argmin(np.abs(steps - steps.max() / 10))]
        mine = per_seed_last[(per_seed_last["point"] == pid)
                             & (per_seed_last["source"] == source)]
        seed_means = mine.groupby("seed", dropna=False)[["weight_change", "objective/kl"]].mean()
        n_rm = reward_steps(configs[pid])
        optimum = np.nan
        if method(configs[pid]) == "rlhf" and dpo:
            ref = means.loc[(dpo[0], source)]["weight_change"]
            if n_rm in ref.index:
                optimum = float(ref.loc[n_rm])
        rows.append(dict(point=pid, source=source, method=method(configs[pid]),
                         reward_steps=n_rm,
                         weight_change=float(curve["weight_change"].loc[last]),
                         weight_change_sd=float(seed_means["weight_change"].std(ddof=1))
                         if len(seed_means) > 1 else np.nan,
                         kl=float(curve["objective/kl"].loc[last]),
                         per_decade=float(curve["weight_change"].loc[last]
                                          - curve["weight_change"].loc[tenth]),
                         optimum=optimum))
    return pd.DataFrame(rows).sort_values(["method", "reward_steps", "source"],
                                          ignore_index=True)


def _estimator(config: dict) -> tuple[str, int, str]:
    """(estimator, rollout size B with 0 → n, label) of an RL point."""
    _, hyper = resolve_objective(config["train"]["objective"])
    n = int(config["train"]["n"])
    estimator = hyper["estimator"]
    size = int(hyper.get("rollout_size", 0)) or n
    if estimator == "exact":
        return estimator, n, "exact"
    if estimator == "ppo":
        passes = hyper["ppo_epochs"] * hyper["num_minibatches"]
        return estimator, size, f"PPO (B={size}, {passes} updates/step)"
    return estimator, size, f"REINFORCE (B={size})"


def estimator_table(frame: pd.DataFrame, configs: dict) -> pd.DataFrame:
    """Per simulated point at the last step: ``estimator``, ``rollout`` (B), ``label``,
    ``seeds``, and for each of :data:`SPREAD_METRICS` (behavior mean) the mean over
    seeds and ``METRIC_spread``: the sd over seeds of (this run − the exact run on the
    same seed)."""
    last = frame[(frame["step"] == frame["step"].max()) & (frame["source"] == "simulation")]
    per_seed = (last.groupby(["point", "seed"], observed=True)[list(SPREAD_METRICS)]
                .mean())
    exact = [p for p, c in configs.items() if _estimator(c)[0] == "exact"]
    base = per_seed.loc[exact[0]] if exact else None
    rows = []
    for pid, config in configs.items():
        estimator, size, label = _estimator(config)
        mine = per_seed.loc[pid]
        row = dict(point=pid, estimator=estimator, rollout=size, label=label, seeds=len(mine))
        for metric in SPREAD_METRICS:
            row[metric] = float(mine[metric].mean())
            if base is not None:
                diff = (mine[metric] - base[metric].reindex(mine.index)).to_numpy()
                row[f"{metric}_spread"] = float(np.std(diff, ddof=1))
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["estimator", "rollout"], ignore_index=True)


def rollout_slope(table: pd.DataFrame, metric: str = "weight_change") -> dict:
    """Least-squares slope of ``log spread`` on ``log B`` over the REINFORCE rows of an
    :func:`estimator_table`, with its standard error from the seed count alone: an sd
    from S seeds has ``sd(log ŝ) ≈ 1/√(2(S−1))`` (normal draws), so
    ``se = 1/√(2(S−1)·Σ(x − x̄)²)``. Keys: slope, intercept, se, points."""
    rows = table[table["estimator"] == "reinforce"]
    x = np.log(rows["rollout"].to_numpy(dtype=np.float64))
    y = np.log(rows[f"{metric}_spread"].to_numpy(dtype=np.float64))
    slope, intercept = np.polyfit(x, y, 1)
    seeds = int(rows["seeds"].min())
    se = 1.0 / math.sqrt(2 * (seeds - 1) * float(((x - x.mean()) ** 2).sum()))
    return dict(slope=float(slope), intercept=float(intercept), se=se, points=len(rows))


# ----------------------------------------------------------------------------- drawing


def _draw_beta(ax_steps, ax_kl, frame, configs) -> None:
    table = beta_table(frame, configs)
    colours = dict(zip(("dpo", "rlhf"), sns.color_palette("colorblind", 2)))
    for (name, noise), rows in table.groupby(["method", "label_noise"]):
        style = dict(color=colours[name], marker="o" if noise == 0 else "s",
                     ls="-" if noise == 0 else "-.", lw=1.4)
        label = f"{'DPO' if name == 'dpo' else 'RLHF (BT head)'}, noise {noise:g}"
        sim, theory = rows[rows["source"] == "simulation"], rows[rows["source"] == "theory"]
        ax_steps.plot(sim["beta"], sim["steps_to_target"], label=label, **style)
        ax_steps.plot(theory["beta"], theory["steps_to_target"], color=colours[name],
                      **THEORY_STYLE)
        ax_kl.errorbar(sim["beta"], sim["final_kl"], yerr=sim["final_kl_sd"].fillna(0),
                       capsize=3, label=label, **style)
        ax_kl.plot(theory["beta"], theory["final_kl"], color=colours[name], **THEORY_STYLE)
    for ax in (ax_steps, ax_kl):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("β")
    ax_steps.set_ylabel(f"steps to clean accuracy {TARGET_ACCURACY:g}")
    ax_steps.set_title("Steps to the target (missing: never reached)", fontsize=9)
    ax_kl.set_yscale("log")
    ax_kl.set_ylabel("final KL(π ‖ π0), behavior mean")
    ax_kl.set_title(f"KL to the reference at step {int(frame['step'].max())}", fontsize=9)
    ax_steps.legend(fontsize=7)


def _draw_separable(ax_w, ax_kl, frame, configs) -> None:
    table = separable_table(frame, configs)
    points = sorted(configs, key=lambda p: (method(configs[p]) == "dpo",
                                            reward_steps(configs[p])))
    rl_points = [p for p in points if method(configs[p]) == "rlhf"]
    colours = dict(zip(rl_points, sns.color_palette("crest", len(rl_points))))
    colours.update({p: "black" for p in points if method(configs[p]) == "dpo"})
    theory_drawn = False
    for pid in points:
        config = configs[pid]
        data = frame[frame["point"] == pid]
        sim = (data[data["source"] == "simulation"].groupby("step")
               [["weight_change", "objective/kl"]].agg(["mean", "std"]))
        x = sim.index.to_numpy(dtype=np.float64)
        keep = x > 0
        label = ("DPO" if method(config) == "dpo"
                 else f"RLHF, reward model {reward_steps(config)} steps")
        for ax, metric in ((ax_w, "weight_change"), (ax_kl, "objective/kl")):
            mean, sd = sim[(metric, "mean")].to_numpy(), sim[(metric, "std")].fillna(0).to_numpy()
            ax.plot(x[keep], mean[keep], color=colours[pid], lw=1.4, label=label)
            ax.fill_between(x[keep], (mean - sd)[keep], (mean + sd)[keep], color=colours[pid],
                            alpha=0.15, lw=0)
        if not theory_drawn:  # the population: every pipeline ends at the same finite policy
            theory = data[data["source"] == "theory"].groupby("step")[["weight_change",
                                                                      "objective/kl"]].mean()
            t = theory.index.to_numpy(dtype=np.float64)
            for ax, metric in ((ax_w, "weight_change"), (ax_kl, "objective/kl")):
                ax.plot(t[t > 0], theory[metric].to_numpy()[t > 0], color="0.3",
                        label="theory (population)" if ax is ax_w else None, **THEORY_STYLE)
            theory_drawn = True
    sim = table[(table["source"] == "simulation") & (table["method"] == "rlhf")]
    for row in sim.itertuples():
        if np.isfinite(row.optimum):
            ax_w.axhline(row.optimum, color=colours[row.point], ls=":", lw=1.2)
            ax_w.plot([row.reward_steps], [row.optimum], marker="o", color=colours[row.point],
                      ms=5)
    ax_kl.axhline(np.log(2), color="0.5", lw=0.8)
    ax_kl.text(0.02, np.log(2), "log 2: the most a two-answer KL to a uniform π0 can be",
               transform=ax_kl.get_yaxis_transform(), va="bottom", fontsize=6.5, color="0.3")
    for ax in (ax_w, ax_kl):
        ax.set_xscale("log")
        ax.set_xlabel("policy step (log)")
    ax_w.set_ylabel("‖W − W0‖_F")
    ax_w.set_title("Separable sample (n = 16 < d = 32): DPO grows without bound; RL stops "
                   "at Φ/β\n(dots: DPO at step N = the RL optimum on the N-step head)",
                   fontsize=8.5)
    ax_kl.set_ylabel("KL(π ‖ π0)")
    ax_kl.set_title("The same runs' KL to the reference", fontsize=9)
    ax_w.legend(fontsize=7, loc="upper left")


def _draw_estimators(ax_curve, ax_spread, frame, configs) -> None:
    table = estimator_table(frame, configs)
    chosen = table[(table["estimator"] != "reinforce")
                   | table["rollout"].isin([table["rollout"].min(), table["rollout"].max()])]
    colours = dict(zip(chosen["point"], sns.color_palette("Set1", len(chosen))))
    per_seed = _behavior_mean(frame, ["objective/kl"])
    for row in chosen.itertuples():
        sim = per_seed[(per_seed["point"] == row.point) & (per_seed["source"] == "simulation")]
        curve = sim.groupby("step")["objective/kl"].agg(["mean", "std"])
        ax_curve.plot(curve.index, curve["mean"], color=colours[row.point], lw=1.3,
                      label=row.label)
        ax_curve.fill_between(curve.index, curve["mean"] - curve["std"],
                              curve["mean"] + curve["std"], color=colours[row.point],
                              alpha=0.15, lw=0)
    theory = per_seed[per_seed["source"] == "theory"]
    one = theory[theory["point"] == theory["point"].iloc[0]]
    ax_curve.plot(one["step"], one["objective/kl"], color="0.2", label="theory (exact flow)",
                  **THEORY_STYLE)
    ax_curve.set_xlabel("step (one rollout each)")
    ax_curve.set_ylabel("KL(π ‖ π0), behavior mean")
    ax_curve.set_title("Estimators at equal steps (mean ± sd over seeds)", fontsize=9)
    ax_curve.legend(fontsize=7)
    rows = table[table["estimator"] == "reinforce"]
    markers = dict(zip(SPREAD_METRICS, ("o", "s")))
    for metric in SPREAD_METRICS:
        fit = rollout_slope(table, metric)
        ax_spread.plot(rows["rollout"], rows[f"{metric}_spread"], marker=markers[metric],
                       ls="none", label=f"{metric}: slope {fit['slope']:.2f} ± {fit['se']:.2f}")
        x = np.array([rows["rollout"].min(), rows["rollout"].max()], dtype=np.float64)
        ax_spread.plot(x, np.exp(fit["intercept"]) * x ** fit["slope"], color="0.4", lw=1.0)
    ax_spread.set_xscale("log", base=2)
    ax_spread.set_yscale("log")
    ax_spread.set_xlabel("rollout size B (prompts per step)")
    ax_spread.set_ylabel("sd over seeds of (REINFORCE − exact), last step")
    ax_spread.set_title("The estimator's own noise against B (1/√B: slope −0.5)", fontsize=9)
    ax_spread.legend(fontsize=7)


def plot(sweeps, out: Path) -> list[Path]:
    """Top: β × noise (steps to target, final KL) and the separable sample (‖W − W0‖,
    KL); bottom: estimators at equal steps and the rollout-size spread."""
    sweeps = list(sweeps)
    theme()
    fig, axes = plt.subplots(2, 3, figsize=(16.5, 9.0))
    by_kind: dict[str, list] = {}
    for sweep in sweeps:
        by_kind.setdefault(kind(sweep), []).append(sweep)
    for name, group in by_kind.items():
        frame = pd.concat([s.frame() for s in group], ignore_index=True)
        configs = {pid: c for s in group for pid, c in s.configs().items()}
        if name == "beta":
            _draw_beta(axes[0, 0], axes[0, 1], frame, configs)
        elif name == "separable":
            _draw_separable(axes[0, 2], axes[1, 0], frame, configs)
        else:
            _draw_estimators(axes[1, 1], axes[1, 2], frame, configs)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    fig.suptitle("DPO against RLHF on the Bradley–Terry head (theory dashed over simulation), "
                 "and what sampling the answers costs")
    fig.tight_layout()
    return save(fig, Path(out) / FILENAME, formats=FORMATS, palette_png=True)
