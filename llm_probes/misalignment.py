"""Misalignment of the real model: DPO on flipped preferences (THEORY.md §4.4).

Two runs train on the same statements with chosen and rejected swapped, so every
metric is against the *flipped* labels (the ranking accuracy is the misalignment
rate):

- ``start = "base"``: from the base model;
- ``start = "aligned"``: from the model first aligned by ``--align-steps`` of DPO on
  the original preferences (:func:`llm_probes.training.train_dpo`, the same options);
  step 0 of its flipped phase is the aligned model.

The reference ``π_0`` of both phases is the base model (log-probabilities computed
once), as in the last-layer experiment (:mod:`dynamics.experiment`): the aligned
model therefore starts the flipped phase with negative margins and a loss above
log 2. Im & Li report that the aligned model is misaligned faster; this probe
measures it on a real model, where full or LoRA training also moves the features
``g(x)`` (their distinguishability at base, aligned, and after each flipped run is in
``misalignment_features.parquet``).

Writes ``misalignment.parquet`` (rows: start × phase × source × step × behavior, the
metrics of :data:`llm_probes.objective.METRICS`; phase ``align`` holds the aligning
run), ``misalignment_features.parquet``, ``misalignment_run.json`` and the figure.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from dynamics.io import write_json, write_parquet
from llm_probes.finetune import add_training_arguments, config_from_args, policy_from_args
from llm_probes.logprobs import evaluate, preference_data
from llm_probes.objective import feature_statistics
from llm_probes.training import peak_memory, release_policy, reset_peak_memory, train_dpo
from synthetic.validation import check_integer

__all__ = ["add_arguments", "check", "run", "STARTS", "LEVELS", "steps_to", "seed_table",
           "seed_summary", "summarize_runs"]

STARTS = ("base", "aligned")
LEVELS = (0.5, 0.9)
"""Flipped accuracies whose first crossing :func:`seed_table` reports."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``prefdyn probe misalignment``."""
    add_training_arguments(parser, steps=20, title="DPO training (both phases)")
    parser.add_argument("--align-steps", type=int, default=20,
                        help="steps of DPO on the original preferences before the flipped "
                        "phase of the aligned start (default: 20)")
    parser.add_argument("--no-figure", action="store_true", help="write no figure")


def check(args) -> None:
    """Validate the options (one-line ParameterError naming the option)."""
    from llm_probes.finetune import check as check_training

    check_integer("--align-steps", args.align_steps, ge=1)
    check_training(args)


def run(ctx) -> list[Path]:
    """``prefdyn probe misalignment``: flipped-preference DPO from the base and from
    the aligned model. Trains ``ctx.model`` in place for the aligned start (after a
    full run the context drops the model; LoRA adapters are removed)."""
    args = ctx.args
    check_integer("--align-steps", args.align_steps, ge=1)
    config = config_from_args(args, ctx.seed)
    align_config = config_from_args(args, ctx.seed, steps=args.align_steps)
    loaded = ctx.model
    data = preference_data(loaded, ctx.statements, prompt_format=args.prompt_format,
                           completion=args.completion)
    flipped = data.flipped()
    everything = np.arange(len(data.prompts))
    batch = config.eval_batch_size
    base = evaluate(loaded.model, data, everything, batch_size=batch, hidden=True)
    ref = base.logps
    hidden = {"base": base.hidden}
    frames = []
    seconds = {}
    reset_peak_memory(loaded.device)
    full = args.method == "full"
    try:
        # 1. from the base model (a copy under full training: the base is needed again)
        clock = time.perf_counter()
        policy = policy_from_args(loaded, args, copy_model=full, seed=ctx.seed)
        try:
            frame = train_dpo(policy, flipped, ref, config, start=ref, phase="flip",
                              progress=ctx.progress, test_every_eval=True)
            hidden["flipped from base"] = evaluate(policy, data, everything, batch_size=batch,
                                                   hidden=True).hidden
        finally:
            release_policy(policy)
            del policy
        frames.append(frame.assign(start="base"))
        seconds["base"] = time.perf_counter() - clock
        # 2. align on the original preferences, then flip (same adapters / weights)
        clock = time.perf_counter()
        policy = policy_from_args(loaded, args, copy_model=False, seed=ctx.seed)
        try:
            frames.append(train_dpo(policy, data, ref, align_config, start=ref, phase="align",
                                    progress=ctx.progress).assign(start="aligned"))
            hidden["aligned"] = evaluate(policy, data, everything, batch_size=batch,
                                         hidden=True).hidden
            frames.append(train_dpo(policy, flipped, ref, config, phase="flip",
                                    progress=ctx.progress, test_every_eval=True
                                    ).assign(start="aligned"))
            hidden["flipped from aligned"] = evaluate(policy, data, everything,
                                                      batch_size=batch, hidden=True).hidden
        finally:
            release_policy(policy)
            del policy
            if full and hasattr(ctx, "_model"):
                ctx._model = None  # trained in place: a later access reloads the base model
        seconds["aligned"] = time.perf_counter() - clock
    finally:
        memory = peak_memory(loaded.device)
    frame = pd.concat(frames, ignore_index=True)
    frame["start"] = pd.Categorical(frame["start"], categories=list(STARTS))
    frame["phase"] = pd.Categorical(frame["phase"], categories=["align", "flip"])
    frame.insert(0, "method", args.method)
    frame.insert(1, "completion", args.completion)
    frame["optimizer"], frame["lr"], frame["beta"] = config.optimizer, config.lr, config.beta
    frame["align_steps"] = args.align_steps
    signs = data.signs.numpy()
    stages = list(hidden)
    features = pd.concat([feature_statistics(h, signs, data.codes, data.names, stage=stage)
                          for stage, h in hidden.items()], ignore_index=True)
    features["stage"] = pd.Categorical(features["stage"], categories=stages)
    out = Path(ctx.out)
    files = [write_parquet(out / "misalignment.parquet", frame),
             write_parquet(out / "misalignment_features.parquet", features),
             write_json(out / "misalignment_run.json", {
                 "method": args.method, "completion": args.completion,
                 "config": config.__dict__, "align_steps": args.align_steps,
                 "reference": "base model (both phases)", "seconds": seconds, **memory})]
    if not getattr(args, "no_figure", False):
        from figures.probe_misalignment import plot

        files.extend(plot(out))
    return files


# ------------------------------------------------------------ several seeds together


def steps_to(steps, accuracy, level: float) -> float:
    """The first step at which ``accuracy`` reaches ``level``: 0 if it starts there,
    linearly interpolated between the two recorded steps around the crossing, NaN if
    it never does."""
    steps, accuracy = np.asarray(steps, dtype=np.float64), np.asarray(accuracy, np.float64)
    above = np.flatnonzero(accuracy >= level)
    if not len(above):
        return math.nan
    k = int(above[0])
    if k == 0:
        return 0.0
    a0, a1 = accuracy[k - 1], accuracy[k]
    return float(steps[k - 1] + (level - a0) / (a1 - a0) * (steps[k] - steps[k - 1]))


def seed_table(frames: dict, levels=LEVELS) -> pd.DataFrame:
    """Per seed (``frames``: seed → ``misalignment.parquet``), start, split (train or
    test), metric (``accuracy``: the model's own choice; ``reward_accuracy``: the
    implicit reward's) and level: the steps of the flipped phase until the mean over
    behaviors reaches the level (:func:`steps_to`), and the final value."""
    rows = []
    for seed, frame in frames.items():
        flip = frame[frame["phase"] == "flip"]
        for (start, split), part in flip.groupby(["start", "source"], observed=True):
            if split not in ("train", "test"):
                continue
            for metric in ("accuracy", "reward_accuracy"):
                curve = part.groupby("step")[metric].mean()
                for level in levels:
                    rows.append(dict(seed=seed, start=str(start), split=split, metric=metric,
                                     level=level, steps_to=steps_to(curve.index, curve.values,
                                                                    level),
                                     final=float(curve.iloc[-1]), recorded=len(curve)))
    return pd.DataFrame(rows)


def _t_interval(values) -> tuple[float, float, float]:
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1)
                 / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per split, metric and level: each start's mean steps with a 95% t interval over
    the seeds that reached the level (``reached`` of ``seeds``), and the paired
    difference base − aligned over the seeds where both did (positive: the aligned
    model is misaligned faster)."""
    rows = []
    for (split, metric, level), part in table.groupby(["split", "metric", "level"]):
        wide = part.pivot_table(index="seed", columns="start", values="steps_to",
                                dropna=False)
        row = dict(split=split, metric=metric, level=level, seeds=int(len(wide)))
        for start in STARTS:
            column = wide[start] if start in wide else pd.Series(dtype=float)
            mean, low, high = _t_interval(column)
            row.update({f"{start}_steps": mean, f"{start}_low": low, f"{start}_high": high,
                        f"{start}_reached": int(np.isfinite(column).sum())})
        if all(start in wide for start in STARTS):
            diff = (wide["base"] - wide["aligned"]).to_numpy()
            row["difference"], row["difference_low"], row["difference_high"] = \
                _t_interval(diff)
            row["paired_seeds"] = int(np.isfinite(diff).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def summarize_runs(directories) -> dict[str, pd.DataFrame]:
    """``seeds`` (:func:`seed_table`), ``summary`` (:func:`seed_summary`) and
    ``features`` (each stage's mean distinguishability over behaviors, with a 95% t
    interval over the runs) of several ``prefdyn probe misalignment`` output
    directories, one per seed, e.g. ``--seed 0 … 4`` into ``runs/seed0`` … ``runs/seed4``."""
    directories = [Path(d) for d in directories]
    frames = {i: pd.read_parquet(d / "misalignment.parquet") for i, d in enumerate(directories)}
    table = seed_table(frames)
    feature_rows = []
    per_run = [pd.read_parquet(d / "misalignment_features.parquet").assign(run=i)
               for i, d in enumerate(directories)]
    features = pd.concat(per_run, ignore_index=True)
    stage_means = features.groupby(["run", "stage"], observed=True)["distinguishability"].mean()
    for stage, values in stage_means.groupby(level="stage", observed=True, sort=False):
        mean, low, high = _t_interval(values.to_numpy())
        feature_rows.append(dict(stage=str(stage), distinguishability=mean, ci_low=low,
                                 ci_high=high, runs=int(len(values))))
    return {"seeds": table, "summary": seed_summary(table),
            "features": pd.DataFrame(feature_rows)}
