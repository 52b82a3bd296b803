"""DPO of the real model on multi-token preference pairs (issue 14).

A pair is ``(x, y_w, y_l)`` as token ids (:func:`llm_probes.pairs.tokenize_pairs`).
The sequence log-probability of a response ``y`` of ``L`` tokens after a prompt of
``P`` tokens is

    log π(y|x) = Σ_{k=1..L} log softmax(W h_{P−2+k})[y_k],

with ``h_t`` the final hidden state at position ``t`` (after the norm) and ``W`` the
output layer: the state that scores response token ``k`` sits at position ``P − 1 + k``
counted from 0 for ``k`` from 0 (as in :mod:`llm_probes.pair_features`).

:func:`sequence_logps` computes it for a batch of sequences, differentiably: the
sequences are right-padded to the longest *of a length bucket*
(:func:`llm_probes.pair_features.length_batches`), the decoder runs once per bucket,
and the output layer and log-softmax run only on the response rows (never a
``(B, T, V)`` tensor). Under grad they run in :class:`_HeadLogps`, whose backward
builds the logits' gradient ``g (e_y − softmax)`` in place over the ``(R, V)`` logits
it kept, or, when they would pass ``_KEEP_LOGITS`` numbers, over logits recomputed
``_LOGIT_ROWS`` rows at a time (backward then keeps only the ``(R, d)`` states).

:func:`train_pair_dpo` is the loop: one optimiser step per minibatch of pairs on the
mean of :func:`llm_probes.objective.single_token_dpo_loss` (the DPO loss, Rafailov et
al. 2023 eq. 7, whatever the response length) with the reference log-probabilities
``ref`` computed once from the frozen start model (:func:`pair_logps`), the policy
from :func:`llm_probes.training.prepare_policy` (full or LoRA, seeded). It records
per step the batch's loss and margin, and at the evaluation steps ``log π(y_w)`` and
``log π(y_l)`` of every training pair.

Shapes: ``n`` pairs, ``B`` a batch of pairs, ``R`` response tokens of a batch, ``d``
the hidden width, ``V`` the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from llm_probes.logprobs import base_model
from llm_probes.model import _decoder
from llm_probes.objective import single_token_dpo_loss
from llm_probes.pair_features import length_batches
from llm_probes.training import TrainConfig, _bar, _batches, _optimizer

__all__ = ["PairData", "PairRun", "pair_data", "sequence_logps", "pair_sequence_logps",
           "pair_logps", "train_pair_dpo"]

_LOGIT_ROWS = 256
"""Response rows per output-layer block (``256 × V`` logits at a time)."""
_KEEP_LOGITS = 1 << 25
"""Logits (numbers) a training step may keep for backward: 128 MB in float32, about 680
response tokens of a 49,152-word vocabulary; above, the blocks are recomputed."""
MAX_BATCH_TOKENS = 4096
"""Padded tokens per decoder forward (``rows × longest``) in training and evaluation."""


@dataclass(frozen=True)
class PairData:
    """Token ids of ``n`` pairs: ``prompts``, ``chosen``, ``rejected`` (lists of int
    lists, responses non-empty) and ``pad_id`` (any id: padded positions are masked)."""

    prompts: list
    chosen: list
    rejected: list
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.prompts)


def pair_data(tokenized, tokenizer=None) -> PairData:
    """:class:`PairData` of a :class:`llm_probes.pairs.TokenizedPairs`."""
    f = tokenized.frame
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    return PairData([list(map(int, p)) for p in f.prompt_ids],
                    [list(map(int, c)) for c in f.chosen_ids],
                    [list(map(int, r)) for r in f.rejected_ids], int(pad))


def _block_logps(head: torch.nn.Module, states: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(head(states))[targets]`` ``(rows,)``; ``states`` ``(rows, d)``."""
    logits = head(states)                                       # (rows, V)
    picked = logits.gather(-1, targets[:, None])[:, 0]
    return picked - _row_logsumexp(logits)


_LSE_CHUNK = 1 << 19
"""Numbers per log-sum-exp chunk (2 MB in float32): the temporaries stay in cache."""


def _row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``logsumexp(logits, -1)`` ``(rows,)``, a few rows at a time (float32 at least):
    the whole-block call would allocate two ``(rows, V)`` temporaries."""
    rows = max(1, _LSE_CHUNK // max(1, logits.shape[-1]))
    dtype = torch.promote_types(logits.dtype, torch.float32)
    out = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
    for start in range(0, logits.shape[0], rows):
        out[start:start + rows] = torch.logsumexp(logits[start:start + rows].to(dtype), dim=-1)
    return out.to(logits.dtype)


class _HeadLogps(torch.autograd.Function):
    """``log softmax(states Wᵀ + b)[target]`` ``(R,)`` with the gradient written out:
    for upstream ``g`` the logits' gradient is ``g_r (e_{y_r} − softmax_r)``, built in
    place over the kept logits (or over logits recomputed block by block when
    ``keep`` is false), then ``∂states = G W`` and ``∂W = Gᵀ states``, ``∂b = Σ_r G``.

    Against autograd on ``logits.gather − logsumexp`` it allocates one ``(R, V)`` tensor
    instead of six (each a first touch of fresh pages) and makes one pass over it in
    backward instead of five; the result is the same up to float rounding
    (``tests/test_packing.py``)."""

    @staticmethod
    def forward(ctx, states, weight, bias, target, keep: bool):
        rows = len(target) if keep else _LOGIT_ROWS
        values, lse, kept = [], [], []
        for start in range(0, len(target), rows):
            logits = torch.nn.functional.linear(states[start:start + rows], weight, bias)
            block = _row_logsumexp(logits)
            values.append(logits.gather(-1, target[start:start + rows, None])[:, 0] - block)
            lse.append(block)
            if keep:
                kept.append(logits)
        ctx.rows = rows
        ctx.kept = kept[0] if keep else None  # not saved_tensors: backward overwrites it
        ctx.save_for_backward(states, weight, bias, torch.cat(lse), target)
        return torch.cat(values)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        states, weight, bias, lse, target = ctx.saved_tensors
        need_states, need_weight, need_bias = ctx.needs_input_grad[:3]
        d_states = torch.empty_like(states) if need_states else None
        d_weight = None
        d_bias = (torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
                  if need_bias else None)
        chunk = max(1, _LSE_CHUNK // max(1, weight.shape[0]))
        for start in range(0, len(target), ctx.rows):
            part = slice(start, start + ctx.rows)
            if ctx.kept is not None:  # overwritten below: a second backward recomputes
                g_logits, ctx.kept = ctx.kept, None
            else:
                g_logits = torch.nn.functional.linear(states[part], weight, bias)
            g = grad[part].to(g_logits.dtype)
            for c in range(0, g_logits.shape[0], chunk):       # softmax, in cache
                z = g_logits[c:c + chunk]
                z.sub_(lse[part][c:c + chunk, None]).exp_().mul_(-g[c:c + chunk, None])
            rows = torch.arange(g_logits.shape[0], device=g_logits.device)
            g_logits[rows, target[part]] += g                 # G = g (e_y − softmax)
            if need_states:
                d_states[part] = g_logits @ weight
            if need_weight:
                block = g_logits.T @ states[part]
                d_weight = block if d_weight is None else d_weight.add_(block)
            if need_bias:
                d_bias += g_logits.sum(0)
            del g_logits
        return d_states, d_weight, d_bias, None, None


def _response_logps(head: torch.nn.Module, picked: torch.Tensor,
                    target: torch.Tensor) -> torch.Tensor:
    """``log softmax(head(picked))[target]`` ``(R,)`` in float64.

    Without a graph to build: ``_LOGIT_ROWS`` rows at a time. Under grad with a plain
    ``nn.Linear`` head: :class:`_HeadLogps`, keeping all ``R × V`` logits when they fit
    in ``_KEEP_LOGITS`` numbers, else recomputing them in backward one block at a time.
    Any other head (e.g. wrapped by an adapter library), mixed dtypes or autocast:
    autograd over the blocks, checkpointed above ``_KEEP_LOGITS``."""
    vocab = int(head.weight.shape[0])
    keep = len(target) * vocab <= _KEEP_LOGITS
    grad = torch.is_grad_enabled() and (picked.requires_grad or head.weight.requires_grad)
    if (grad and type(head) is torch.nn.Linear and picked.dtype == head.weight.dtype
            and not torch.is_autocast_enabled(picked.device.type)):
        return _HeadLogps.apply(picked, head.weight, head.bias, target, keep).double()
    blocks = []
    for start in range(0, len(target), _LOGIT_ROWS):
        part = slice(start, start + _LOGIT_ROWS)
        if grad and not keep:
            blocks.append(checkpoint(_block_logps, head, picked[part], target[part],
                                     use_reentrant=False))
        else:
            blocks.append(_block_logps(head, picked[part], target[part]))
    return torch.cat(blocks).double()


def sequence_logps(model, prompts: Sequence, responses: Sequence, *, pad_id: int = 0,
                   max_batch_tokens: int = MAX_BATCH_TOKENS) -> torch.Tensor:
    """``log π(responses[i] | prompts[i])`` ``(N,)`` in float64, differentiable when
    grad is enabled (see the module docstring; under ``torch.no_grad`` nothing is
    kept). ``prompts[i]`` non-empty, ``responses[i]`` non-empty (token ids).

    Sequences are bucketed by length (at most ``max_batch_tokens`` padded tokens a
    forward) and right-padded; each response token's log-probability comes from the
    state at the position before it, in the model's dtype, and is summed per response
    in float64."""
    device = next(model.parameters()).device
    head = base_model(model).get_output_embeddings()
    decoder = _decoder(model)
    lengths = np.array([len(p) + len(r) for p, r in zip(prompts, responses)])
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for batch in length_batches(lengths, len(lengths), max_batch_tokens):
        longest = int(lengths[batch].max())
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        rows, cols, targets = [], [], []
        for j, i in enumerate(batch):
            p, r = prompts[i], responses[i]
            ids[j, :len(p) + len(r)] = torch.as_tensor(list(p) + list(r))
            mask[j, :len(p) + len(r)] = 1
            rows.append(np.full(len(r), j))
            cols.append(np.arange(len(p) - 1, len(p) - 1 + len(r)))
            targets.append(np.asarray(r))
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                         use_cache=False).last_hidden_state      # (b, T, d), after the norm
        rows_t = torch.as_tensor(np.concatenate(rows), device=device)
        picked = hidden[rows_t, torch.as_tensor(np.concatenate(cols), device=device)]  # (R, d)
        del hidden
        target = torch.as_tensor(np.concatenate(targets), dtype=torch.long, device=device)
        per_token = _response_logps(head, picked, target)     # (R,)
        sums = torch.zeros(len(batch), dtype=torch.float64, device=device)
        sums = sums.index_add(0, rows_t, per_token)             # (b,)
        for j, i in enumerate(batch):
            out[i] = sums[j]
    return torch.stack(out)


def pair_sequence_logps(model, prompts: Sequence, chosen: Sequence, rejected: Sequence, *,
                        pad_id: int = 0, max_batch_tokens: int = MAX_BATCH_TOKENS,
                        packed: bool | None = None) -> torch.Tensor:
    """``(B, 2)`` float64: ``log π(chosen[i] | prompts[i])``, ``log π(rejected[i] |
    prompts[i])``, differentiable as :func:`sequence_logps`.

    ``packed`` (default: :func:`llm_probes.packing.supports_packing` of the model):
    each pair is one row ``x + y_w + y_l`` with the prompt computed once
    (:mod:`llm_probes.packing`), rows bucketed by ``P + C + R``; else the ``2B``
    sequences go through :func:`sequence_logps`."""
    from llm_probes.packing import pack_pairs, packed_hidden, supports_packing

    b = len(prompts)
    if packed is None:
        packed = supports_packing(model)
    if not packed:
        return sequence_logps(model, list(prompts) * 2, list(chosen) + list(rejected),
                              pad_id=pad_id, max_batch_tokens=max_batch_tokens).view(2, b).T
    parameter = next(model.parameters())
    head = base_model(model).get_output_embeddings()
    decoder = _decoder(model)
    lengths = np.array([len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)])
    out = torch.zeros(2 * b, dtype=torch.float64, device=parameter.device)
    for batch in length_batches(lengths, b, max_batch_tokens):
        pack = pack_pairs([prompts[i] for i in batch], [chosen[i] for i in batch],
                          [rejected[i] for i in batch], pad_id=pad_id, dtype=parameter.dtype)
        hidden = packed_hidden(decoder, pack, parameter.device)       # (b', T, d)
        picked = hidden[torch.as_tensor(pack.rows, device=parameter.device),
                        torch.as_tensor(pack.cols, device=parameter.device)]   # (R, d)
        del hidden
        per_token = _response_logps(head, picked, torch.as_tensor(
            pack.targets, dtype=torch.long, device=parameter.device))  # (R,)
        # owner j < b' is pair batch[j]'s chosen response, b' + j its rejected one
        k = len(batch)
        where = np.where(pack.owner < k, batch[pack.owner % k], b + batch[pack.owner % k])
        out = out.index_add(0, torch.as_tensor(where, device=parameter.device), per_token)
    return out.view(2, b).T


def pair_logps(model, data: PairData, index=None, *,
               max_batch_tokens: int = MAX_BATCH_TOKENS) -> torch.Tensor:
    """``(n, 2)`` float64 on the CPU: ``log π(y_w|x)``, ``log π(y_l|x)`` of the pairs
    ``index`` (default all), without gradients, in eval mode."""
    index = np.arange(len(data)) if index is None else np.asarray(index, dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            values = pair_sequence_logps(
                model, [data.prompts[i] for i in index], [data.chosen[i] for i in index],
                [data.rejected[i] for i in index], pad_id=data.pad_id,
                max_batch_tokens=max_batch_tokens)
    finally:
        model.train(was_training)
    return values.cpu().contiguous()


@dataclass
class PairRun:
    """What :func:`train_pair_dpo` measured.

    ``steps``: one row per optimiser step (``step``, ``t = lr · step``, ``loss``,
    ``margin`` = mean ``β h`` of the batch before its update, ``accuracy`` = share of
    the batch with ``h > 0``); ``evals``: step → ``(n_train, 2)`` log π(y_w), log π(y_l)
    of the training pairs (rows in ``index`` order) at step 0, every ``eval_every``
    steps and the last."""

    steps: pd.DataFrame
    evals: dict[int, torch.Tensor] = field(default_factory=dict)

    def table(self, index) -> pd.DataFrame:
        """Long table: one row per evaluation step × training pair (``pair`` = the
        position in the data) with ``logp_chosen``, ``logp_rejected``."""
        index = np.asarray(index)
        frames = [pd.DataFrame({"step": step, "pair": index, "logp_chosen": v[:, 0].numpy(),
                                "logp_rejected": v[:, 1].numpy()})
                  for step, v in sorted(self.evals.items())]
        return pd.concat(frames, ignore_index=True)


def train_pair_dpo(policy, data: PairData, ref: torch.Tensor, config: TrainConfig, *,
                   index=None, start: torch.Tensor | None = None, progress: bool = False,
                   on_eval: Callable[[int, torch.Tensor], None] | None = None,
                   max_batch_tokens: int = MAX_BATCH_TOKENS) -> PairRun:
    """DPO of ``policy`` on the pairs ``index`` (default all) of ``data``.

    ``ref (n, 2)``: the reference log π(y_w), log π(y_l) of *every* pair of ``data``
    (:func:`pair_logps` of the start model, once). ``start (len(index), 2)``: the
    policy's own values at step 0 if known (``ref[index]`` when the policy is the
    reference); else evaluated. Each step draws ``config.batch_size`` pairs (a new
    permutation per epoch from ``config.seed``), computes the ``2B`` sequence
    log-probabilities in one graph (:func:`sequence_logps`) and takes one optimiser
    step on the mean DPO loss. ``on_eval(step, logps)`` sees every evaluation."""
    index = np.arange(len(data)) if index is None else np.asarray(index, dtype=np.int64)
    ref = ref.double().cpu()
    device = next(policy.parameters()).device
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = _optimizer(config.optimizer, params, config.lr)
    optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(config.seed)
    batches = _batches(index, config.batch_size, generator)
    beta = config.beta
    run = PairRun(pd.DataFrame())

    def evaluate(step: int, known=None) -> None:
        values = known.double().cpu() if known is not None else pair_logps(
            policy, data, index, max_batch_tokens=max_batch_tokens)
        run.evals[step] = values
        if on_eval is not None:
            on_eval(step, values)

    evaluate(0, start)
    rows = []
    policy.eval()  # no dropout: the loss is a deterministic function of the weights
    bar = _bar(config.steps, "dpo", progress)
    try:
        for step in range(1, config.steps + 1):
            batch = next(batches)
            logps = pair_sequence_logps(
                policy, [data.prompts[i] for i in batch], [data.chosen[i] for i in batch],
                [data.rejected[i] for i in batch], pad_id=data.pad_id,
                max_batch_tokens=max_batch_tokens)                       # (B, 2)
            chosen, rejected = logps.T
            ref_b = ref[batch].to(device)
            loss = single_token_dpo_loss(chosen, rejected, ref_b[:, 0], ref_b[:, 1],
                                         beta=beta)                      # (B,)
            h = ((chosen - ref_b[:, 0]) - (rejected - ref_b[:, 1])).detach()
            loss.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rows.append(dict(step=step, t=config.lr * step, loss=float(loss.detach().mean()),
                             margin=float(beta * h.mean()),
                             accuracy=float((h > 0).double().mean())))
            del logps, chosen, rejected, loss
            if step % config.eval_every == 0 or step == config.steps:
                evaluate(step)
            bar.update(1)
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
    run.steps = pd.DataFrame(rows)
    return run
