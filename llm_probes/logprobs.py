"""The statements of a probe as tensors, and the model's log-probabilities of their answers.

Statement ``j`` is a prompt ``x_j`` with sign ``s_j``: its chosen answer ``y_w`` is
``Yes`` when ``s_j = +1`` and ``No`` otherwise, ``y_l`` the other
(:class:`PreferenceData`). The answers are single tokens, so

    log π(y | x) = log softmax(lm_head(g(x)))_y,

with ``g(x)`` the final hidden state at the last prompt token: **one forward of the
decoder per statement, then the output layer at that one position**
(:func:`answer_logps`) — ``(B, V)`` logits, never the ``(B, T, V)`` of a
full-sequence forward (:func:`full_sequence_logps`, the naive reference).

Completions (``--completion``):

- ``token`` (default): the answer token alone, THEORY's single-token model.
- ``token+eos``: what TRL's ``DPOTrainer`` scores for plain-string data (THEORY §5): it
  appends the end-of-text token to every completion, so
  ``log π(y) = log π(y | x) + log π(EOS | x, y)``. Computed from the prompt's key/value
  cache with one more token per answer (``2B`` one-token continuations), not by a second
  full forward. A different objective from ``token``: use it to compare with TRL.

Shapes: ``N`` statements, ``B`` a batch, ``T`` tokens (left-padded), ``d`` the hidden
width, ``V`` the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from synthetic.validation import ParameterError, check_choice

__all__ = ["COMPLETIONS", "Prompts", "PreferenceData", "LastPosition", "Evaluation",
           "encode_prompts", "preference_data", "base_model", "answer_logps",
           "full_sequence_logps", "evaluate"]

COMPLETIONS: dict[str, str] = {
    "token": "the answer token alone: log π(y|x) (THEORY's single-token model)",
    "token+eos": "the answer then the end-of-text token, as TRL's DPOTrainer scores "
                 "plain-string data: log π(y|x) + log π(EOS|x,y)",
}


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


def base_model(model):
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
    base = base_model(model)
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
