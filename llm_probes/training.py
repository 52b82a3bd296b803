"""DPO training of the real model: the trainable policy, the optimiser, the loop.

``method``: ``full`` trains every parameter of the (untied) model; ``lora`` trains LoRA
adapters (``peft``) on the attention and MLP projections, the base frozen
(:func:`prepare_policy`, undone by :func:`release_policy`). :func:`train_dpo` takes
one optimiser step per minibatch of train statements on the mean of
:func:`llm_probes.objective.single_token_dpo_loss` and records the metrics of
:data:`llm_probes.objective.METRICS` per behavior as it goes (:data:`SOURCES`).
:func:`peak_memory` measures a training window.

Shapes: ``N`` statements, ``B`` a batch, ``d`` the hidden width.
"""

from __future__ import annotations

import copy
import resource
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from llm_probes.logprobs import Evaluation, PreferenceData, answer_logps, base_model, evaluate
from llm_probes.objective import (
    behavior_rows,
    chosen_rejected,
    single_token_dpo_loss,
    statement_metrics,
)
from synthetic.validation import ParameterError, check_choice, check_integer, check_number

__all__ = ["METHODS", "OPTIMIZERS", "LORA_TARGETS", "SOURCES", "TrainConfig", "prepare_policy",
           "release_policy", "train_config", "train_dpo", "peak_memory", "reset_peak_memory"]

METHODS: dict[str, str] = {
    "full": "every parameter of the untied model",
    "lora": "LoRA adapters (peft) on the attention and MLP projections; the base frozen",
}
OPTIMIZERS: dict[str, str] = {
    "adamw": "torch.optim.AdamW (weight decay 0, as TRL's default; fused kernel)",
    "sgd": "torch.optim.SGD (plain gradient descent on each batch)",
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The Llama attention and MLP projections; ``--lora-targets`` names others."""
SOURCES = ("train", "test", "batch")
"""``train``: all train statements (every ``eval_every`` steps); ``test``: the test
statements at the first and last step; ``batch``: the training batch of each step,
measured in its forward before the update (free)."""


# --------------------------------------------------------------------------- the policy


def _check_untied(model) -> None:
    base = base_model(model)
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        raise ParameterError("--model", getattr(base.config, "name_or_path", "?"),
                             "must have its output layer untied from the input embeddings "
                             "(load it with llm_probes.model.load_model)")


def prepare_policy(loaded, method: str, *, lora_rank: int = 8, lora_alpha: float | None = None,
                   lora_targets=LORA_TARGETS, copy_model: bool = True, seed: int = 0):
    """The trainable policy from ``loaded.model``.

    ``full``: every parameter trainable (the output layer must be untied). ``lora``:
    ``peft`` LoRA adapters of rank ``lora_rank`` (scaling ``lora_alpha / lora_rank``,
    default alpha = 2 × rank) on ``lora_targets``; peft initialises ``B = 0``, so the
    policy equals the base model at step 0, and ``A`` at random: drawn from ``seed``
    (the global torch generator is left as it was), so a run is repeatable.
    ``copy_model=False`` trains ``loaded.model`` itself (no second copy of the weights
    in memory; undo LoRA with :func:`release_policy`; full training cannot be undone).
    """
    check_choice("--method", method, METHODS)
    model = copy.deepcopy(loaded.model) if copy_model else loaded.model
    _check_untied(model)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    check_integer("--lora-rank", lora_rank, ge=1)
    alpha = float(2 * lora_rank if lora_alpha is None else
                  check_number("--lora-alpha", lora_alpha, gt=0))
    targets = list(lora_targets)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if not targets or missing:
        raise ParameterError("--lora-targets", ",".join(targets), "must name modules of the "
                             f"model (missing: {', '.join(missing) or 'none given'}; e.g. "
                             f"{', '.join(LORA_TARGETS)})")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_rank, lora_alpha=alpha, target_modules=targets,
                        lora_dropout=0.0, bias="none")
    model._prefdyn_grad_flags = [p.requires_grad for p in model.parameters()]
    with warnings.catch_warnings():  # peft calls a deprecated transformers alias
        warnings.filterwarnings("ignore", category=FutureWarning)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(check_integer("--seed", seed, ge=0))
            policy = get_peft_model(model, config)
    policy.eval()
    return policy


def release_policy(policy):
    """The base model back from a LoRA policy (adapters removed, not merged, the
    parameters' ``requires_grad`` restored); a full policy as is."""
    if not hasattr(policy, "get_base_model"):
        return policy
    base = policy.unload()
    flags = getattr(base, "_prefdyn_grad_flags", None)
    if flags is not None:
        for p, flag in zip(base.parameters(), flags):
            p.requires_grad_(flag)
        del base._prefdyn_grad_flags
    return base


def _optimizer(name: str, params, lr: float):
    """The optimiser of :data:`OPTIMIZERS`. AdamW uses torch's fused kernel where it
    exists (CPU and CUDA): one pass over each parameter instead of a dozen elementwise
    ops, 5× faster on this 2-core CPU (about a third of a full fine-tuning step before)."""
    if name == "adamw":
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
        except (RuntimeError, ValueError):  # a device without the fused kernel
            return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return torch.optim.SGD(params, lr=lr)


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation of one DPO run (validated by :func:`train_config`)."""

    steps: int = 20
    lr: float = 1e-4
    beta: float = 0.1
    batch_size: int = 8
    optimizer: str = "adamw"
    eval_every: int = 1
    eval_batch_size: int = 32
    seed: int = 0


def train_config(*, steps, lr, beta, batch_size, optimizer="adamw", eval_every=1,
                 eval_batch_size=32, seed=0) -> TrainConfig:
    """A validated :class:`TrainConfig` (ParameterError naming the CLI flag)."""
    return TrainConfig(
        steps=check_integer("--steps", steps, ge=1), lr=check_number("--lr", lr, gt=0),
        beta=check_number("--beta", beta, gt=0),
        batch_size=check_integer("--batch-size", batch_size, ge=1),
        optimizer=check_choice("--optimizer", optimizer, OPTIMIZERS),
        eval_every=check_integer("--eval-every", eval_every, ge=1),
        eval_batch_size=check_integer("--eval-batch-size", eval_batch_size, ge=1),
        seed=check_integer("--seed", seed, ge=0))


def _batches(index: np.ndarray, size: int, generator: torch.Generator):
    """Endless minibatches of ``index``: a fresh permutation each epoch."""
    size = min(size, len(index))
    while True:
        order = index[torch.randperm(len(index), generator=generator).numpy()]
        for start in range(0, len(order) - size + 1, size):
            yield order[start:start + size]


def train_dpo(policy, data: PreferenceData, ref: torch.Tensor, config: TrainConfig, *,
              start: torch.Tensor | None = None, phase: str = "dpo",
              progress: bool = False,
              on_eval: Callable[[int, Evaluation], None] | None = None,
              test_every_eval: bool = False) -> pd.DataFrame:
    """DPO of ``policy`` on ``data.train``; the tidy metrics table.

    ``ref (N, 2)``: reference log π(Yes), log π(No) of every statement, computed once
    (:func:`evaluate` of the model before training). ``start (N, 2)``: the policy's
    own values at step 0 if known (``ref`` itself when the policy is the reference);
    else they are evaluated. Each step draws ``batch_size`` train statements (a new
    permutation per epoch, ``config.seed``), runs :func:`answer_logps`, and takes one
    optimiser step on the mean of :func:`single_token_dpo_loss`. Metrics of all train
    statements at step 0 and every ``eval_every`` steps (``source="train"``), of the
    test statements at the first and last step (``"test"``), and of each batch before
    its update (``"batch"``); with ``test_every_eval``, the test statements too at every
    train evaluation. ``on_eval(step, evaluation)`` sees every train evaluation (rows in
    ``data.train`` order).
    """
    device = next(policy.parameters()).device
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = _optimizer(config.optimizer, params, config.lr)
    optimizer.zero_grad(set_to_none=True)  # no gradient left over from the caller
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(data.train, config.batch_size, generator)
    signs, codes, names, beta = data.signs, data.codes, data.names, config.beta
    rows: list[dict] = []

    def record(step: int, source: str, index: np.ndarray, logps: torch.Tensor) -> None:
        values = statement_metrics(logps, ref[index], signs[index], beta=beta)
        rows.extend(behavior_rows(values, codes[index], names, phase=phase, source=source,
                                  step=step, t=config.lr * step))

    def full_eval(step: int, index: np.ndarray, source: str, known=None) -> Evaluation:
        if known is not None:
            result = Evaluation(known[index].double().cpu(), None, None)
        else:
            policy.eval()
            result = evaluate(policy, data, index, batch_size=config.eval_batch_size)
        record(step, source, index, result.logps)
        return result

    first = full_eval(0, data.train, "train", start)
    if on_eval is not None:
        on_eval(0, first)
    if len(data.test):
        full_eval(0, data.test, "test", start)
    bar = _bar(config.steps, phase, progress)
    try:
        for step in range(1, config.steps + 1):
            index = next(batches)
            out = answer_logps(policy, data.prompts.batch(index, device), answers=data.answers,
                               eos_id=data.eos_id)
            chosen, rejected = chosen_rejected(out.logps.double(), signs[index])
            ref_chosen, ref_rejected = chosen_rejected(ref[index].to(device), signs[index])
            loss = single_token_dpo_loss(chosen, rejected, ref_chosen, ref_rejected,
                                         beta=beta).mean()
            loss.backward()
            optimizer.step()
            # Free the gradients now, not before the next backward: otherwise they live
            # through the next forward beside its activations (+0.65 GB at full size).
            optimizer.zero_grad(set_to_none=True)
            record(step - 1, "batch", index, out.logps.detach())
            del out, chosen, rejected, loss
            if step % config.eval_every == 0 or step == config.steps:
                result = full_eval(step, data.train, "train")
                if on_eval is not None:
                    on_eval(step, result)
                if test_every_eval and len(data.test) and step < config.steps:
                    full_eval(step, data.test, "test")  # the last step's comes below
            bar.update(1)
    finally:
        bar.close()
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    if len(data.test):
        full_eval(config.steps, data.test, "test")
    frame = pd.DataFrame(rows)
    frame["behavior"] = pd.Categorical(frame["behavior"], categories=names)
    frame["source"] = pd.Categorical(frame["source"], categories=list(SOURCES))
    return frame


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False,
                file=sys.stderr)


# --------------------------------------------------------------------------- memory


def reset_peak_memory(device=None) -> None:
    """Start a new peak-memory window: the process's resident-set high-water mark
    (Linux ``/proc/self/clear_refs``) and, on CUDA, torch's allocator peak."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device=None) -> dict:
    """``{"peak_rss_bytes": ..., "peak_cuda_bytes": ...}`` since
    :func:`reset_peak_memory` (RSS: ``VmHWM``, else ``getrusage``'s lifetime peak)."""
    peak = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    if peak is None:
        scale = 1 if sys.platform == "darwin" else 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    result = {"peak_rss_bytes": int(peak), "peak_cuda_bytes": None}
    if device is not None and torch.device(device).type == "cuda":
        result["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return result
