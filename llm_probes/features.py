"""The ``features`` probe: ``g(x)`` of every persona statement, and its statistics.

``g(x)`` (THEORY §1) is the model's hidden state at the last prompt token *after*
the final norm: the vector ``lm_head`` multiplies. :func:`check_lm_head` measures
that ``lm_head(g)`` reproduces the model's own next-token logits.

**Cache.** Features are stored under ``cache_root()/features/<key>/`` with
``key = sha256(model fingerprint, prompt format, the prompts' text)``. Prompts
are sorted by token length (so a batch carries little padding) and cut into
chunks of ``chunk_size`` statements in that order; each chunk is one ``.npy``
written atomically (temporary file, then rename) as soon as it is computed, after
a ``manifest.json`` that fixes the order. An interrupted extraction therefore
keeps every finished chunk, and the same call again computes only the missing
ones. :func:`statement_features` caches per behavior, so a run on more
behaviors reuses those already extracted.

Shapes: ``N`` statements, ``d`` model width, ``B`` batch, ``T`` prompt tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dynamics.io import atomic_write, write_parquet
from dynamics.metrics import tie_half
from synthetic.statistics import behavior_statistics
from synthetic.validation import ParameterError, check_integer

__all__ = ["extract_features", "statement_features", "probe_features", "check_lm_head",
           "feature_key", "feature_statistics", "answer_rows", "add_arguments", "check_model",
           "add_feature_arguments", "check", "run", "CHUNK_SIZE", "CACHE_VERSION"]

CHUNK_SIZE = 256
"""Statements per cache chunk: an interruption loses at most one chunk of work."""
CACHE_VERSION = 1
LM_HEAD_STATEMENTS = 16
"""Statements on which :func:`check_lm_head` compares ``lm_head(g)`` with the logits."""


def _model_api():
    # Imported here: llm_probes.model imports transformers.
    from llm_probes import model

    return model


def _questions(statements) -> list[str]:
    """The prompt texts: a frame's ``question`` column, or a list of strings."""
    if isinstance(statements, pd.DataFrame):
        if "question" not in statements.columns:
            raise ParameterError("statements", list(statements.columns),
                                 "must have a 'question' column")
        return [str(q) for q in statements["question"]]
    questions = [str(q) for q in statements]
    return questions


def feature_key(loaded, questions: Sequence[str], prompt_format: str) -> str:
    """Cache key: sha256 over the model fingerprint, the prompt format and every prompt."""
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, loaded.fingerprint, prompt_format]).encode())
    for question in questions:
        encoded = question.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()[:24]


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    atomic_write(path, write, option="the feature cache (PREFDYN_CACHE)")


def _read_manifest(directory: Path, n: int) -> dict | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    order = manifest.get("order")
    if (manifest.get("version") != CACHE_VERSION or manifest.get("n") != n
            or not isinstance(order, list) or sorted(order) != list(range(n))):
        return None
    return manifest


def _load_chunk(path: Path, rows: int, dim: int | None) -> np.ndarray | None:
    """A chunk's features, or None if it is missing or unreadable (then recomputed)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if array.ndim != 2 or array.shape[0] != rows or (dim is not None and array.shape[1] != dim):
        return None
    return array


def extract_features(loaded, statements, *, prompt_format: str = "chat", batch_size: int = 32,
                     cache_dir: str | os.PathLike | None = None, progress: bool = True,
                     chunk_size: int = CHUNK_SIZE, desc: str | None = None) -> torch.Tensor:
    """``g(x)`` for every statement, ``(N, d)`` float32 on the CPU, in the given order.

    ``statements``: a frame with a ``question`` column, or the question strings.
    Cached under ``cache_dir`` (default ``cache_root()/features``) in chunks of
    ``chunk_size`` statements (see the module docstring); a chunk already cached
    is read, not computed. ``desc`` labels the progress bar.
    """
    api = _model_api()
    questions = _questions(statements)
    n = len(questions)
    if n == 0:
        raise ParameterError("statements", [], "must hold at least one statement")
    if prompt_format not in api.PROMPT_FORMATS:
        from synthetic.validation import check_choice

        check_choice("prompt_format", prompt_format, api.PROMPT_FORMATS)
    batch_size = check_integer("batch_size", batch_size, ge=1)
    chunk_size = check_integer("chunk_size", chunk_size, ge=1)
    root = Path(cache_dir) if cache_dir is not None else api.cache_root() / "features"
    directory = root / feature_key(loaded, questions, prompt_format)
    directory.mkdir(parents=True, exist_ok=True)

    manifest = _read_manifest(directory, n)
    chunks: dict[int, np.ndarray] = {}
    if manifest is not None:
        order = manifest["order"]
        size, dim = manifest["chunk_size"], manifest.get("dim")
        for c in range(math.ceil(n / size)):
            rows = len(order[c * size:(c + 1) * size])
            array = _load_chunk(directory / f"chunk-{c:05d}.npy", rows, dim)
            if array is not None:
                chunks[c] = array
        if len(chunks) == math.ceil(n / size):
            return _assemble(chunks, order, size, n)

    # Something to compute: tokenize everything once (left-padded to the longest).
    batch = api.prompt_batch(loaded, questions, prompt_format=prompt_format)
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (N, T), (N, T)
    lengths = mask.sum(1).cpu()  # (N,)
    if manifest is None:
        # Longest first: a memory problem shows at once; ties keep the given order.
        order = sorted(range(n), key=lambda i: (-int(lengths[i]), i))
        size, dim = chunk_size, None
        manifest = {"version": CACHE_VERSION, "n": n, "chunk_size": size, "order": order,
                    "model": loaded.name, "fingerprint": loaded.fingerprint,
                    "prompt_format": prompt_format}
        atomic_write(directory / "manifest.json", lambda p: p.write_text(json.dumps(manifest)))
    missing = [c for c in range(math.ceil(n / size)) if c not in chunks]
    total = sum(len(order[c * size:(c + 1) * size]) for c in missing)
    bar = _progress(total, progress, desc or f"features ({loaded.name})")
    try:
        for c in missing:
            rows = torch.as_tensor(order[c * size:(c + 1) * size])
            parts = []
            for start in range(0, len(rows), batch_size):
                idx = rows[start:start + batch_size]
                width = int(lengths[idx].max())  # left padding: the last `width` columns
                g = _final_hidden(api, loaded, ids[idx, -width:], mask[idx, -width:])  # (B, d)
                parts.append(g)
                bar.update(len(idx))
            array = torch.cat(parts).numpy()
            if not np.all(np.isfinite(array)):
                raise RuntimeError(f"non-finite features in chunk {c} of {directory}")
            if dim is None:
                dim = int(array.shape[1])
                manifest["dim"] = dim
                atomic_write(directory / "manifest.json",
                             lambda p: p.write_text(json.dumps(manifest)))
            _save_npy(directory / f"chunk-{c:05d}.npy", array)
            chunks[c] = array
    finally:
        bar.close()
    return _assemble(chunks, order, size, n)


def _final_hidden(api, loaded, input_ids, attention_mask) -> torch.Tensor:
    """One batch through :func:`llm_probes.model.final_hidden`, as float32 on the CPU."""
    device = loaded.device
    with torch.inference_mode():
        g = api.final_hidden(loaded, input_ids.to(device), attention_mask.to(device))
    return g.detach().float().cpu()


def _assemble(chunks: dict[int, np.ndarray], order: list[int], size: int,
              n: int) -> torch.Tensor:
    sorted_rows = np.concatenate([chunks[c] for c in range(math.ceil(n / size))])
    out = np.empty_like(sorted_rows)
    out[np.asarray(order)] = sorted_rows
    return torch.from_numpy(out)


class _NoBar:
    def update(self, _):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool, desc: str, unit: str = "stmt"):
    if not enabled or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)


def statement_features(loaded, statements: pd.DataFrame, *, prompt_format: str = "chat",
                       batch_size: int = 32, cache_dir=None, progress: bool = True,
                       chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """:func:`extract_features` of a statements frame, cached per behavior.

    Rows of the result follow ``statements``' rows, ``(N, d)``.
    """
    if "behavior" not in statements.columns:
        return extract_features(loaded, statements, prompt_format=prompt_format,
                                batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                                chunk_size=chunk_size)
    positions = np.arange(len(statements))
    out = None
    names = list(dict.fromkeys(statements["behavior"]))
    for i, name in enumerate(names):
        mask = (statements["behavior"] == name).to_numpy()
        g = extract_features(loaded, statements[mask], prompt_format=prompt_format,
                             batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                             chunk_size=chunk_size,
                             desc=f"features {i + 1}/{len(names)} {name[:28]}")
        if out is None:
            out = torch.empty(len(statements), g.shape[1], dtype=g.dtype)
        out[torch.as_tensor(positions[mask])] = g
    return out


def answer_rows(loaded, prompt_format: str = "chat") -> torch.Tensor:
    """The output layer's rows, reordered so that row 0 is ``Yes`` and row 1 is ``No``
    (the answer tokens after a ``prompt_format`` prompt; :data:`dynamics.model.YES`,
    ``NO``), then the rest of the vocabulary in token order: the reference ``W0`` of
    THEORY §1, ``(V, d)`` float32 on the CPU."""
    yes, no = _model_api().answer_ids(loaded, prompt_format)
    weight = loaded.model.get_output_embeddings().weight.detach().float().cpu()  # (V, d)
    others = torch.ones(weight.shape[0], dtype=torch.bool)
    others[[yes, no]] = False
    return torch.cat([weight[[yes, no]], weight[others]])


def check_lm_head(loaded, statements, n: int = LM_HEAD_STATEMENTS, *,
                  prompt_format: str = "chat") -> float:
    """``max |lm_head(g) − logits at the last position|`` over the first ``n`` statements.

    Both from one left-padded batch: ``g`` by :func:`llm_probes.model.final_hidden`,
    the logits by the model's own forward. 0 up to float32 rounding when ``g`` is the
    post-norm hidden state (applying the final norm twice moves logits by up to 25).
    """
    api = _model_api()
    questions = _questions(statements)[:check_integer("n", n, ge=1)]
    batch = api.prompt_batch(loaded, questions, prompt_format=prompt_format)
    with torch.inference_mode():
        logits = loaded.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]  # (n, V)
        g = api.final_hidden(loaded, batch["input_ids"], batch["attention_mask"],
                             batch.get("position_ids"))  # (n, d)
        mine = loaded.model.get_output_embeddings()(g)  # (n, V)
    return float((mine.float() - logits.float()).abs().max())


def feature_statistics(features: torch.Tensor, statements: pd.DataFrame, *,
                       reference: torch.Tensor | None = None) -> pd.DataFrame:
    """Per behavior, on the **train** split: ``n_pos, n_neg``, distinguishability
    ``‖μ̂⁺ − μ̂⁻‖``, concentration ``max‖Σ̂±‖_op``, trace ``max tr Σ̂±``, ``mean_norm``
    (:func:`synthetic.statistics.behavior_statistics`), ``distinguishability_debiased``
    ``√max(0, ‖μ̂⁺ − μ̂⁻‖² − tr Σ̂⁺/n⁺ − tr Σ̂⁻/n⁻)`` (an unbiased estimate of
    ``‖μ⁺ − μ⁻‖²`` under the root), and ``n_train, n_test``.

    With ``reference`` (:func:`answer_rows`, ``(V, d)``) also the reference model's
    own answers on the train split: ``reference_accuracy`` (share with
    ``log π0(y_w) > log π0(y_l)``), ``p_yes``, ``p_no`` (mean probabilities).
    """
    names = list(dict.fromkeys(statements["behavior"]))
    train = (statements["split"] == "train").to_numpy()
    beh = pd.Categorical(statements["behavior"], categories=names).codes
    x = features[torch.from_numpy(train.copy())]
    signs = statements["sign"].to_numpy()[train]
    for i, name in enumerate(names):
        groups = signs[beh[train] == i]
        if (groups > 0).sum() < 2 or (groups < 0).sum() < 2:
            raise ParameterError("--behaviors", name, "needs >= 2 train statements of each "
                                 f"answer (has {(groups > 0).sum()} Yes, {(groups < 0).sum()} "
                                 "No); raise --max-statements")
    stats = behavior_statistics(x.double(), signs, beh[train], names)
    # E‖μ̂⁺ − μ̂⁻‖² = ‖μ⁺ − μ⁻‖² + tr Σ⁺/n⁺ + tr Σ⁻/n⁻: the sample estimate is biased up
    # by the noise of the two means, which matters for n of a few hundred in d = 576.
    noise = np.zeros(len(names))
    xd = x.double().numpy()
    for i in range(len(names)):
        for sign in (1, -1):
            group = xd[(beh[train] == i) & (signs == sign)]
            noise[i] += group.var(axis=0, ddof=1).sum() / len(group)
    squared = stats["distinguishability"].to_numpy() ** 2 - noise
    stats["distinguishability_debiased"] = np.sqrt(np.clip(squared, 0.0, None))
    counts = statements.groupby(["behavior", "split"], observed=True).size().unstack(
        fill_value=0)
    stats["n_train"] = [int(counts.loc[b].get("train", 0)) for b in names]
    stats["n_test"] = [int(counts.loc[b].get("test", 0)) for b in names]
    if reference is not None:
        logp = torch.log_softmax(x.double() @ reference.double().T, dim=-1)  # (n, V)
        s = torch.as_tensor(signs, dtype=torch.float64)
        ranking = s * (logp[:, 0] - logp[:, 1])  # log π0(y_w) − log π0(y_l)
        frame = pd.DataFrame({"b": beh[train], "acc": tie_half(ranking).numpy(),
                              "p_yes": logp[:, 0].exp().numpy(),
                              "p_no": logp[:, 1].exp().numpy()})
        means = frame.groupby("b").mean()
        stats["reference_accuracy"] = means["acc"].to_numpy()
        stats["p_yes"] = means["p_yes"].to_numpy()
        stats["p_no"] = means["p_no"].to_numpy()
    return stats


# ---------------------------------------------------------------------- the probe
def add_feature_arguments(parser) -> None:
    """Options of feature extraction, shared by every probe that needs features."""
    formats = _model_api().PROMPT_FORMATS
    group = parser.add_argument_group("features")
    group.add_argument("--prompt-format", choices=list(formats), default="chat",
                       help="how a statement becomes a prompt: " + "; ".join(
                           f"{k}: {v}" for k, v in formats.items()) + " (default: chat)")
    group.add_argument("--batch-size", type=int, default=32,
                       help="prompts per forward pass (default: 32)")


def add_arguments(parser) -> None:
    add_feature_arguments(parser)
    parser.add_argument("--check-statements", type=int, default=LM_HEAD_STATEMENTS,
                        metavar="N", help="statements on which lm_head(g) is compared with "
                        f"the model's logits (default: {LM_HEAD_STATEMENTS})")


def check(args) -> None:
    """Validate the probe's options (one-line ParameterError naming the option)."""
    check_integer("--batch-size", args.batch_size, ge=1)
    check_integer("--check-statements", args.check_statements, ge=1)


def check_model(ctx) -> None:
    """With ``--pairs``: tokenize them under the budgets before anything is written."""
    if ctx.pairs is not None:
        from llm_probes.pair_features import check_model as check_pairs

        check_pairs(ctx)


def probe_features(ctx) -> tuple[torch.Tensor, float]:
    """The features of a probe's statements (:func:`statement_features`, cached, with
    its ``--prompt-format`` and ``--batch-size``) and the seconds they took."""
    args = ctx.args
    start = time.perf_counter()
    features = statement_features(ctx.model, ctx.statements, prompt_format=args.prompt_format,
                                  batch_size=args.batch_size, progress=ctx.progress)
    return features, time.perf_counter() - start


def run(ctx) -> list[Path]:
    """Features of every statement (cached), the lm_head check, per-behavior
    statistics: ``features_stats.parquet`` (one row per behavior),
    ``features_summary.json`` and the figure ``probe_features.png``/``.pdf``."""
    from figures.probe_features import plot

    if ctx.pairs is not None:  # multi-token preference pairs (issue 14)
        from llm_probes.pair_features import run_pairs

        return run_pairs(ctx)
    args = ctx.args
    check(args)
    loaded = ctx.model
    features, seconds = probe_features(ctx)
    lm_head_diff = check_lm_head(loaded, ctx.statements, args.check_statements,
                                 prompt_format=args.prompt_format)
    stats = feature_statistics(features, ctx.statements,
                               reference=answer_rows(loaded, args.prompt_format))
    stats.insert(0, "model", loaded.name)
    stats.insert(1, "prompt_format", args.prompt_format)
    summary = {
        "model": loaded.name, "fingerprint": loaded.fingerprint,
        "prompt_format": args.prompt_format, "statements": int(len(ctx.statements)),
        "dim": int(features.shape[1]),
        "lm_head_max_abs_diff": lm_head_diff,
        "lm_head_statements": int(min(args.check_statements, len(ctx.statements))),
        "mean_feature_norm": float(features.norm(dim=1).mean()),
        "extract_seconds": seconds,
        "note": "extract_seconds includes cache reads; a fully cached run does no forward",
    }
    out = ctx.out
    files = [
        write_parquet(out / "features_stats.parquet", stats),
        atomic_write(out / "features_summary.json",
                     lambda p: p.write_text(json.dumps(summary, indent=2) + "\n")),
    ]
    files += plot(stats, out / "probe_features", lm_head_diff=lm_head_diff)
    if ctx.progress:
        print(f"features: {len(ctx.statements)} statements in {seconds:.1f} s; "
              f"max |lm_head(g) - logits| = {lm_head_diff:.2e}", file=sys.stderr)
    return files
