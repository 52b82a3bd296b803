#!/usr/bin/env python
"""Cost of the real-LLM probes (``llm_probes/``) on this machine, as ratios measured in one run.

    python benchmarks/bench_probes.py            # full mode (about 8.5 min on a quiet 2-core CPU)
    python benchmarks/bench_probes.py --quick    # smoke mode (< 2 min)
    python benchmarks/bench_probes.py --device cuda

The default model (SmolLM2-135M-Instruct, ``load_model(None)``) on real persona statements
(``load_statements``, ``--persona-dir``, default ``$PREFDYN_PERSONA_DIR`` or
``../shared/data/persona`` beside the repository). Two headline ratios and one absolute:

1. ``extract_gemm_fraction``: ``llm_probes.features.extract_features`` (a fresh temporary
   ``cache_dir`` per call, so every call computes) at batch sizes 16, 32, 64, as a
   fraction of the float32 ``torch.matmul`` rate of large square matrices measured in the
   same rounds (best of 5, same thread count). FLOPs counted: ``2 × (non-embedding
   parameters)`` per *real* (non-padding) token; non-embedding = every parameter except
   the input embedding and the (untied) output layer, told apart by parameter identity.
   Attention scores, norms and padding are in the time, not in the count. Headline: the
   library's default batch size, 32. Also printed: the fraction against the rate of the
   decoder layer's own GEMMs (``F.linear`` of (M, 576) by the q/k/v/o/gate/up/down weight
   shapes, M = rows of one forward), and tokens/s.
2. ``dpo_speedup_vs_trl``: one full-fine-tuning DPO step of ours (``llm_probes.training``,
   ``completion="token+eos"``: the objective TRL's ``DPOTrainer`` computes for plain
   strings) against TRL's ``DPOTrainer`` on the same 8 statements (one batch of 8), same
   model, AdamW, lr 1e-5, β 0.1, weight decay 0, constant schedule, no warm-up, no
   clipping, no dropout, float32. Ours is ``train_dpo`` itself, as users call it, with a
   time stamp after each step (a transparent wrapper around ``training.statement_metrics``,
   which ``train_dpo`` calls once a step for the batch's metrics); TRL's steps are stamped
   by ``on_step_end`` callbacks. Seconds per step, both sides = time from the end of step 1
   (warm-up) to the end of step 6, / 5. ``train_dpo``'s per-step batch losses are compared
   with TRL's (first 5 steps, target max |Δ| ≤ 1e-4). TRL runs in two configurations:
   ``precompute_ref_log_probs=True`` (reference computed once, as ours: **the headline**,
   the stricter comparison) and its default (a reference forward every step). Runs
   alternate in 2 rounds, each on a fresh copy of the model; speed-up = TRL seconds per
   step / ours, best run against best run (the median ratio is printed beside it).
   Our time with ``completion="token"`` (the probes' default) is printed for information.
3. Peak memory of full fine-tuning the default model (target ≤ 4 GB): a fresh subprocess
   loads the model and runs ``train_dpo`` (full, AdamW, batch 8, the probe's defaults)
   for a few steps; ``llm_probes.training.peak_memory()`` (VmHWM of that process; on CUDA
   also torch's allocator peak).

4. ``pairs_extract_gemm_fraction``: ``llm_probes.pair_features.shared_prompt_features``
   (what the pair probes call: each pair one row ``x + y_w + y_l``, the prompt read once,
   rows length-bucketed and right-padded) on HH-RLHF pairs (``--pairs``; 128, 32 with
   ``--quick``; budgets 128 prompt / 64 response tokens). FLOPs counted on the tokens
   the answer needs, ``P + C + R`` a pair (a prompt counts once: reading it twice is
   not work the answer needs): ``2 × non-embedding`` per token plus ``2 × output-layer
   parameters`` per response token (the log-softmax rows); against the square matmul
   rate as in 1 (the layer-GEMM rate printed beside it). Also timed, for the speed-up of
   reading the prompt once: ``response_features`` on the ``2n`` sequences ``x + y``.
5. ``pairs_dpo_speedup_vs_trl``: one full-fine-tuning multi-token DPO step of ours
   (``llm_probes.pair_dpo.train_pair_dpo``: the prompt read once per pair, see
   :mod:`llm_probes.packing`) against TRL's ``DPOTrainer`` with
   ``precompute_ref_log_probs=True`` on the same 8 pairs (budgets 64 / 32 tokens) as one
   batch, same settings as 2. Both train on the same token ids: TRL's dataset preparation
   (which would tokenize prompt + completion together and append EOS) is bypassed by
   handing it ``prompt_ids``/``chosen_ids``/``rejected_ids``. Ours is stamped each time
   ``train_pair_dpo`` draws a batch, TRL's by ``on_step_end``; losses compared step by step.
   As in 2: rounds of runs (2, 1 with ``--quick``) in alternating order, each on a fresh
   copy of the model; the headline is best run / best run (the median ratio printed).

TRL settings that differ from TRL's defaults, and why: ``bf16=False`` (ours is float32;
the losses must agree), ``gradient_checkpointing=False`` (TRL's default recomputes the
forward; turning it off makes TRL faster, so the comparison is stricter),
``max_grad_norm=0`` (no clipping, as ours), ``lr_scheduler_type="constant"``,
``train_sampling_strategy="sequential"`` over the 8 statements repeated once per step
(every step sees the same batch in the same order, with no per-epoch overhead),
``report_to="none"``, ``save_strategy="no"``, ``logging_strategy="no"``. TRL keeps its
default optimiser, ``adamw_torch_fused`` (``train_dpo`` uses the same fused kernel). TRL is
optional: without it (``pip install trl``) ``dpo_speedup_vs_trl=nan``.

The last line printed is ``bench_probes: extract_gemm_fraction=F dpo_speedup_vs_trl=S
pairs_extract_gemm_fraction=F pairs_dpo_speedup_vs_trl=S`` (``--only`` skips sections;
their keys print ``nan``).
Only the library's public functions are timed, and nothing here changes what they compute
(the per-step stamp wraps ``statement_metrics`` for the length of one ``train_dpo`` call
and returns its values untouched). Timed tasks wait for a quiet machine first, and every
table says how much of the machine other processes took meanwhile. The script does
not call ``torch.set_num_threads`` unless ``--threads`` asks; it prints the thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from timing import (  # noqa: E402
    Contention, Others, Quiet, best_of, fmt_t, heading, no_stderr, now, sig, table,
)

TARGETS = {"extract_gemm_fraction": 0.6, "dpo_speedup_vs_trl": 2.0, "peak_memory_gb": 4.0,
           "loss_max_abs_diff": 1e-4, "pairs_extract_gemm_fraction": 0.6,
           "pairs_dpo_speedup_vs_trl": 2.0}
BEHAVIORS = ("agreeableness", "narcissism", "conscientiousness", "risk-averse")
DPO_LR, DPO_BETA, DPO_BATCH = 1e-5, 0.1, 8  # the probe's defaults for full + AdamW
NEVER = 10**9  # eval_every beyond the last step
TRL_INSTALL = f"{sys.executable} -m pip install trl"


# ----------------------------------------------------------------------------- timing helpers

DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


QUIET = Quiet(0.0)


@contextlib.contextmanager
def quiet_libraries():
    """Silence transformers / datasets / TRL info logs, progress bars and warnings."""
    old_tqdm = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from transformers.utils import logging as hf_logging

            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            hf_logging = None
        try:
            import datasets

            datasets.disable_progress_bars()
            datasets.logging.set_verbosity_error()
        except ImportError:
            pass
        try:
            yield
        finally:
            if hf_logging is not None:
                hf_logging.set_verbosity(level)
            if old_tqdm is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = old_tqdm


# ----------------------------------------------------------------------------- model facts

def parameter_counts(model) -> dict:
    """Total, input embedding, output layer and non-embedding parameters, each Parameter
    counted once (by identity: a tied output layer is the embedding, not a second one)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    unique = {id(p): p for p in model.parameters()}
    excluded = {id(embed), id(head)}
    non_embedding = sum(p.numel() for k, p in unique.items() if k not in excluded)
    return {"total": sum(p.numel() for p in unique.values()), "embedding": embed.numel(),
            "head": head.numel() if head is not embed else 0, "tied": head is embed,
            "non_embedding": non_embedding}


def layer_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of every Linear in one decoder layer (q, k, v, o, gate, up, down)."""
    layer = model.get_decoder().layers[0]
    return [(m.in_features, m.out_features) for m in layer.modules()
            if isinstance(m, torch.nn.Linear)]


def square_gemm(size: int):
    a = torch.randn(size, size, device=DEVICE)
    b = torch.randn(size, size, device=DEVICE)
    a @ b
    sync()
    flops = 2 * size**3
    return lambda: flops / best_of(lambda: a @ b, 5, sync)


def layer_gemm(rows: int, shapes: list[tuple[int, int]]):
    """The GEMMs of one decoder layer at ``rows`` tokens: ``F.linear`` as nn.Linear calls it."""
    x = {k: torch.randn(rows, k, device=DEVICE) for k in {i for i, _ in shapes}}
    ws = [torch.randn(o, i, device=DEVICE) for i, o in shapes]
    flops = sum(2 * rows * i * o for i, o in shapes)

    def run():
        for (i, _), w in zip(shapes, ws):
            torch.nn.functional.linear(x[i], w)

    run()
    sync()
    return lambda: flops / best_of(run, 5, sync)


# ----------------------------------------------------------------------------- 0. machine

def machine(args, loaded, counts) -> dict:
    size = 1024 if args.quick else 2048
    rate = square_gemm(size)
    rates = []
    for _ in range(2):
        QUIET()
        rates.append(rate())
    peak = max(rates)
    print("=" * 78)
    print("bench_probes: cost of the real-LLM probes" + (" [--quick]" if args.quick else ""))
    print("=" * 78)
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl "
          f"{trl_version}, python {platform.python_version()}, {os.cpu_count()} CPUs; "
          f"device {DEVICE}")
    how = "default, not changed" if args.threads is None else "set by --threads"
    print(f"torch.get_num_threads() = {torch.get_num_threads()} ({how}), "
          f"interop threads = {torch.get_num_interop_threads()}")
    attn = getattr(loaded.model.config, "_attn_implementation", "?")
    print(f"model {loaded.name} ({type(loaded.model).__name__}, attention {attn}): "
          f"{counts['total'] / 1e6:.1f} M parameters = input embedding "
          f"{counts['embedding'] / 1e6:.1f} M + output layer {counts['head'] / 1e6:.1f} M"
          f"{' (tied)' if counts['tied'] else ' (untied copy)'} + non-embedding "
          f"{counts['non_embedding'] / 1e6:.1f} M")
    print(f"float32 matmul {size}x{size}x{size}: {peak / 1e9:.1f} GFLOP/s (best of 5, "
          f"twice: {', '.join(f'{r / 1e9:.1f}' for r in rates)}; measured again in section "
          f"1's rounds, where the best of all is the reference)")
    print("Timings: 'best' = best-of-N (interference only adds time), 'med' = median.")
    return {"peak": peak, "square": rate, "size": size}


# ----------------------------------------------------------------------------- 1. extraction

def extraction_section(args, loaded, counts, env) -> float:
    from llm_probes.features import extract_features
    from llm_probes.model import prompt_batch
    from llm_probes.persona import load_statements

    heading("1. extract_gemm_fraction: llm_probes.features.extract_features on persona prompts")
    per = 12 if args.quick else 32
    behaviors = args.behaviors[:2] if args.quick else args.behaviors
    statements = load_statements(args.persona_dir, behaviors, max_per_behavior=per)
    questions = statements["question"].tolist()
    sizes = [16, 32] if args.quick else [16, 32, 64]
    rounds = 1 if args.quick else 3
    mask = prompt_batch(loaded, questions)["attention_mask"].cpu()  # (N, T)
    lengths = mask.sum(1)
    real = int(lengths.sum())
    flops = 2 * counts["non_embedding"] * real
    # Rows each forward computes at batch size b: extract_features sorts by length
    # (longest first) and pads a batch to its longest prompt.
    order = torch.sort(lengths, descending=True, stable=True).values
    padded = {b: int(sum(int(order[i]) * len(order[i:i + b]) for i in range(0, len(order), b)))
              for b in sizes}
    batches = {b: math.ceil(len(order) / b) for b in sizes}
    print(f"{len(questions)} statements ({', '.join(behaviors)}; {per} each), chat prompts of "
          f"{int(lengths.min())}-{int(lengths.max())} tokens (mean {lengths.float().mean():.1f}); "
          f"{real} real tokens.\nFLOPs counted: 2 x {counts['non_embedding'] / 1e6:.1f} M "
          f"non-embedding parameters per real token = {flops / 1e12:.2f} TFLOP per pass. "
          f"Each call gets a fresh\ntemporary cache_dir, so it tokenizes, runs every batch and "
          f"writes its .npy chunk (all in the time).")
    shapes = layer_shapes(loaded.model)
    layer_rates = {b: layer_gemm(max(1, padded[b] // batches[b]), shapes) for b in sizes}
    times = {b: [] for b in sizes}
    others = {b: [] for b in sizes}
    square, layer = [], {b: [] for b in sizes}
    with tempfile.TemporaryDirectory(prefix="bench_probes_") as tmp:
        def extract(b, tag):
            directory = Path(tmp) / f"{tag}-{b}"
            QUIET()
            with Others() as o:
                sync()
                t0 = now()
                g = extract_features(loaded, questions, batch_size=b, cache_dir=directory,
                                     progress=False)
                sync()
                dt = now() - t0
            if g.shape[0] != len(questions):
                raise RuntimeError(f"extract_features returned {g.shape[0]} rows for "
                                   f"{len(questions)} statements")
            others[b].append(o.share)
            return dt

        # Warm-up (allocator, kernels, tokenizer) on one batch of the longest prompts.
        longest = torch.argsort(lengths, descending=True)[:sizes[0]].tolist()
        extract_features(loaded, [questions[i] for i in longest], batch_size=sizes[0],
                         cache_dir=Path(tmp) / "warm", progress=False)
        for r in range(rounds):
            for b in (sizes if r % 2 == 0 else sizes[::-1]):
                times[b].append(extract(b, f"r{r}"))
                layer[b].append(layer_rates[b]())
            QUIET()
            square.append(env["square"]())
    peak = max(square + [env["peak"]])
    rows, fractions = [], {}
    for b in sizes:
        best, med = min(times[b]), float(np.median(times[b]))
        rate = flops / best
        lrate = max(layer[b])
        fractions[b] = rate / peak
        busy = others[b][int(np.argmin(times[b]))]
        rows.append([b, batches[b], f"{padded[b] / real - 1:.1%}", fmt_t(best), fmt_t(med),
                     f"{busy:.0%}", f"{real / best:.0f}", f"{rate / 1e9:.1f}",
                     f"{lrate / 1e9:.1f}", f"{rate / lrate:.2f}", f"{rate / peak:.2f}"])
    table("extract_features, per pass over all statements (GFLOP/s counted as above)",
          ["batch", "forwards", "padding", "best", "med", "others", "tokens/s", "GFLOP/s",
           "layer GEMM", "vs layer", "vs square"], rows,
          f"vs square = GFLOP/s / float32 matmul {env['size']}^3 at {peak / 1e9:.1f} GFLOP/s "
          f"(best in the same rounds): the headline.\nlayer GEMM = F.linear of (M, in) by "
          f"the layer's {len(shapes)} weights {sorted(set(shapes))}, M = mean padded "
          f"rows of one forward;\nvs layer = GFLOP/s / that rate. padding = extra (pad) "
          f"tokens computed / real tokens. others = share of the machine other\nprocesses "
          f"took during the best pass (> 15%: not comparable).")
    default = inspect.signature(extract_features).parameters["batch_size"].default
    head = default if default in fractions else min(fractions, key=lambda b: abs(b - default))
    if not args.quick:
        profile_forward(loaded, questions, lengths, head, counts, peak)
    print(f"\nHeadline (batch {head}; extract_features' default is {default}): "
          f"extract_gemm_fraction = "
          f"{fractions[head]:.2f} (target >= {TARGETS['extract_gemm_fraction']}).")
    return fractions[head]


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile_forward(loaded, questions, lengths, batch: int, counts, peak: float) -> None:
    """Where one forward of extract_features' first batch spends its time (torch.profiler):
    the decoder as ``final_hidden`` runs it, on the ``batch`` longest prompts."""
    from torch.profiler import ProfilerActivity, profile

    from llm_probes.model import final_hidden, prompt_batch

    longest = torch.argsort(lengths, descending=True)[:batch].tolist()
    inputs = prompt_batch(loaded, [questions[i] for i in longest])
    real = int(inputs["attention_mask"].sum())
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda"
                                           else [])
    with torch.inference_mode():
        final_hidden(loaded, inputs["input_ids"], inputs["attention_mask"])
        QUIET()
        with no_stderr(), profile(activities=activities) as prof:  # kineto prints to fd 2
            final_hidden(loaded, inputs["input_ids"], inputs["attention_mask"])
            sync()
    events = prof.key_averages()
    attr = "self_device_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    parts: dict[str, float] = {}
    for e in events:
        key = ("GEMM (mm/addmm/bmm)" if e.key in GEMM_OPS else
               "attention (sdpa)" if "scaled_dot_product" in e.key or "attention" in e.key else
               "copies (copy_/cat/index/to)" if e.key in ("aten::copy_", "aten::cat",
                                                          "aten::index", "aten::_to_copy",
                                                          "aten::index_select") else
               "elementwise (mul/add/pow/neg/silu/mean/rsqrt/...)")
        parts[key] = parts.get(key, 0.0) + getattr(e, attr)
    gemm_s = parts.get("GEMM (mm/addmm/bmm)", 0.0) / 1e6
    rows_computed = int(inputs["input_ids"].numel())  # the GEMMs run on pads too
    flops = 2 * counts["non_embedding"] * rows_computed
    rows = [[k, f"{v / total:.0%}", fmt_t(v / 1e6)] for k, v in
            sorted(parts.items(), key=lambda kv: -kv[1])]
    table(f"torch.profiler split of one final_hidden forward, batch of the {batch} longest "
          f"prompts ({inputs['input_ids'].shape[1]} tokens wide, {real} real tokens)",
          ["op group", "share", "self time"], rows,
          f"GEMM ops alone: 2 x non-embedding parameters x {rows_computed} rows (pads "
          f"included) in their self time = {flops / max(gemm_s, 1e-9) / 1e9:.1f} GFLOP/s\n"
          f"= {flops / max(gemm_s, 1e-9) / peak:.2f} of the square matmul; the other op groups "
          f"and the pads are the rest of the gap.")


# ----------------------------------------------------------------------------- 2. DPO vs TRL

def dpo_statements(args):
    """8 statements (4 of each of 2 behaviors, both signs), every one in the train split."""
    from llm_probes.persona import load_statements

    statements = load_statements(args.persona_dir, list(args.behaviors[:2]),
                                 max_per_behavior=DPO_BATCH // 2)
    statements = statements.copy()
    statements["split"] = "train"
    return statements.reset_index(drop=True)


def batch_losses(frame) -> list[float]:
    """Per step, the loss of the training batch before its update (n-weighted over
    behaviors) from ``train_dpo``'s tidy table."""
    rows = frame[frame["source"] == "batch"]
    out = []
    for _, g in rows.groupby("step", sort=True):
        out.append(float((g["loss"] * g["n"]).sum() / g["n"].sum()))
    return out


def our_setup(loaded, statements, completion: str) -> dict:
    """``preference_data`` and the reference log-probabilities, computed once (timed)."""
    from llm_probes.logprobs import evaluate, preference_data

    data = preference_data(loaded, statements, completion=completion)
    QUIET()
    sync()
    t0 = now()
    ref = evaluate(loaded.model, data, np.arange(len(data.prompts)), batch_size=32).logps
    sync()
    return {"data": data, "ref": ref, "ref_s": now() - t0}


def our_run(loaded, setup: dict, steps: int) -> dict:
    """One ``train_dpo`` call on a fresh full policy, with a time stamp after every step.

    ``train_dpo`` calls ``training.statement_metrics`` once after each optimiser step (to
    record the batch's metrics), once for the step-0 row and once in the final
    evaluation; a transparent wrapper stamps the time after each of those calls, so the
    intervals between the stamps of steps 1..S are whole steps of ``train_dpo`` itself."""
    from llm_probes import training

    config = training.train_config(steps=steps, lr=DPO_LR, beta=DPO_BETA,
                                   batch_size=DPO_BATCH, optimizer="adamw", eval_every=NEVER,
                                   eval_batch_size=32, seed=0)
    policy = training.prepare_policy(loaded, "full", copy_model=True)
    stamps: list[float] = []
    original = training.statement_metrics

    def stamped(*args, **kwargs):
        values = original(*args, **kwargs)
        sync()
        stamps.append(now())
        return values

    QUIET()
    training.statement_metrics = stamped  # the name train_dpo looks up
    try:
        with Others() as others:
            sync()
            t0 = now()
            frame = training.train_dpo(policy, setup["data"], setup["ref"], config,
                                       start=setup["ref"])
            sync()
            seconds = now() - t0
    finally:
        training.statement_metrics = original
    del policy
    gc.collect()
    if len(stamps) != steps + 2:
        raise RuntimeError(f"train_dpo called statement_metrics {len(stamps)} times for "
                           f"{steps} steps, not {steps + 2}: the per-step stamps of this "
                           f"benchmark no longer fit train_dpo; update our_run")
    after_step = np.array(stamps[1:steps + 1])  # after step 1 .. after step S
    return {"step_times": np.diff(after_step), "losses": batch_losses(frame),
            "seconds": seconds, "others": others.share}


def record_losses(trainer) -> list[float]:
    """The list a TRL trainer's ``compute_loss`` appends each step's loss to, from now on."""
    losses, compute_loss = [], trainer.compute_loss

    def recording(model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = compute_loss(model, inputs, return_outputs, num_items_in_batch)
        value = loss[0] if isinstance(loss, tuple) else loss
        losses.append(float(value.detach()))
        return loss

    trainer.compute_loss = recording
    return losses


def trl_run(loaded, statements, steps: int, precompute: bool) -> dict:
    """TRL's DPOTrainer on the same statements; per-step losses and times."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from llm_probes.model import prompt_batch, prompt_texts

    tok = loaded.tokenizer
    questions = statements["question"].tolist()
    texts = prompt_texts(tok, questions, loaded.prompt_format)
    yes, no = tok.decode([loaded.yes_id]), tok.decode([loaded.no_id])
    pairs = [{"prompt": t, "chosen": yes if s > 0 else no, "rejected": no if s > 0 else yes}
             for t, s in zip(texts, statements["sign"])]
    dataset = Dataset.from_list(pairs * steps)  # one pass = `steps` identical batches

    class Clock(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, *_a, **_k):
            sync()
            self.begin.append(now())

        def on_step_end(self, *_a, **_k):
            sync()
            self.end.append(now())

    with tempfile.TemporaryDirectory(prefix="bench_probes_trl_") as out, quiet_libraries():
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=DPO_BATCH, max_steps=steps,
            learning_rate=DPO_LR, beta=DPO_BETA, weight_decay=0.0,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
            bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True,
            precompute_ref_log_probs=precompute, max_length=None,
            train_sampling_strategy="sequential", dataloader_num_workers=0,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            use_cpu=DEVICE.type == "cpu", seed=0)
        policy = copy.deepcopy(loaded.model)
        reference = None if precompute else copy.deepcopy(loaded.model)
        t0 = now()
        trainer = DPOTrainer(model=policy, ref_model=reference, args=config,
                             train_dataset=dataset, processing_class=tok)
        init_s = now() - t0
        # Tokenization check: the prompt ids must be ours, the completions answer + EOS.
        ids = prompt_batch(loaded, questions)
        rows = trainer.train_dataset.select(range(len(questions)))
        same_prompt, same_answer = 0, 0
        for i, (row, s) in enumerate(zip(rows, statements["sign"])):
            mine = ids["input_ids"][i][ids["attention_mask"][i].bool()].tolist()
            same_prompt += row["prompt_ids"] == mine
            w, lo = (loaded.yes_id, loaded.no_id) if s > 0 else (loaded.no_id, loaded.yes_id)
            same_answer += (row["chosen_ids"] == [w, tok.eos_token_id]
                            and row["rejected_ids"] == [lo, tok.eos_token_id])
        losses = record_losses(trainer)
        clock = Clock()
        trainer.add_callback(clock)
        QUIET()
        t0 = now()
        with contextlib.redirect_stdout(io.StringIO()), Others() as others:  # it prints
            trainer.train()
        train_s = now() - t0
        optim = str(getattr(config.optim, "value", config.optim))
        del trainer, policy, reference
    intervals = np.diff(np.array(clock.end))  # step k end -> step k+1 end: everything per step
    bodies = np.array(clock.end) - np.array(clock.begin)
    return {"losses": losses, "step_times": intervals, "bodies": bodies[1:], "init_s": init_s,
            "train_s": train_s, "same_prompt": same_prompt, "same_answer": same_answer,
            "n": len(questions), "optim": optim, "precompute": precompute,
            "others": others.share}


def alternating_rounds(tasks: dict, rounds: int) -> dict[str, list[dict]]:
    """Run each task once a round, the order reversed every other round; a task that
    raises is reported in one line and not run again (its list keeps what it measured)."""
    runs: dict[str, list[dict]] = {name: [] for name in tasks}
    failed: set[str] = set()
    names = list(tasks)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            if name in failed:
                continue
            try:
                runs[name].append(tasks[name]())
            except Exception as err:  # noqa: BLE001 - report, never crash the benchmark
                text = str(err).strip()
                print(f"\n{name} failed: {type(err).__name__}: "
                      f"{text.splitlines()[0] if text else ''}")
                failed.add(name)
            gc.collect()
    return runs


def dpo_section(args, loaded) -> tuple[float, list]:
    heading("2. dpo_speedup_vs_trl: one full fine-tuning DPO step, ours vs TRL's DPOTrainer")
    statements = dpo_statements(args)
    steps = 3 if args.quick else 6  # per run: 1 warm-up step + timed steps
    rounds = 1 if args.quick else 2
    compare = min(5, steps)
    print(f"{len(statements)} statements ({', '.join(statements['behavior'].unique())}; "
          f"signs {statements['sign'].tolist()}), one batch of {DPO_BATCH}; full fine-tuning, "
          f"AdamW lr {DPO_LR:g}, beta {DPO_BETA:g}.\n{rounds} round(s) of runs, order "
          f"alternating; each run a fresh copy of the model, {steps} steps, the first a "
          f"warm-up.")
    notes = []
    completions = ("token+eos",) if args.quick else ("token+eos", "token")
    setups = {c: our_setup(loaded, statements, c) for c in completions}
    try:
        import trl  # noqa: F401
        have_trl = True
    except ImportError:
        have_trl = False
        print(f"\nTRL is not installed: dpo_speedup_vs_trl = nan. Install it with\n  "
              f"{TRL_INSTALL}")
    tasks = {"ours": lambda: our_run(loaded, setups["token+eos"], steps)}
    if "token" in setups:
        tasks["ours token"] = lambda: our_run(loaded, setups["token"], steps)
    if have_trl:
        tasks["trl precomputed"] = lambda: trl_run(loaded, statements, steps, True)
        if not args.quick:
            tasks["trl default"] = lambda: trl_run(loaded, statements, steps, False)
    runs = alternating_rounds(tasks, rounds)
    for results in runs.values():
        for result in results:
            result["per_step"] = float(result["step_times"].mean())
    if not runs["ours"]:
        print("\nHeadline: dpo_speedup_vs_trl = nan (our own runs failed).")
        return float("nan"), notes
    per_step = {name: np.array([x["per_step"] for x in v]) for name, v in runs.items() if v}
    best = {name: float(t.min()) for name, t in per_step.items()}
    med = {name: float(np.median(t)) for name, t in per_step.items()}
    labels = {"ours": "ours token+eos: train_dpo",
              "ours token": "ours token (the probes' default; information)",
              "trl precomputed": "TRL precompute_ref_log_probs=True (headline)",
              "trl default": "TRL default (reference forward every step)"}
    rows = []
    for name, t in per_step.items():
        single = fmt_t(float(np.concatenate([x["step_times"] for x in runs[name]]).min()))
        others = runs[name][int(np.argmin(t))]["others"]
        rows.append([labels[name], fmt_t(best[name]), fmt_t(med[name]), len(t), single,
                     f"{others:.0%}", f"{best[name] / best['ours']:.2f}x",
                     f"{med[name] / med['ours']:.2f}x"])
    table(f"Seconds per step: mean over the {steps - 1} timed steps of a run; best and median "
          f"over runs", ["", "best run", "med run", "runs", "best step", "others",
                         "speed-up (best)", "speed-up (med)"], rows,
          f"Both sides: the time from the end of step 1 to the end of step {steps} / "
          f"{steps - 1}, i.e. whole steps (data, forward, backward,\noptimiser, per-step "
          f"metrics). Ours: train_dpo(eval_every={NEVER:.0e}), stamped after each step's "
          f"batch metrics; TRL: on_step_end callbacks.\nspeed-up = that row / ours "
          f"token+eos. others = share of the machine other processes took during the best "
          f"run (> 15%: not comparable).")
    ours_losses = runs["ours"][0]["losses"][:compare]
    loss_rows, gaps = [], {}
    trl_names = [n for n in ("trl precomputed", "trl default") if runs.get(n)]
    for k in range(compare):
        row = [k + 1, f"{ours_losses[k]:.7f}"]
        for name in trl_names:
            value = runs[name][0]["losses"][k]
            row.append(f"{value:.7f}")
            gaps.setdefault(name, []).append(abs(value - ours_losses[k]))
        loss_rows.append(row)
    table(f"Per-step loss (the batch's loss before update k), first {compare} steps",
          ["step", "ours (train_dpo)"] + trl_names, loss_rows)
    for name, g in gaps.items():
        status = "met" if max(g) <= TARGETS["loss_max_abs_diff"] else "NOT met"
        print(f"  max |loss ours - {name}| = {max(g):.2e} (target <= "
              f"{TARGETS['loss_max_abs_diff']:g}: {status})")
        notes.append((f"loss_gap_{name.replace(' ', '_')}", max(g)))
    ref_s = ", ".join(f"{fmt_t(v['ref_s'])} ({c})" for c, v in setups.items())
    calls = ", ".join(fmt_t(x["seconds"]) for x in runs["ours"])
    print(f"\nOurs: reference log-probs of the {len(statements)} statements, once (evaluate): "
          f"{ref_s}; whole train_dpo({steps} steps) calls incl. the warm-up step and the "
          f"final evaluation: {calls}.")
    for name in trl_names:
        r = runs[name][0]
        init = "tokenizing, reference log-probs" if r["precompute"] else "tokenizing"
        bodies = np.concatenate([x["bodies"] for x in runs[name]])
        print(f"{name}: DPOTrainer(...) {fmt_t(r['init_s'])} ({init}); train() "
              f"{fmt_t(r['train_s'])}; step body alone (on_step_begin -> end) best "
              f"{fmt_t(bodies.min())}; optimiser {r['optim']}; tokenization = ours for "
              f"{r['same_prompt']}/{r['n']} prompts, completions = answer + EOS for "
              f"{r['same_answer']}/{r['n']}.")
    if trl_names:
        print(f"torch.get_num_threads() after TRL: {torch.get_num_threads()}")
    if "trl precomputed" in best:
        headline = best["trl precomputed"] / best["ours"]
        print(f"\nHeadline: dpo_speedup_vs_trl = {headline:.2f}x against TRL with "
              f"precompute_ref_log_probs=True (best run / best run; median ratio "
              f"{med['trl precomputed'] / med['ours']:.2f}x; target >= "
              f"{TARGETS['dpo_speedup_vs_trl']:g}x).")
    else:
        headline = float("nan")
        print("\nHeadline: dpo_speedup_vs_trl = nan (TRL not measured).")
    return headline, notes


# ----------------------------------------------------------------------------- 3. memory

def memory_child(args) -> None:
    """In a fresh process: load the default model, full-FT DPO with the probe's defaults."""
    from llm_probes.finetune import DEFAULT_LR
    from llm_probes.logprobs import evaluate, preference_data
    from llm_probes.training import (
        peak_memory,
        prepare_policy,
        reset_peak_memory,
        train_config,
        train_dpo,
    )
    from llm_probes.model import load_model
    from llm_probes.persona import load_statements

    with quiet_libraries():
        loaded = load_model(None, device=args.device, progress=False)
    after_load = peak_memory(loaded.device)["peak_rss_bytes"]
    statements = load_statements(args.persona_dir, list(args.behaviors[:2]), max_per_behavior=16)
    data = preference_data(loaded, statements)
    before = evaluate(loaded.model, data, np.arange(len(data.prompts)), batch_size=32)
    policy = prepare_policy(loaded, "full", copy_model=False)  # as the probe: in place
    reset_peak_memory(loaded.device)
    config = train_config(steps=args.memory_steps, lr=DEFAULT_LR[("full", "adamw")], beta=0.1,
                          batch_size=8, optimizer="adamw", eval_every=1, eval_batch_size=32)
    t0 = now()
    train_dpo(policy, data, before.logps, config, start=before.logps)
    seconds = now() - t0
    window = peak_memory(loaded.device)
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    hwm = [int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")]
    print(json.dumps({"after_load_rss": after_load, "train_window": window,
                      "job_hwm": hwm[0] if hwm else None, "steps": args.memory_steps,
                      "statements": len(statements), "train_s": seconds,
                      "parameters": sum(p.numel() for p in policy.parameters())}))


def memory_section(args) -> float:
    heading("3. peak memory of full fine-tuning the default model (fresh subprocess)")
    steps = 2 if args.quick else 3
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child",
           "--device", args.device, "--persona-dir", str(args.persona_dir),
           "--behaviors", ",".join(args.behaviors), "--memory-steps", str(steps)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    t0 = now()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=False)
    seconds = now() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print(f"memory subprocess failed (exit {proc.returncode}): {' | '.join(tail)}")
        return float("nan")
    r = json.loads(lines[-1])
    gb = 1e9
    job = r["job_hwm"] if r["job_hwm"] is not None else r["train_window"]["peak_rss_bytes"]
    print(f"subprocess: load_model(None) -> preference_data of {r['statements']} statements -> "
          f"evaluate (reference) -> prepare_policy('full', copy_model=False) -> train_dpo "
          f"({r['steps']} steps, AdamW, batch 8, eval_every=1): {r['parameters'] / 1e6:.1f} M "
          f"trainable parameters; {seconds:.0f} s in all, {r['train_s']:.0f} s training.")
    rows = [["RSS after load_model", f"{r['after_load_rss'] / gb:.2f}"],
            ["RSS high-water mark, training window (reset_peak_memory before train_dpo)",
             f"{r['train_window']['peak_rss_bytes'] / gb:.2f}"],
            ["RSS high-water mark of the whole job (VmHWM) - headline", f"{job / gb:.2f}"]]
    cuda = r["train_window"].get("peak_cuda_bytes")
    if cuda is not None:
        rows.append(["torch CUDA allocator peak, training window", f"{cuda / gb:.2f}"])
    table("peak_memory() (GB = 1e9 bytes)", ["", "GB"], rows)
    status = "met" if job / gb <= TARGETS["peak_memory_gb"] else "NOT met"
    print(f"\nPeak memory {job / gb:.2f} GB (target <= {TARGETS['peak_memory_gb']:g} GB: "
          f"{status}).")
    return job / gb


# ----------------------------------------------------------------------------- 4. pairs: extraction

PAIR_BUDGETS = (128, 64)  # prompt, response tokens
PAIR_DPO_BATCH = 8


def bench_pairs(args, n: int, budgets=PAIR_BUDGETS):
    """The first ``n`` good pairs of ``--pairs`` (HH-RLHF), tokenized under ``budgets``."""
    from llm_probes.pairs import load_pairs, tokenize_pairs

    pairs = load_pairs(args.pairs, skip_bad=True, max_pairs=n)
    return tokenize_pairs(pairs, args.loaded.tokenizer, max_prompt_tokens=budgets[0],
                          max_response_tokens=budgets[1], skip_bad=True)


def pairs_extraction_section(args, loaded, counts, env) -> float:
    from llm_probes.pair_features import (
        length_batches, response_features, shared_prompt_features,
    )
    from llm_probes.packing import supports_packing

    heading("4. pairs_extract_gemm_fraction: pair_features.shared_prompt_features on HH-RLHF "
            "pairs")
    n = 32 if args.quick else 128
    tok = bench_pairs(args, n)
    f = tok.frame
    prompts, chosen, rejected = list(f.prompt_ids), list(f.chosen_ids), list(f.rejected_ids)
    rows = np.array([len(p) + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected)])
    two = np.r_[[len(p) + len(c) for p, c in zip(prompts, chosen)],
                [len(p) + len(r) for p, r in zip(prompts, rejected)]]
    answer = int(sum(len(c) + len(r) for c, r in zip(chosen, rejected)))
    real = int(rows.sum())
    head = counts["head"] or counts["embedding"]
    flops = 2 * counts["non_embedding"] * real + 2 * head * answer
    default = inspect.signature(shared_prompt_features).parameters
    size, budget = default["batch_size"].default, default["max_batch_tokens"].default
    batches = length_batches(rows, size, budget)
    padded = int(sum(len(b) * rows[b].max() for b in batches))
    print(f"{len(f)} pairs (budgets {PAIR_BUDGETS[0]} prompt / {PAIR_BUDGETS[1]} response "
          f"tokens), rows x + y_w + y_l of {int(rows.min())}-{int(rows.max())} tokens (mean "
          f"{rows.mean():.1f}); {real} tokens the answer needs ({int(two.sum())} as 2 x "
          f"{len(f)} sequences x + y), {answer} of them response tokens; packing "
          f"{'on' if supports_packing(loaded.model) else 'OFF (the model failed the check)'}."
          f"\nFLOPs counted: 2 x {counts['non_embedding'] / 1e6:.1f} M non-embedding "
          f"parameters per needed token + 2 x {head / 1e6:.1f} M output-layer parameters per "
          f"response token = {flops / 1e12:.3f} TFLOP per pass (padding excluded).\n"
          f"shared_prompt_features defaults: {size} rows, max_batch_tokens {budget}: "
          f"{len(batches)} forwards, padding {padded / real - 1:.1%}.")
    shapes = layer_shapes(loaded.model)
    layer_rate = layer_gemm(max(1, padded // len(batches)), shapes)
    shared_prompt_features(loaded, prompts[:size], chosen[:size], rejected[:size])  # warm-up
    rounds = 1 if args.quick else 3
    times, seq_times, others, square, layer = [], [], [], [], []
    for _ in range(rounds):
        QUIET()
        with Others() as o:
            sync()
            t0 = now()
            got = shared_prompt_features(loaded, prompts, chosen, rejected)
            sync()
            times.append(now() - t0)
        others.append(o.share)
        if got["sum"].shape[0] != 2 * len(prompts):
            raise RuntimeError("shared_prompt_features returned the wrong number of rows")
        QUIET()
        sync()
        t0 = now()
        response_features(loaded, prompts * 2, chosen + rejected)
        sync()
        seq_times.append(now() - t0)
        layer.append(layer_rate())
        QUIET()
        square.append(env["square"]())
    peak = max(square + [env["peak"]])
    best = min(times)
    rate = flops / best
    lrate = max(layer)
    table("shared_prompt_features, per pass over all pairs",
          ["best", "med", "others", "pairs/s", "GFLOP/s", "layer GEMM", "vs layer",
           "vs square", "2 sequences", "speed-up"],
          [[fmt_t(best), fmt_t(float(np.median(times))), f"{others[int(np.argmin(times))]:.0%}",
            f"{len(f) / best:.2f}", f"{rate / 1e9:.1f}", f"{lrate / 1e9:.1f}",
            f"{rate / lrate:.2f}", f"{rate / peak:.2f}", fmt_t(min(seq_times)),
            f"{min(seq_times) / best:.2f}x"]],
          f"vs square = GFLOP/s / float32 matmul {env['size']}^3 at {peak / 1e9:.1f} GFLOP/s "
          f"(the headline, as extract_gemm_fraction); vs layer = against F.linear of the "
          f"layer's weights at the mean padded rows of one forward; 2 sequences = "
          f"response_features on x + y_w and x + y_l (best), speed-up = that / best.")
    print(f"\nHeadline: pairs_extract_gemm_fraction = {rate / peak:.2f} (target >= "
          f"{TARGETS['pairs_extract_gemm_fraction']}).")
    return rate / peak


# ----------------------------------------------------------------------------- 5. pairs: DPO vs TRL

def pairs_our_run(loaded, data, ref, steps: int) -> dict:
    """``train_pair_dpo`` (full, AdamW) on one batch of pairs; a stamp each time it draws
    a batch, so the intervals between draws are whole steps."""
    from llm_probes import pair_dpo
    from llm_probes.training import prepare_policy, train_config

    config = train_config(steps=steps + 1, lr=DPO_LR, beta=DPO_BETA, batch_size=len(data),
                          optimizer="adamw", eval_every=NEVER, seed=0)
    policy = prepare_policy(loaded, "full", copy_model=True)
    stamps: list[float] = []
    original = pair_dpo._batches

    def stamped(*a, **k):
        for batch in original(*a, **k):
            sync()
            stamps.append(now())
            yield np.sort(batch)  # TRL's sequential order: pairs 0..B-1 in each step

    QUIET()
    pair_dpo._batches = stamped
    try:
        with Others() as others:
            run = pair_dpo.train_pair_dpo(policy, data, ref, config, start=ref)
    finally:
        pair_dpo._batches = original
    del policy
    gc.collect()
    return {"step_times": np.diff(np.array(stamps[1:])), "losses": run.steps.loss.tolist(),
            "others": others.share}


def pairs_trl_run(loaded, data, steps: int) -> dict:
    """TRL's DPOTrainer on the same token ids (its own tokenization bypassed: the dataset
    holds ``prompt_ids``, ``chosen_ids``, ``rejected_ids``), ``precompute_ref_log_probs``."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
            for p, c, r in zip(data.prompts, data.chosen, data.rejected)]
    dataset = Dataset.from_list(rows * steps)

    class Given(DPOTrainer):
        def _prepare_dataset(self, dataset, *_a, **_k):
            return dataset

    class Clock(TrainerCallback):
        def __init__(self):
            self.end = []

        def on_step_end(self, *_a, **_k):
            sync()
            self.end.append(now())

    with tempfile.TemporaryDirectory(prefix="bench_probes_trl_") as out, quiet_libraries():
        config = DPOConfig(
            output_dir=out, per_device_train_batch_size=len(data), max_steps=steps,
            learning_rate=DPO_LR, beta=DPO_BETA, weight_decay=0.0,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
            bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True,
            precompute_ref_log_probs=True, max_length=None,
            train_sampling_strategy="sequential", dataloader_num_workers=0,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            use_cpu=DEVICE.type == "cpu", seed=0)
        policy = copy.deepcopy(loaded.model)
        trainer = Given(model=policy, ref_model=None, args=config, train_dataset=dataset,
                        processing_class=loaded.tokenizer)
        losses = record_losses(trainer)
        clock = Clock()
        trainer.add_callback(clock)
        QUIET()
        with contextlib.redirect_stdout(io.StringIO()), Others() as others:
            trainer.train()
        del trainer, policy
    gc.collect()
    return {"step_times": np.diff(np.array(clock.end)), "losses": losses,
            "others": others.share}


def pairs_dpo_section(args, loaded) -> tuple[float, list]:
    from llm_probes.pair_dpo import pair_data, pair_logps

    heading("5. pairs_dpo_speedup_vs_trl: one full fine-tuning DPO step on multi-token pairs")
    tok = bench_pairs(args, PAIR_DPO_BATCH, budgets=(64, 32))
    data = pair_data(tok, loaded.tokenizer)
    steps = 3 if args.quick else 6
    tokens = sum(len(p) * 2 + len(c) + len(r) for p, c, r in zip(data.prompts, data.chosen,
                                                                 data.rejected))
    print(f"{len(data)} HH-RLHF pairs (budgets 64 prompt / 32 response tokens; {tokens} real "
          f"tokens in the 2 x {len(data)} sequences), one batch; full fine-tuning, AdamW lr "
          f"{DPO_LR:g}, beta {DPO_BETA:g}; {steps} steps a run, the first a warm-up; both "
          f"sides train on the same token ids (no EOS added) with the reference computed once.")
    QUIET()
    ref = pair_logps(loaded.model, data)
    notes = []
    try:
        import trl  # noqa: F401
        have_trl = True
    except ImportError:
        have_trl = False
        print(f"\nTRL is not installed: pairs_dpo_speedup_vs_trl = nan. Install it with\n  "
              f"{TRL_INSTALL}")
    rounds = 1 if args.quick else 2
    print(f"{rounds} round(s) of runs, order alternating, each on a fresh copy of the model.")
    tasks = {"ours": lambda: pairs_our_run(loaded, data, ref, steps)}
    if have_trl:
        tasks["trl"] = lambda: pairs_trl_run(loaded, data, steps)
    runs = alternating_rounds(tasks, rounds)
    if not runs["ours"] or not runs.get("trl"):
        print("\nHeadline: pairs_dpo_speedup_vs_trl = nan (a side was not measured).")
        return float("nan"), notes
    per_run = {name: np.array([float(np.mean(x["step_times"])) for x in v])
               for name, v in runs.items()}
    best = {name: float(t.min()) for name, t in per_run.items()}
    med = {name: float(np.median(t)) for name, t in per_run.items()}
    labels = {"ours": "ours: pair_dpo.train_pair_dpo",
              "trl": "TRL DPOTrainer, precompute_ref_log_probs=True"}
    table(f"Seconds per step: mean over the {steps - 1} timed steps of a run; best and median "
          f"over runs", ["", "best run", "med run", "runs", "others (best run)"],
          [[labels[name], fmt_t(best[name]), fmt_t(med[name]), len(t),
            f"{runs[name][int(np.argmin(t))]['others']:.0%}"]
           for name, t in per_run.items()])
    ours, theirs = runs["ours"][0], runs["trl"][0]
    compare = min(len(ours["losses"]), len(theirs["losses"]), 5)
    gap = max(abs(x - y) for x, y in zip(ours["losses"][:compare], theirs["losses"][:compare]))
    table("Per-step loss (first run of each)", ["step", "ours", "TRL"],
          [[k + 1, f"{ours['losses'][k]:.7f}", f"{theirs['losses'][k]:.7f}"]
           for k in range(compare)])
    status = "met" if gap <= TARGETS["loss_max_abs_diff"] else "NOT met"
    print(f"  max |loss ours - TRL| = {gap:.2e} (target <= {TARGETS['loss_max_abs_diff']:g}: "
          f"{status})")
    notes.append(("loss_gap_pairs_trl", gap))
    headline = best["trl"] / best["ours"]
    print(f"\nHeadline: pairs_dpo_speedup_vs_trl = {headline:.2f}x (best run / best run; "
          f"median ratio {med['trl'] / med['ours']:.2f}x; target >= "
          f"{TARGETS['pairs_dpo_speedup_vs_trl']:g}x).")
    return headline, notes


# ----------------------------------------------------------------------------- main

def default_persona_dir() -> Path:
    env = os.environ.get("PREFDYN_PERSONA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data" / "persona"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke mode (< 2 min)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N "
                        "(default auto: CUDA when available)")
    parser.add_argument("--persona-dir", type=Path, default=default_persona_dir(),
                        help="persona *.jsonl folder (default $PREFDYN_PERSONA_DIR, else "
                             "../shared/data/persona beside the repository)")
    parser.add_argument("--behaviors", default=",".join(BEHAVIORS),
                        help=f"comma-separated behaviors (default {','.join(BEHAVIORS)})")
    parser.add_argument("--wait-budget", type=float, default=900.0, metavar="S",
                        help="seconds the full mode may spend in total waiting for other "
                             "processes to go quiet before timed tasks (default 900)")
    parser.add_argument("--wait-task", type=float, default=60.0, metavar="S",
                        help="at most this many seconds of waiting before one timed task "
                             "(default 60)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch.set_num_threads(N) first (default: torch's own default, "
                             "not changed); e.g. 1 on a machine shared with other jobs")
    parser.add_argument("--pairs", type=Path, default=ROOT.parent / "shared" / "data" / "hh-rlhf"
                        / "harmless-base-test.jsonl.gz", help="preference pairs of sections 4 "
                        "and 5 (default ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz)")
    parser.add_argument("--only", choices=["all", "persona", "pairs"], default="all",
                        help="persona: sections 1-3; pairs: sections 4-5 (skipped keys print "
                             "nan; default all)")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.behaviors = [b.strip() for b in args.behaviors.split(",") if b.strip()]
    if len(args.behaviors) < 2:
        parser.error("--behaviors must name at least 2 behaviors")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads == {args.threads}, must be >= 1")
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return 0

    from llm_probes.model import load_model

    global DEVICE, QUIET
    QUIET = Quiet(5.0, 1.0) if args.quick else Quiet(args.wait_budget, args.wait_task)
    torch.manual_seed(0)
    start = now()
    contention = Contention()
    t0 = now()
    with quiet_libraries():
        loaded = load_model(None, device=args.device)
    load_s = now() - t0
    DEVICE = loaded.device
    args.device = str(DEVICE)
    counts = parameter_counts(loaded.model)
    env = machine(args, loaded, counts)
    print(f"load_model(None): {load_s:.1f} s")
    args.loaded = loaded
    nan = float("nan")
    fraction = speedup = memory = pairs_fraction = pairs_speedup = nan
    notes = []
    if args.only in ("all", "persona"):
        fraction = extraction_section(args, loaded, counts, env)
        speedup, notes = dpo_section(args, loaded)
    if args.only in ("all", "pairs"):
        pairs_fraction = pairs_extraction_section(args, loaded, counts, env)
        pairs_speedup, more = pairs_dpo_section(args, loaded)
        notes += more
    QUIET.close_task()  # close the last timed task; the memory job is not timed
    if args.only in ("all", "persona"):
        memory = memory_section(args)
    print("\n" + "=" * 78)
    got = {"extract_gemm_fraction": fraction, "dpo_speedup_vs_trl": speedup,
           "pairs_extract_gemm_fraction": pairs_fraction,
           "pairs_dpo_speedup_vs_trl": pairs_speedup}
    for key, value in got.items():
        status = ("met" if value >= TARGETS[key] else "NOT met") if math.isfinite(value) else \
            "not measured"
        print(f"{key:27s} = {sig(value):>6s}   target >= {TARGETS[key]:g}: {status}")
    mem_status = ("met" if memory <= TARGETS["peak_memory_gb"] else "NOT met") \
        if math.isfinite(memory) else "not measured"
    print(f"{'peak_memory_gb':22s} = {sig(memory):>6s}   target <= "
          f"{TARGETS['peak_memory_gb']:g}: {mem_status}")
    for key, value in notes:
        print(f"{key:22s} = {value:.1e}  target <= {TARGETS['loss_max_abs_diff']:g}")
    print(f"total benchmark time {now() - start:.1f} s; {contention.report()};\n"
          f"{QUIET.summary()}")
    print(f"bench_probes: extract_gemm_fraction={sig(fraction)} "
          f"dpo_speedup_vs_trl={sig(speedup)} pairs_extract_gemm_fraction={sig(pairs_fraction)} "
          f"pairs_dpo_speedup_vs_trl={sig(pairs_speedup)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
