"""One forward per preference pair: the prompt once, both responses after it.

A pair ``(x, y_w, y_l)`` is usually scored as two sequences, ``x + y_w`` and
``x + y_l``, so the prompt's tokens go through the model twice. Here they go through
once: the row is ``x + y_w + y_l`` with

* positions ``0 … P−1`` for ``x``, ``P … P+C−1`` for ``y_w`` and again ``P … P+R−1``
  for ``y_l`` (rotary and learned position embeddings see what they would see in
  ``x + y_l``);
* an attention mask that lets every token see the prompt and the earlier tokens of its
  own response, never the other response (a padded position sees only itself).

Causal attention then gives every ``y_l`` token exactly the state it has in ``x + y_l``.
The scoring state of response token ``k`` is the one before it: ``y_w``'s first token
and ``y_l``'s first token are both scored by the prompt's last state (position
``P − 1``); later ``y_l`` tokens by the states inside ``y_l``.

With HH-RLHF budgets of 64 prompt / 32 response tokens a pair costs ``P + C + R``
token-forwards instead of ``2P + C + R`` (about 1.5× fewer). The mask is a dense
``(b, 1, T, T)`` additive float tensor, which the ``sdpa`` and ``eager`` attention of
Hugging Face decoders take as given. :func:`supports_packing` checks a model once (a
short random pair, packed against unpacked) before any caller relies on it; a model
that fails it (ALiBi, a custom attention kernel) is scored unpacked.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Packed", "pack_pairs", "supports_packing"]

_ATTENTION = ("sdpa", "eager")
"""Attention implementations that apply a given 4D additive mask as it is."""
_CHECKED: "weakref.WeakKeyDictionary[object, bool]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Packed:
    """One batch of ``b`` pairs packed as rows of ``T`` tokens.

    ``ids``, ``positions`` ``(b, T)``; ``mask`` ``(b, 1, T, T)`` additive (0 where a
    query may attend, the dtype's minimum elsewhere); ``rows``, ``cols`` ``(R,)`` the
    scoring state of each response token, ``targets`` ``(R,)`` that token,
    ``owner`` ``(R,)`` its response: ``j`` for the chosen response of the batch's pair
    ``j``, ``b + j`` for its rejected one. Response tokens come chosen first, then
    rejected, pair by pair, in token order."""

    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    rows: np.ndarray
    cols: np.ndarray
    targets: np.ndarray
    owner: np.ndarray


def pack_pairs(prompts: Sequence, chosen: Sequence, rejected: Sequence, *, pad_id: int = 0,
               dtype: torch.dtype = torch.float32) -> Packed:
    """Pack ``b`` pairs (token ids; every prompt and response non-empty) as rows of
    ``x + y_w + y_l``, right-padded to the longest (see the module docstring)."""
    b = len(prompts)
    sizes = [(len(p), len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)]
    width = max(p + c + r for p, c, r in sizes)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    segment = torch.full((b, width), -1, dtype=torch.long)   # 0 prompt, 1 y_w, 2 y_l, -1 pad
    rows, cols, targets, owner = [], [], [], []
    for j, ((p, c, r), x, yw, yl) in enumerate(zip(sizes, prompts, chosen, rejected)):
        used = p + c + r
        ids[j, :used] = torch.as_tensor(list(x) + list(yw) + list(yl))
        positions[j, :used] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
        positions[j, used:] = torch.arange(p + r, p + r + width - used)
        segment[j, :p], segment[j, p:p + c], segment[j, p + c:used] = 0, 1, 2
        rows.append(np.full(c + r, j))
        cols.append(np.r_[np.arange(p - 1, p + c - 1), p - 1, np.arange(p + c, used - 1)])
        targets.append(np.r_[np.asarray(yw, dtype=np.int64), np.asarray(yl, dtype=np.int64)])
        owner.append(np.r_[np.full(c, j), np.full(r, b + j)])
    at = torch.arange(width)
    query, key = segment[:, :, None], segment[:, None, :]
    allowed = (at[:, None] >= at[None, :]) & (key >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool)             # a padded query sees itself
    mask = torch.zeros((b, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return Packed(ids, positions, mask, np.concatenate(rows), np.concatenate(cols),
                  np.concatenate(targets), np.concatenate(owner))


def packed_hidden(decoder, packed: Packed, device) -> torch.Tensor:
    """The decoder's final (normed) states ``(b, T, d)`` of a :class:`Packed` batch."""
    return decoder(input_ids=packed.ids.to(device), attention_mask=packed.mask.to(device),
                   position_ids=packed.positions.to(device), use_cache=False).last_hidden_state


def supports_packing(model) -> bool:
    """Whether ``model`` (a Hugging Face causal LM, or a peft wrapper of one) scores a
    packed pair as it scores the two sequences: its attention is ``sdpa`` or ``eager``
    and, checked once per model object, the states of a short random pair agree
    packed and unpacked to the dtype's precision."""
    from llm_probes.logprobs import base_model
    from llm_probes.model import _decoder

    base = base_model(model)
    if base in _CHECKED:
        return _CHECKED[base]
    config = base.config
    ok = getattr(config, "_attn_implementation", None) in _ATTENTION
    if ok:
        parameter = next(base.parameters())
        vocab = int(base.get_output_embeddings().weight.shape[0])
        rng = np.random.default_rng(0)
        x, yw, yl = (rng.integers(0, vocab, n).tolist() for n in (5, 3, 4))
        decoder = _decoder(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                packed = pack_pairs([x], [yw], [yl], dtype=parameter.dtype)
                got = packed_hidden(decoder, packed, parameter.device)[0]
                want = [decoder(input_ids=torch.tensor([x + y], device=parameter.device),
                                use_cache=False).last_hidden_state[0] for y in (yw, yl)]
        except (TypeError, ValueError, RuntimeError):  # no position_ids, no 4D mask, ...
            got = None
        finally:
            model.train(was_training)
        if got is None:
            ok = False
        else:
            expect = torch.cat([want[0], want[1][len(x):]])    # x + y_w, then y_l's own
            tolerance = 1e-4 if parameter.dtype in (torch.float32, torch.float64) else 3e-2
            scale = float(expect.abs().max()) or 1.0
            ok = bool(torch.isfinite(got).all()) and float((got - expect).abs().max()) \
                <= tolerance * scale
    _CHECKED[base] = ok
    return ok
