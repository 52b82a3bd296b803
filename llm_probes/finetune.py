"""The ``finetune`` probe: full and LoRA DPO of the real model on single-token answers
(THEORY.md §4.3).

The pieces are :mod:`llm_probes.logprobs` (the statements as tensors, log π(Yes) and
log π(No) from one decoder forward per statement, ``--completion``),
:mod:`llm_probes.objective` (the DPO loss and the metrics) and
:mod:`llm_probes.training` (the policy, ``--method``, and :func:`train_dpo
<llm_probes.training.train_dpo>`). This module holds the options every training
probe shares (:func:`add_training_arguments`, also used by ``misalignment`` and
``displacement``) and the probe itself (:func:`check`, :func:`run`).

Outputs of the probe (``prefdyn probe finetune``): ``finetune.parquet`` (per step ×
behavior × source: loss, accuracy, reward_accuracy, rewards/chosen, rewards/rejected,
rewards/margins, logps/chosen, logps/rejected), ``finetune_features.parquet``
(distinguishability, concentration, trace of ``g(x)`` per behavior, before and after
training, per split), ``finetune_run.json`` (timings, peak memory, parameter counts) and
the figure ``finetune.png``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dynamics.io import write_json, write_parquet
from llm_probes.logprobs import COMPLETIONS, PreferenceData, evaluate, preference_data
from llm_probes.objective import feature_statistics
from llm_probes.training import (
    LORA_TARGETS,
    METHODS,
    OPTIMIZERS,
    TrainConfig,
    peak_memory,
    prepare_policy,
    release_policy,
    reset_peak_memory,
    train_config,
    train_dpo,
)
from synthetic.validation import check_choice, check_integer, check_number

__all__ = ["DEFAULT_LR", "add_training_arguments", "add_lora_arguments", "lora_options",
           "resolved_lr", "config_from_args",
           "policy_from_args", "add_arguments", "check", "run"]

DEFAULT_LR = {("full", "adamw"): 1e-5, ("lora", "adamw"): 1e-4,
              ("full", "sgd"): 1e-2, ("lora", "sgd"): 1e-1}
"""``--lr`` when not given, per (method, optimizer)."""


# --------------------------------------------------------------------------- CLI


def add_training_arguments(parser: argparse.ArgumentParser, *, steps: int = 20,
                           title: str = "DPO training") -> None:
    """The options of a DPO run, shared by finetune, misalignment and displacement."""
    group = parser.add_argument_group(title)
    group.add_argument("--method", choices=list(METHODS), default="lora",
                       help="full: every parameter; lora: peft adapters (default: lora)")
    add_lora_arguments(group)
    group.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adamw",
                       help="adamw or sgd (default: adamw)")
    group.add_argument("--steps", type=int, default=steps, help=f"steps (default: {steps})")
    group.add_argument("--lr", type=float, default=None,
                       help="learning rate (default: " + ", ".join(
                           f"{m}+{o} {v:g}" for (m, o), v in DEFAULT_LR.items()) + ")")
    group.add_argument("--beta", type=float, default=0.1, help="DPO β (default: 0.1)")
    group.add_argument("--batch-size", type=int, default=8,
                       help="statements per step (default: 8)")
    group.add_argument("--eval-every", type=int, default=5,
                       help="evaluate all train statements every K steps (default: 5; "
                       "each costs a forward of every train statement)")
    group.add_argument("--eval-batch-size", type=int, default=32,
                       help="batch of the no-grad evaluations (default: 32)")
    group.add_argument("--completion", choices=list(COMPLETIONS), default="token",
                       help="token: the answer token alone (default); token+eos: also "
                       "log π(EOS | x, y), as TRL scores plain strings")
    group.add_argument("--prompt-format", default=None,
                       help="chat or plain (default: chat when the tokenizer has a template)")


def add_lora_arguments(group) -> None:
    """``--lora-rank``, ``--lora-alpha``, ``--lora-targets`` (finetune's and distill's)."""
    group.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default: 8)")
    group.add_argument("--lora-alpha", type=float, default=None,
                       help="LoRA alpha (default: 2 × rank)")
    group.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                       help="comma-separated module names to adapt (default: the attention "
                       "and MLP projections)")


def lora_options(args) -> dict:
    """:func:`prepare_policy`'s LoRA keywords from those options, validated."""
    check_integer("--lora-rank", args.lora_rank, ge=1)
    if args.lora_alpha is not None:
        check_number("--lora-alpha", args.lora_alpha, gt=0)
    targets = [t.strip() for t in str(args.lora_targets).split(",") if t.strip()]
    return dict(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=targets)


def resolved_lr(args) -> float:
    """``--lr``, or the default of (method, optimizer)."""
    if args.lr is not None:
        return args.lr
    return DEFAULT_LR[(check_choice("--method", args.method, METHODS),
                       check_choice("--optimizer", args.optimizer, OPTIMIZERS))]


def config_from_args(args, seed: int, *, steps: int | None = None) -> TrainConfig:
    """The validated :class:`TrainConfig` of the training options."""
    return train_config(steps=args.steps if steps is None else steps, lr=resolved_lr(args),
                        beta=args.beta, batch_size=args.batch_size, optimizer=args.optimizer,
                        eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
                        seed=seed)


def policy_from_args(loaded, args, *, copy_model: bool, seed: int = 0):
    """:func:`prepare_policy` with the CLI's method and LoRA options; ``seed`` (the
    probe's ``--seed``) draws the LoRA adapters' start."""
    return prepare_policy(loaded, args.method, copy_model=copy_model, seed=seed,
                          **lora_options(args))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``prefdyn probe finetune``."""
    add_training_arguments(parser)
    parser.add_argument("--no-figure", action="store_true", help="write no figure")


def _parameter_counts(policy) -> dict:
    total = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return {"parameters": int(total), "trainable_parameters": int(trainable)}


def check(args) -> None:
    """Validate the training options (one-line ParameterError naming the option)."""
    config_from_args(args, args.seed)
    lora_options(args)


def run(ctx) -> list[Path]:
    """``prefdyn probe finetune``: DPO of the model, features before and after.

    Trains ``ctx.model`` in place (no second copy of the weights): LoRA adapters are
    removed afterwards; after full training the context drops the model, so a later
    access reloads it.
    """
    args = ctx.args
    config = config_from_args(args, ctx.seed)
    loaded = ctx.model
    data = preference_data(loaded, ctx.statements, prompt_format=args.prompt_format,
                           completion=args.completion)
    everything = np.arange(len(data.prompts))
    clock = time.perf_counter()
    before = evaluate(loaded.model, data, everything, batch_size=config.eval_batch_size,
                      hidden=True)
    reference_s = time.perf_counter() - clock
    policy = policy_from_args(loaded, args, copy_model=False, seed=ctx.seed)
    counts = _parameter_counts(policy)
    reset_peak_memory(loaded.device)
    clock = time.perf_counter()
    try:
        frame = train_dpo(policy, data, before.logps, config, start=before.logps,
                          progress=ctx.progress)
        train_s = time.perf_counter() - clock
        memory = peak_memory(loaded.device)
        after = evaluate(policy, data, everything, batch_size=config.eval_batch_size,
                         hidden=True)
    finally:
        release_policy(policy)
        if args.method == "full" and hasattr(ctx, "_model"):
            ctx._model = None  # trained in place: a later access reloads the base model
    frame.insert(0, "method", args.method)
    frame.insert(1, "completion", args.completion)
    frame["optimizer"], frame["lr"], frame["beta"] = config.optimizer, config.lr, config.beta
    frame["batch_size"] = config.batch_size
    features = _features_table(data, before.hidden, after.hidden)
    out = Path(ctx.out)
    files = [write_parquet(out / "finetune.parquet", frame),
             write_parquet(out / "finetune_features.parquet", features)]
    files.append(write_json(out / "finetune_run.json", {
        "method": args.method, "completion": args.completion, "config": config.__dict__,
        "train_statements": int(len(data.train)), "test_statements": int(len(data.test)),
        "reference_seconds": reference_s, "train_seconds": train_s,
        "seconds_per_step": train_s / config.steps, **counts, **memory,
        "device": str(loaded.device), "torch_threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }))
    if not getattr(args, "no_figure", False):
        from figures.probe_finetune import plot

        files.extend(plot(out))
    return files


def _features_table(data: PreferenceData, before: torch.Tensor,
                    after: torch.Tensor) -> pd.DataFrame:
    """Distinguishability etc. of ``g(x)`` per behavior × stage × split."""
    signs = data.signs.numpy()
    frames = []
    for stage, hidden in (("before", before), ("after", after)):
        for split, index in (("train", data.train), ("test", data.test), ("all", None)):
            rows = np.arange(len(signs)) if index is None else index
            if len(rows) == 0:
                continue
            frames.append(feature_statistics(hidden[rows], signs[rows], data.codes[rows],
                                             data.names, split=split, stage=stage))
    frame = pd.concat([f for f in frames if len(f)], ignore_index=True)
    frame["stage"] = pd.Categorical(frame["stage"], categories=["before", "after"])
    return frame
