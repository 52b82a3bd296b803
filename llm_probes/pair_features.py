"""Hidden states and log-probabilities of multi-token responses (issue 14's features).

For a pair ``(x, y_w, y_l)`` (:mod:`llm_probes.pairs`, token ids) the model reads
``x + y`` once per response. The hidden state that scores response token ``k`` (after
the final norm: the vector ``lm_head`` multiplies) sits at the position before it, so a
response of ``L`` tokens after a prompt of ``P`` has its ``L`` scoring states at
positions ``P − 1 … P + L − 2``. Per response this module returns

* ``sum``: ``Σ_k h_k`` ``(d,)``, the sum of its scoring states (the quantity CHES,
  Razin et al. arXiv:2410.08847 Def. 2, is built from; the mean is ``sum / tokens``);
* ``logp``: ``log π(y|x) = Σ_k log softmax(lm_head(h_k))[y_k]``;
* ``tokens``: ``L``.

Sequences are sorted by length and cut into batches of at most ``batch_size`` sequences
and ``max_batch_tokens`` padded tokens, right-padded, so a batch carries little padding
and the log-softmax runs only on response positions, a few hundred rows at a time (never
a ``(B, T, V)`` logit tensor).
"""

from __future__ import annotations

import numpy as np
import torch

from synthetic.validation import check_integer

__all__ = ["response_features", "shared_prompt_features", "length_batches"]

SHARED_BATCH_TOKENS = 2048
"""Padded tokens per packed forward in :func:`shared_prompt_features`: 2,048 rows keep
the layers' GEMMs efficient and cut padding where lengths vary (32 HH-RLHF pairs: 18%
against 27% at 8,192, and 15% less time on 2 quiet cores)."""



def length_batches(lengths, batch_size: int, max_batch_tokens: int) -> list[np.ndarray]:
    """Indices of sequences in batches by increasing length: at most ``batch_size``
    sequences and ``max_batch_tokens`` padded tokens (``rows × longest``) each; a
    sequence longer than the token budget is a batch alone."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, current, longest = [], [], 0
    for index in order:
        width = max(longest, int(lengths[index]))
        if current and (len(current) == batch_size or (len(current) + 1) * width
                        > max_batch_tokens):
            batches.append(np.array(current))
            current, width = [], int(lengths[index])
        current.append(index)
        longest = width
    if current:
        batches.append(np.array(current))
    return batches


def response_features(loaded, prompts, responses, *, batch_size: int = 16,
                      max_batch_tokens: int = 8192, progress=None,
                      keep_states: bool = False) -> dict[str, np.ndarray]:
    """``sum`` ``(n, d)``, ``logp`` ``(n,)`` and ``tokens`` ``(n,)`` of each response
    ``responses[i]`` (token ids) after ``prompts[i]`` (token ids; non-empty), in
    float64. ``progress(k)`` is called with the sequences done after each batch.

    ``keep_states``: also every scoring state, ``states`` ``(R, d)`` float32 with
    ``R = Σ_i len(responses[i])``, in response order and token order within a response
    (response ``i`` owns rows ``offsets[i]:offsets[i + 1]``), and ``targets`` ``(R,)``,
    the token each row scores."""
    batch_size = check_integer("batch_size", batch_size, ge=1)
    max_batch_tokens = check_integer("max_batch_tokens", max_batch_tokens, ge=2)
    from llm_probes.model import _decoder
    from llm_probes.pair_dpo import _response_logps

    model, device = loaded.model, loaded.device
    head = loaded.model.get_output_embeddings()
    pad = loaded.tokenizer.pad_token_id or 0
    n = len(prompts)
    lengths = np.array([len(p) + len(r) for p, r in zip(prompts, responses)])
    width = head.weight.shape[1]
    sums, logps = np.zeros((n, width)), np.zeros(n)
    tokens = np.array([len(r) for r in responses])
    decoder = _decoder(model)
    offsets = np.r_[0, np.cumsum(tokens)]
    states = np.zeros((int(offsets[-1]), width), dtype=np.float32) if keep_states else None
    with torch.inference_mode():
        for batch in length_batches(lengths, batch_size, max_batch_tokens):
            longest = int(lengths[batch].max())
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            rows, cols, targets, owner = [], [], [], []
            for j, i in enumerate(batch):
                seq = list(prompts[i]) + list(responses[i])
                ids[j, :len(seq)] = torch.as_tensor(seq)
                mask[j, :len(seq)] = 1
                start = len(prompts[i])
                span = np.arange(start - 1, start - 1 + len(responses[i]))
                rows.append(np.full(len(span), j))
                cols.append(span)
                targets.append(responses[i])
                owner.append(np.full(len(span), i))
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device),
                             use_cache=False).last_hidden_state  # (B, T, d), after the norm
            rows_t = torch.as_tensor(np.concatenate(rows), device=device)
            cols_t = torch.as_tensor(np.concatenate(cols), device=device)
            picked = hidden[rows_t, cols_t]  # (R, d): every response token's scoring state
            target = torch.as_tensor(np.concatenate(targets), device=device)
            who = np.concatenate(owner)
            per_token = _response_logps(head, picked, target).cpu()
            np.add.at(sums, who, picked.double().cpu().numpy())
            if keep_states:  # each response's rows are contiguous and in token order here
                where = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in batch])
                states[where] = picked.float().cpu().numpy()
            np.add.at(logps, who, per_token.numpy())
            if progress is not None:
                progress(len(batch))
    out = {"sum": sums, "logp": logps, "tokens": tokens}
    if keep_states:
        out.update(states=states, offsets=offsets,
                   targets=np.concatenate([np.asarray(r, dtype=np.int64) for r in responses]))
    return out



def shared_prompt_features(loaded, prompts, chosen, rejected, *, batch_size: int = 16,
                           max_batch_tokens: int = SHARED_BATCH_TOKENS, progress=None,
                           keep_states: bool = False) -> dict[str, np.ndarray]:
    """:func:`response_features` of ``prompts * 2`` and ``chosen + rejected`` (rows
    ``0 … n−1`` the chosen responses, ``n … 2n−1`` the rejected ones), computed with
    each prompt read once: a pair is one row ``x + y_w + y_l`` (:mod:`llm_probes.packing`)
    when the model passes :func:`llm_probes.packing.supports_packing`, else two sequences.
    ``batch_size`` counts rows (pairs) here; ``progress(k)`` still counts responses."""
    from llm_probes.model import _decoder
    from llm_probes.packing import pack_pairs, packed_hidden, supports_packing
    from llm_probes.pair_dpo import _response_logps

    batch_size = check_integer("batch_size", batch_size, ge=1)
    max_batch_tokens = check_integer("max_batch_tokens", max_batch_tokens, ge=2)
    if not supports_packing(loaded.model):
        return response_features(loaded, list(prompts) * 2, list(chosen) + list(rejected),
                                 batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                 progress=progress, keep_states=keep_states)
    model, device = loaded.model, loaded.device
    head = model.get_output_embeddings()
    dtype = next(model.parameters()).dtype
    pad = loaded.tokenizer.pad_token_id or 0
    n = len(prompts)
    responses = list(chosen) + list(rejected)
    tokens = np.array([len(r) for r in responses])
    offsets = np.r_[0, np.cumsum(tokens)]
    width = head.weight.shape[1]
    sums = torch.zeros((2 * n, width), dtype=torch.float64)
    logps = torch.zeros(2 * n, dtype=torch.float64)
    states = np.zeros((int(offsets[-1]), width), dtype=np.float32) if keep_states else None
    lengths = np.array([len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)])
    decoder = _decoder(model)
    with torch.inference_mode():
        for batch in length_batches(lengths, batch_size, max_batch_tokens):
            pack = pack_pairs([prompts[i] for i in batch], [chosen[i] for i in batch],
                              [rejected[i] for i in batch], pad_id=pad, dtype=dtype)
            hidden = packed_hidden(decoder, pack, device)                  # (b, T, d)
            picked = hidden[torch.as_tensor(pack.rows, device=device),
                            torch.as_tensor(pack.cols, device=device)]     # (R, d)
            per_token = _response_logps(head, picked, torch.as_tensor(
                pack.targets, device=device)).cpu()
            k = len(batch)
            who = torch.as_tensor(np.where(pack.owner < k, 0, n) + batch[pack.owner % k])
            sums.index_add_(0, who, picked.double().cpu())
            logps.index_add_(0, who, per_token)
            if keep_states:  # the pack holds each pair's y_w then y_l, in token order
                where = np.concatenate([np.r_[np.arange(offsets[i], offsets[i + 1]),
                                              np.arange(offsets[n + i], offsets[n + i + 1])]
                                        for i in batch])
                states[where] = picked.float().cpu().numpy()
            if progress is not None:
                progress(2 * k)
    out = {"sum": sums.numpy(), "logp": logps.numpy(), "tokens": tokens}
    if keep_states:
        out.update(states=states, offsets=offsets,
                   targets=np.concatenate([np.asarray(r, dtype=np.int64) for r in responses]))
    return out


# ---------------------------------------------------------------------- the probe


def check_model(ctx) -> None:
    """``--pairs``: tokenize under the budgets (a response cut to nothing is refused,
    or skipped with ``--skip-bad``) before anything is written."""
    from llm_probes.pairs import tokenize_pairs

    args = ctx.args
    ctx.tokenized = tokenize_pairs(ctx.pairs, ctx.model.tokenizer,
                                   max_prompt_tokens=args.max_prompt_tokens,
                                   max_response_tokens=args.max_response_tokens,
                                   skip_bad=args.skip_bad)


def pair_statistics(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, float]:
    """Distinguishability of the chosen against the rejected responses' mean features
    ``(n, d)`` each: ``‖μ̂_w − μ̂_l‖`` and its debiased form (as for persona
    statements, :func:`llm_probes.features.feature_statistics`), concentration and
    trace (:func:`synthetic.statistics.behavior_statistics`)."""
    from synthetic.statistics import behavior_statistics

    n = len(chosen)
    x = torch.as_tensor(np.concatenate([chosen, rejected]))
    signs = np.r_[np.ones(n), -np.ones(n)]
    stats = behavior_statistics(x, signs, np.zeros(2 * n, dtype=np.int64), ["pairs"])
    row = stats.iloc[0]
    noise = (chosen.var(0, ddof=1).sum() + rejected.var(0, ddof=1).sum()) / n if n > 1 else 0.0
    return {"distinguishability": float(row["distinguishability"]),
            "distinguishability_debiased": float(np.sqrt(max(0.0, row["distinguishability"] ** 2
                                                             - noise))),
            "concentration": float(row["concentration"]), "trace": float(row["trace"])}


def run_pairs(ctx) -> list:
    """``features --pairs``: every response token's scoring state and ``log π`` per
    response; ``pair_features.parquet`` (one row per pair), ``pair_features.npz`` (the
    summed states, for later probes), ``pair_features_summary.json`` and the figure."""
    import json
    import sys
    import time

    import pandas as pd

    from dynamics.io import atomic_write, write_parquet
    from figures.probe_pairs import plot

    args = ctx.args
    check_integer("--batch-size", args.batch_size, ge=1)
    loaded, tok = ctx.model, ctx.tokenized
    f = tok.frame
    start = time.perf_counter()
    prompts = list(f.prompt_ids)
    every = shared_prompt_features(loaded, prompts, list(f.chosen_ids), list(f.rejected_ids),
                                   batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    n = len(f)
    counts = every["tokens"].astype(np.float64)[:, None]
    means = every["sum"] / counts
    chosen, rejected = means[:n], means[n:]
    norms = np.linalg.norm(chosen, axis=1) * np.linalg.norm(rejected, axis=1)
    table = pd.DataFrame({
        "line": f.line.to_numpy(), "prompt_tokens": f.prompt_ids.map(len).to_numpy(),
        "chosen_tokens": every["tokens"][:n], "rejected_tokens": every["tokens"][n:],
        "prompt_cut": f.prompt_cut.to_numpy(), "chosen_cut": f.chosen_cut.to_numpy(),
        "rejected_cut": f.rejected_cut.to_numpy(),
        "logp_chosen": every["logp"][:n], "logp_rejected": every["logp"][n:],
        "mean_distance": np.linalg.norm(chosen - rejected, axis=1),
        "mean_cosine": (chosen * rejected).sum(1) / np.where(norms > 0, norms, 1.0)})
    table["logp_margin"] = table.logp_chosen - table.logp_rejected
    summary = {"model": loaded.name, "fingerprint": loaded.fingerprint,
               "pairs": ctx.pairs.report(), "tokens": tok.report(), "dim": int(means.shape[1]),
               "reference_accuracy": float((table.logp_margin > 0).mean()),
               **pair_statistics(chosen, rejected), "extract_seconds": seconds,
               "note": "states after the final norm at the positions that score each response "
                       "token; prompts are the dialogue text as written (no chat template)"}
    out = ctx.out
    files = [write_parquet(out / "pair_features.parquet", table),
             atomic_write(out / "pair_features.npz", lambda p: _save_npz(
                 p, chosen_sum=every["sum"][:n], rejected_sum=every["sum"][n:],
                 chosen_tokens=every["tokens"][:n], rejected_tokens=every["tokens"][n:],
                 line=f.line.to_numpy())),
             atomic_write(out / "pair_features_summary.json",
                          lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))]
    files += plot(table, summary, out / "probe_pair_features")
    if ctx.progress:
        print(f"features: {n} pairs in {seconds:.1f} s; {tok.report()}; chosen vs rejected "
              f"distinguishability {summary['distinguishability']:.3f}", file=sys.stderr)
    return files


def _save_npz(path, **arrays) -> None:
    """``np.savez`` to exactly ``path`` (given a name, NumPy would append ``.npz``)."""
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
