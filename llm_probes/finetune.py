"""Full and LoRA DPO of the real model on single-token answers (THEORY.md §4.3).

Statement ``j`` is a prompt ``x_j`` with sign ``s_j``: its chosen answer ``y_w`` is
``Yes`` when ``s_j = +1`` and ``No`` otherwise, ``y_l`` the other. The answers are single
tokens, so

    log π(y | x) = log softmax(lm_head(g(x)))_y,

with ``g(x)`` the final hidden state at the last prompt token: **one forward of the
decoder per statement, then the output layer at that one position** — ``(B, V)``
logits, never the ``(B, T, V)`` of a full-sequence forward. The reference
log-probabilities ``log π_0`` are those of the model before training, computed once
under ``torch.no_grad`` (the policy *is* the reference at step 0, so every margin is 0
and the loss is log 2 there). The DPO loss (Rafailov et al. 2023, eq. 7) is
:func:`dynamics.objectives.dpo_loss`, evaluated in float64 on the ``(B,)``
log-probabilities.

Completions (``--completion``):

- ``token`` (default): the answer token alone, THEORY's single-token model.
- ``token+eos``: what TRL's ``DPOTrainer`` scores for plain-string data (THEORY §5): it
  appends the end-of-text token to every completion, so
  ``log π(y) = log π(y | x) + log π(EOS | x, y)``. Computed from the prompt's key/value
  cache with one more token per answer (``2B`` one-token continuations), not by a second
  full forward. A different objective from ``token``: use it to compare with TRL.

``method``: ``full`` trains every parameter of the (untied) model; ``lora`` trains LoRA
adapters (``peft``) on the attention and MLP projections, the base frozen.

Outputs of the probe (``prefdyn probe finetune``): ``finetune.parquet`` (per step ×
behavior × source: loss, accuracy, reward_accuracy, rewards/chosen, rewards/rejected,
rewards/margins, logps/chosen, logps/rejected), ``finetune_features.parquet``
(distinguishability, concentration, trace of ``g(x)`` per behavior, before and after
training, per split), ``finetune_run.json`` (timings, peak memory, parameter counts) and
the figure ``finetune.png``.

Shapes: ``N`` statements, ``B`` a batch, ``T`` tokens (left-padded), ``d`` the hidden
width, ``V`` the vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from dynamics.io import write_json, write_parquet
from dynamics.metrics import tie_half
from dynamics.objectives import dpo_loss
from synthetic.statistics import behavior_statistics
from synthetic.validation import ParameterError, check_choice, check_integer, check_number

__all__ = [
    "COMPLETIONS", "METHODS", "OPTIMIZERS", "LORA_TARGETS", "METRICS",
    "single_token_dpo_loss", "Prompts", "PreferenceData", "LastPosition", "TrainConfig",
    "encode_prompts", "preference_data", "answer_logps", "full_sequence_logps",
    "chosen_rejected", "evaluate", "statement_metrics", "behavior_rows", "prepare_policy",
    "release_policy", "train_dpo", "feature_statistics", "peak_memory", "reset_peak_memory",
    "add_training_arguments", "train_config", "add_arguments", "check", "run",
]

COMPLETIONS: dict[str, str] = {
    "token": "the answer token alone: log π(y|x) (THEORY's single-token model)",
    "token+eos": "the answer then the end-of-text token, as TRL's DPOTrainer scores "
                 "plain-string data: log π(y|x) + log π(EOS|x,y)",
}
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
DEFAULT_LR = {("full", "adamw"): 1e-5, ("lora", "adamw"): 1e-4,
              ("full", "sgd"): 1e-2, ("lora", "sgd"): 1e-1}
"""``--lr`` when not given, per (method, optimizer)."""
METRICS = ("loss", "accuracy", "reward_accuracy", "rewards/chosen", "rewards/rejected",
           "rewards/margins", "logps/chosen", "logps/rejected")
"""Per step and behavior, the names of :mod:`dynamics.metrics` (ties count one half)
plus the mean chosen and rejected log-probabilities (TRL's ``logps/*``)."""
SOURCES = ("train", "test", "batch")
"""``train``: all train statements (every ``eval_every`` steps); ``test``: the test
statements at the first and last step; ``batch``: the training batch of each step,
measured in its forward before the update (free)."""


# --------------------------------------------------------------------------- the objective


def single_token_dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                          ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *,
                          beta: float) -> torch.Tensor:
    """DPO loss per statement for single-token answers, unreduced.

    .. math::
        ℓ = −\\log σ\\big(β\\,[(\\log π(y_w|x) − \\log π_0(y_w|x))
                               − (\\log π(y_l|x) − \\log π_0(y_l|x))]\\big)

    (Rafailov et al. 2023, eq. 7) — :func:`dynamics.objectives.dpo_loss`; the four
    arguments are ``(B,)`` log-probabilities of the answer tokens (``y_w``/``y_l``
    chosen by the statement's sign, :func:`chosen_rejected`). ``beta > 0``.
    """
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                    ref_rejected_logps, beta=beta)


def chosen_rejected(logps: torch.Tensor, signs: torch.Tensor):
    """``(chosen, rejected)``, each ``(B,)``, from ``logps (B, 2)`` = (log π(Yes),
    log π(No)) and ``signs (B,)``: ``y_w = Yes`` where ``s > 0``, else ``No``."""
    yes, no = logps.unbind(-1)
    positive = signs.to(logps.device) > 0
    return torch.where(positive, yes, no), torch.where(positive, no, yes)


# --------------------------------------------------------------------------- data


@dataclass
class Prompts:
    """Every statement's prompt, tokenized once and left-padded to the longest.

    ``input_ids``, ``attention_mask`` (N, T) on the CPU; ``lengths`` (N,) real tokens.
    :meth:`batch` cuts the columns a batch does not need, so a batch is padded only
    to its own longest prompt.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, index, device) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``position_ids`` (B, T_b) of rows ``index``
        on ``device``; positions count real tokens only (as :func:`prompt_batch`)."""
        index = torch.as_tensor(index, dtype=torch.long)
        width = int(self.lengths[index].max())
        ids = self.input_ids[index, -width:]
        mask = self.attention_mask[index, -width:]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                "position_ids": positions.to(device)}


def encode_prompts(loaded, questions: list[str], *, prompt_format: str = "chat",
                   chunk: int = 512) -> Prompts:
    """Tokenize persona ``questions`` with :func:`llm_probes.model.prompt_batch`."""
    from llm_probes.model import prompt_batch

    parts = [prompt_batch(loaded, list(questions[i:i + chunk]), prompt_format=prompt_format)
             for i in range(0, len(questions), chunk)]
    width = max(p["input_ids"].shape[1] for p in parts)
    pad = loaded.tokenizer.pad_token_id
    ids = torch.cat([torch.nn.functional.pad(p["input_ids"].cpu(),
                                             (width - p["input_ids"].shape[1], 0), value=pad)
                     for p in parts])
    mask = torch.cat([torch.nn.functional.pad(p["attention_mask"].cpu(),
                                              (width - p["attention_mask"].shape[1], 0))
                      for p in parts])
    return Prompts(ids, mask, mask.sum(-1))


@dataclass
class PreferenceData:
    """The statements of a run as tensors.

    ``signs (N,)`` float64 (+1: ``y_w = Yes``), ``codes (N,)`` behavior index into
    ``names``, ``train`` / ``test`` index arrays into the N statements, ``answers`` =
    (yes_id, no_id), ``eos_id`` the token appended under ``completion="token+eos"``.
    """

    prompts: Prompts
    signs: torch.Tensor
    codes: np.ndarray
    names: list[str]
    train: np.ndarray
    test: np.ndarray
    answers: tuple[int, int]
    eos_id: int | None

    def flipped(self) -> "PreferenceData":
        """The same statements with chosen and rejected swapped."""
        return PreferenceData(self.prompts, -self.signs, self.codes, self.names, self.train,
                              self.test, self.answers, self.eos_id)


def preference_data(loaded, statements: pd.DataFrame, *, prompt_format: str | None = None,
                    completion: str = "token") -> PreferenceData:
    """:class:`PreferenceData` of a :func:`llm_probes.persona.load_statements` table."""
    from llm_probes.model import answer_ids

    check_choice("--completion", completion, COMPLETIONS)
    prompt_format = prompt_format or getattr(loaded, "prompt_format", "chat")
    answers = answer_ids(loaded, prompt_format, name=getattr(loaded, "name", ""))
    eos_id = None
    if completion == "token+eos":
        eos_id = loaded.tokenizer.eos_token_id
        if eos_id is None:
            raise ParameterError("--completion", completion, "needs a tokenizer with an "
                                 "end-of-text token; this one has none: use token")
    names = list(dict.fromkeys(statements["behavior"]))
    codes = pd.Categorical(statements["behavior"], categories=names).codes.astype(np.int64)
    split = statements["split"].to_numpy()
    prompts = encode_prompts(loaded, statements["question"].tolist(),
                             prompt_format=prompt_format)
    signs = torch.tensor(statements["sign"].to_numpy(dtype=np.float64))
    return PreferenceData(prompts, signs,
                          codes, names, np.flatnonzero(split == "train"),
                          np.flatnonzero(split == "test"), answers, eos_id)


# --------------------------------------------------------------------------- log-probabilities


class LastPosition(NamedTuple):
    """What one efficient forward gives for a batch.

    ``logps (B, 2)``: log π(Yes), log π(No) (with ``+ log π(EOS | x, y)`` under
    ``token+eos``); ``hidden (B, d)``: ``g(x)``, the final hidden state at the last
    prompt token; ``vocab (B, V)``: the full next-token log-distribution there;
    ``answer_hidden (B, 2, d)``: the final hidden state at the answer token of
    ``x·Yes`` and ``x·No`` (only under ``token+eos``, else None).
    """

    logps: torch.Tensor
    hidden: torch.Tensor
    vocab: torch.Tensor
    answer_hidden: torch.Tensor | None = None


def _base(model):
    """The causal LM under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_keyword(decoder) -> str:
    """The decoder's name for its key/value cache argument: ``cache`` from
    transformers 5.24 on (``past_key_values`` is deprecated there), before it
    ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else \
        "past_key_values"


def _cache_of(output):
    """The key/value cache of a decoder output, under either transformers name."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def answer_logps(model, batch: dict, *, answers: tuple[int, int],
                 eos_id: int | None = None) -> LastPosition:
    """log π(Yes), log π(No) of a left-padded prompt batch from one decoder forward.

    ``batch``: ``input_ids``, ``attention_mask``, ``position_ids`` (B, T) (see
    :meth:`Prompts.batch`). The decoder runs once over ``(B, T)``; the output layer
    multiplies only ``g = hidden[:, -1]`` (B, d). With ``eos_id`` (``token+eos``) the
    prompt's key/value cache is kept, repeated for the two answers, and one more
    decoder step over ``(2B, 1)`` answer tokens gives ``log π(EOS | x, y)``. Follows
    the caller's grad mode.
    """
    base = _base(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = batch.get("position_ids")
    if positions is None:
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                  use_cache=eos_id is not None)
    g = out.last_hidden_state[:, -1]                      # (B, d), after the final norm
    vocab = head(g).float().log_softmax(-1)               # (B, V)
    logps = vocab[:, list(answers)]                       # (B, 2)
    answer_hidden = None
    if eos_id is not None:
        b = ids.shape[0]
        cache = _cache_of(out)
        cache.batch_repeat_interleave(2)                  # rows: x1·Yes, x1·No, x2·Yes, ...
        step_ids = torch.tensor(answers, device=ids.device).repeat(b)[:, None]   # (2B, 1)
        step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1).repeat_interleave(2, 0)
        step_pos = (positions[:, -1:] + 1).repeat_interleave(2, 0)                 # (2B, 1)
        kv = {_cache_keyword(decoder): cache}
        nxt = decoder(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos,
                      use_cache=True, **kv).last_hidden_state[:, -1]
        eos = head(nxt).float().log_softmax(-1)[:, eos_id].view(b, 2)           # (B, 2)
        logps = logps + eos
        answer_hidden = nxt.view(b, 2, -1)                                       # (B, 2, d)
    return LastPosition(logps, g, vocab, answer_hidden)


def full_sequence_logps(model, batch: dict, answer: torch.Tensor, *,
                        eos_id: int | None = None) -> torch.Tensor:
    """Naive reference: log π(answer [+ EOS] | x) from ``model(prompt + answer).logits``.

    Runs the whole causal LM over the ``(B, T + k)`` sequence (``k`` = 1, or 2 with
    ``eos_id``), takes the full ``(B, T + k, V)`` logits and sums the log-probabilities
    of the response tokens — what a general sequence DPO implementation (TRL) does.
    ``answer (B,)`` token ids. Returns ``(B,)``.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    response = answer.to(ids.device)[:, None]
    if eos_id is not None:
        response = torch.cat([response, torch.full_like(response, eos_id)], 1)
    k = response.shape[1]
    full_ids = torch.cat([ids, response], 1)                                   # (B, T + k)
    full_mask = torch.cat([mask, torch.ones_like(response, dtype=mask.dtype)], 1)
    positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions,
                   use_cache=False).logits                                     # (B, T + k, V)
    logp = logits[:, -k - 1:-1].float().log_softmax(-1)                        # (B, k, V)
    return logp.gather(-1, response[..., None]).squeeze(-1).sum(-1)


class Evaluation(NamedTuple):
    """:func:`evaluate`'s result, rows in the order of ``index``, on the CPU:
    ``logps (n, 2)`` float64, ``hidden (n, d)`` or None, ``vocab (n, V)`` or None."""

    logps: torch.Tensor
    hidden: torch.Tensor | None
    vocab: torch.Tensor | None


@torch.no_grad()
def evaluate(model, data: PreferenceData, index, *, batch_size: int = 32,
             hidden: bool = False, vocab: bool = False) -> Evaluation:
    """:func:`answer_logps` over the statements ``index``, batched by prompt length
    (the shortest together, so little padding) and returned in ``index`` order."""
    index = np.asarray(index, dtype=np.int64)
    device = next(model.parameters()).device
    order = np.argsort(data.prompts.lengths[index].numpy(), kind="stable")
    logps = torch.empty(len(index), 2, dtype=torch.float64)
    feats = vocabs = None
    for start in range(0, len(index), batch_size):
        rows = order[start:start + batch_size]
        out = answer_logps(model, data.prompts.batch(index[rows], device),
                           answers=data.answers, eos_id=data.eos_id)
        logps[rows] = out.logps.double().cpu()
        if hidden:
            if feats is None:
                feats = torch.empty(len(index), out.hidden.shape[-1])
            feats[rows] = out.hidden.float().cpu()
        if vocab:
            if vocabs is None:
                vocabs = torch.empty(len(index), out.vocab.shape[-1])
            vocabs[rows] = out.vocab.cpu()
    return Evaluation(logps, feats, vocabs)


# --------------------------------------------------------------------------- metrics


def statement_metrics(logps: torch.Tensor, ref: torch.Tensor, signs: torch.Tensor, *,
                      beta: float) -> dict[str, np.ndarray]:
    """Per statement (float64): every name in :data:`METRICS`.

    ``logps``, ``ref`` (n, 2) = log π(Yes), log π(No) of the policy and reference;
    ``signs (n,)``. ``accuracy`` = 1[log π(y_w) > log π(y_l)], ``reward_accuracy`` =
    1[h > 0], ties one half (:func:`dynamics.metrics.tie_half`).
    """
    chosen, rejected = chosen_rejected(logps.double(), signs)
    ref_chosen, ref_rejected = chosen_rejected(ref.double(), signs)
    reward_chosen = beta * (chosen - ref_chosen)
    reward_rejected = beta * (rejected - ref_rejected)
    margin = reward_chosen - reward_rejected
    values = {
        "loss": single_token_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta),
        "accuracy": tie_half(chosen - rejected),
        "reward_accuracy": tie_half(margin),
        "rewards/chosen": reward_chosen, "rewards/rejected": reward_rejected,
        "rewards/margins": margin, "logps/chosen": chosen, "logps/rejected": rejected,
    }
    return {k: v.detach().cpu().numpy() for k, v in values.items()}


def behavior_rows(values: dict[str, np.ndarray], codes: np.ndarray, names: list[str],
                  **fields) -> list[dict]:
    """One row per behavior: the mean of each per-statement metric, ``n``, and
    ``fields`` (step, source, ...)."""
    rows = []
    for code, name in enumerate(names):
        mask = codes == code
        if not mask.any():
            continue
        row = dict(fields, behavior=name, n=int(mask.sum()))
        row.update({k: float(v[mask].mean()) for k, v in values.items()})
        rows.append(row)
    return rows


def feature_statistics(hidden: torch.Tensor, signs, codes: np.ndarray, names: list[str],
                       **fields) -> pd.DataFrame:
    """:func:`synthetic.statistics.behavior_statistics` of ``g(x)`` (n, d), with
    ``fields`` as constant columns. Behaviors with fewer than 2 statements of a sign
    are left out."""
    signs = np.asarray(signs, dtype=np.float64)
    keep = [i for i, _ in enumerate(names)
            if ((codes == i) & (signs > 0)).sum() >= 2 and ((codes == i) & (signs < 0)).sum() >= 2]
    if not keep:
        return pd.DataFrame()
    mask = np.isin(codes, keep)
    remap = {c: j for j, c in enumerate(keep)}
    frame = behavior_statistics(hidden.double().numpy()[mask], signs[mask],
                                np.array([remap[c] for c in codes[mask]]),
                                [names[i] for i in keep])
    for key, value in fields.items():
        frame.insert(0, key, value)
    return frame


# --------------------------------------------------------------------------- the policy


def _check_untied(model) -> None:
    base = _base(model)
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        raise ParameterError("--model", getattr(base.config, "name_or_path", "?"),
                             "must have its output layer untied from the input embeddings "
                             "(load it with llm_probes.model.load_model)")


def prepare_policy(loaded, method: str, *, lora_rank: int = 8, lora_alpha: float | None = None,
                   lora_targets=LORA_TARGETS, copy_model: bool = True):
    """The trainable policy from ``loaded.model``.

    ``full``: every parameter trainable (the output layer must be untied). ``lora``:
    ``peft`` LoRA adapters of rank ``lora_rank`` (scaling ``lora_alpha / lora_rank``,
    default alpha = 2 × rank) on ``lora_targets``; peft initialises ``B = 0``, so the
    policy equals the base model at step 0. ``copy_model=False`` trains
    ``loaded.model`` itself (no second copy of the weights in memory; undo LoRA with
    :func:`release_policy`; full training cannot be undone).
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
              on_eval: Callable[[int, Evaluation], None] | None = None) -> pd.DataFrame:
    """DPO of ``policy`` on ``data.train``; the tidy metrics table.

    ``ref (N, 2)``: reference log π(Yes), log π(No) of every statement, computed once
    (:func:`evaluate` of the model before training). ``start (N, 2)``: the policy's
    own values at step 0 if known (``ref`` itself when the policy is the reference);
    else they are evaluated. Each step draws ``batch_size`` train statements (a new
    permutation per epoch, ``config.seed``), runs :func:`answer_logps`, and takes one
    optimiser step on the mean of :func:`single_token_dpo_loss`. Metrics of all train
    statements at step 0 and every ``eval_every`` steps (``source="train"``), of the
    test statements at the first and last step (``"test"``), and of each batch before
    its update (``"batch"``). ``on_eval(step, evaluation)`` sees every train
    evaluation (rows in ``data.train`` order).
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


# --------------------------------------------------------------------------- CLI


def add_training_arguments(parser: argparse.ArgumentParser, *, steps: int = 20,
                           title: str = "DPO training") -> None:
    """The options of a DPO run, shared by finetune, misalignment and displacement."""
    group = parser.add_argument_group(title)
    group.add_argument("--method", choices=list(METHODS), default="lora",
                       help="full: every parameter; lora: peft adapters (default: lora)")
    group.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default: 8)")
    group.add_argument("--lora-alpha", type=float, default=None,
                       help="LoRA alpha (default: 2 × rank)")
    group.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                       help="comma-separated module names to adapt (default: the attention "
                       "and MLP projections)")
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


def policy_from_args(loaded, args, *, copy_model: bool):
    """:func:`prepare_policy` with the CLI's method and LoRA options."""
    targets = [t.strip() for t in str(args.lora_targets).split(",") if t.strip()]
    return prepare_policy(loaded, args.method, lora_rank=args.lora_rank,
                          lora_alpha=args.lora_alpha, lora_targets=targets,
                          copy_model=copy_model)


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
    check_integer("--lora-rank", args.lora_rank, ge=1)
    if args.lora_alpha is not None:
        check_number("--lora-alpha", args.lora_alpha, gt=0)


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
    policy = policy_from_args(loaded, args, copy_model=False)
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
