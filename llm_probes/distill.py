"""The ``distill`` probe: context distillation on the real model (issue 13, experiment 3).

**Teacher**: the unchanged model with a short helpful-honest-harmless ``--preamble``
before each persona question (``PREAMBLE + "\\n\\n" + question``, then the usual
prompt format of :func:`llm_probes.model.prompt_texts`). **Student**: the model
*without* the preamble, trained to answer as the teacher does:

- ``--mode last-layer``: only the output layer's Yes/No rows move, on the cached
  final-layer features ``g(x)`` of the unprompted prompts (as the ``last-layer``
  probe), by full-batch gradient descent from ``W0``;
- ``--mode lora``: LoRA adapters on the attention and MLP projections
  (:func:`llm_probes.training.prepare_policy`), AdamW on minibatches.

**The loss** is the synthetic ``distill`` objective, KL over the model's answers
(:func:`dynamics.objectives.distill_loss`, Askell et al. 2021), with the answers
the two tokens Yes and No: both distributions are **renormalised over {Yes, No}**
(the probes' two-token reduction), so per statement

.. math::
    KL(π_T ‖ π) = Σ_{y ∈ \\{Yes, No\\}} π_T(y)\\,(\\log π_T(y) − \\log π(y)),
    \\quad π(Yes) = σ(z_{Yes} − z_{No}),

a function of the logit gap ``z_Yes − z_No`` alone (the rest of the vocabulary
does not enter). It is 0 at step 0 only if the preamble changes nothing.

**Measured** on the train and the held-out (test) statements of each behavior: the
KL to the teacher per evaluation step, and how much of the prompt's effect on the
answers survives without the prompt (:func:`surviving_fraction`).

Outputs: ``distill.parquet`` (per step × split × behavior: ``kl``, ``gap``,
``survived``), ``distill_summary.parquet`` (per split × behavior, before/after),
``distill_statements.parquet`` (per statement: the base, teacher and student
Yes/No values, from which every KL reported is recomputed) and ``distill_run.json``.

Shapes: ``N`` statements, ``d`` the hidden width, ``E`` evaluation steps; a pair
``(n, 2)`` holds (Yes, No) log-probabilities or logits (equal up to a per-row
constant, which the renormalisation removes).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dynamics.io import write_json, write_parquet
from dynamics.objectives import distill_loss
from synthetic.validation import ParameterError, check_choice, check_integer, check_number

__all__ = ["DEFAULT_PREAMBLE", "MODES", "SEPARATOR", "answer_kl", "logit_gap",
           "surviving_fraction", "prompted_questions", "resolve_preamble",
           "check_preamble", "train_last_layer", "train_lora", "add_arguments", "check",
           "check_model", "run"]

DEFAULT_PREAMBLE = ("You are a helpful, honest and harmless assistant. You answer truthfully "
                    "and you never help anyone cause harm.")
"""The teacher's preamble when neither ``--preamble`` nor ``--preamble-file`` is given."""
SEPARATOR = "\n\n"
"""Between the preamble and the persona question, inside the one user turn."""
MODES: dict[str, str] = {
    "last-layer": "only the Yes/No rows of the output layer move, on the cached unprompted "
                  "features (full-batch gradient descent)",
    "lora": "LoRA adapters on the attention and MLP projections (AdamW on minibatches)",
}
DEFAULTS = {"last-layer": dict(steps=200, lr=1e-3, eval_every=1),
            "lora": dict(steps=40, lr=1e-3, eval_every=5)}
"""``--steps``, ``--lr``, ``--eval-every`` of each mode when not given."""


# --------------------------------------------------------------------------- pure functions


def answer_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """``KL(π_T ‖ π)`` per statement over {Yes, No}, renormalised; unreduced.

    ``teacher``, ``student`` (n, 2): (Yes, No) log-probabilities or logits (any
    per-row constant cancels). Returns (n,). This is
    :func:`dynamics.objectives.distill_loss` with the answers on its ``V`` axis,
    ``(2, n)``: the synthetic objective, on the two answers.
    """
    return distill_loss(student.mT, teacher=teacher.mT)


def logit_gap(pair: torch.Tensor) -> torch.Tensor:
    """``z_Yes − z_No`` (n,) of a pair (n, 2): the log-odds of Yes over {Yes, No}."""
    return pair[..., 0] - pair[..., 1]


def surviving_fraction(base_gap, prompted_gap, student_gap) -> dict[str, float]:
    """How much of the prompt's effect on the answers survives without the prompt.

    Each argument (n,) is a logit gap ``z_Yes − z_No`` per statement: the base model
    without the preamble (``b``), the teacher with it (``p``), the trained student
    without it (``s``). With ``δ_p = p − b`` and ``δ_s = s − b``:

    - ``effect_prompted = mean δ_p``, ``effect_student = mean δ_s``;
    - ``survived = mean δ_s / mean δ_p`` (1: the mean effect is fully distilled,
      0: none of it; NaN when the prompt has no mean effect);
    - ``survived_ls = Σ δ_s δ_p / Σ δ_p²``: the least-squares coefficient of the
      student's shifts on the prompt's, statement by statement;
    - ``sign_agreement``: the share of statements with ``δ_p ≠ 0`` whose student
      shift has the prompt's sign.
    """
    b, p, s = (np.asarray(v, dtype=np.float64) for v in (base_gap, prompted_gap, student_gap))
    dp, ds = p - b, s - b
    effect, kept = float(dp.mean()), float(ds.mean())
    power = float((dp * dp).sum())
    moved = dp != 0
    return dict(effect_prompted=effect, effect_student=kept,
                survived=kept / effect if effect != 0 else math.nan,
                survived_ls=float((ds * dp).sum()) / power if power > 0 else math.nan,
                sign_agreement=float((np.sign(ds[moved]) == np.sign(dp[moved])).mean())
                if moved.any() else math.nan)


def prompted_questions(questions, preamble: str) -> list[str]:
    """The teacher's questions: ``preamble + SEPARATOR + question``."""
    return [f"{preamble}{SEPARATOR}{q}" for q in questions]


# --------------------------------------------------------------------------- validation


def resolve_preamble(args) -> tuple[str, str]:
    """``(option, text)``: the preamble of ``--preamble``, ``--preamble-file`` (read as
    UTF-8) or :data:`DEFAULT_PREAMBLE`, stripped of surrounding whitespace; the option
    names where it came from. Empty → :class:`ParameterError`."""
    file = getattr(args, "preamble_file", None)
    text = getattr(args, "preamble", None)
    if file is not None:
        option = "--preamble-file"
        try:
            text = Path(file).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ParameterError(option, str(file), f"must be UTF-8 text (byte {err.start} "
                                 f"is not)") from None
        except OSError as err:
            raise ParameterError(option, str(file), f"cannot be read ({err.strerror or err})"
                                 ) from None
    elif text is not None:
        option = "--preamble"
    else:
        return "--preamble", DEFAULT_PREAMBLE
    if not text.strip():
        raise ParameterError(option, text if file is None else str(file),
                             "must hold a non-empty preamble (it is the prompt distilled)")
    return option, text.strip()


def check_preamble(preamble: str, tokenizer, questions, *, prompt_format: str,
                   max_length: int | None, option: str = "--preamble") -> None:
    """Refuse a preamble the model cannot take (:class:`ParameterError`, one line).

    The tokenizer *cannot encode* the preamble when: it raises on the text (e.g. the
    lone surrogates Python makes of bytes that are not UTF-8); or the text contains
    one of its special tokens (``<|im_end|>``...: read as chat structure, not text);
    or its ids contain the unknown token; or decoding them does not give the text
    back. The preamble *exceeds the context* when the prompt of any of ``questions``
    with it (in ``prompt_format``) has more than ``max_length`` tokens (the model's
    ``max_position_embeddings``; None: no limit).
    """
    from llm_probes.model import prompt_texts

    try:
        ids = list(tokenizer(preamble, add_special_tokens=False)["input_ids"])
        back = tokenizer.decode(ids)
    except Exception as err:  # noqa: BLE001 - what a tokenizer raises on bad text varies
        raise ParameterError(option, preamble, f"cannot be encoded by the tokenizer "
                             f"({type(err).__name__}); it must be text the tokenizer "
                             "can encode") from None
    special = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t in preamble]
    if special:
        raise ParameterError(option, preamble, f"contains the tokenizer's special token "
                             f"{special[0]!r}; it must be plain text")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        raise ParameterError(option, preamble, "encodes to the unknown token; it must be "
                             "text the tokenizer can encode")
    if back != preamble:
        raise ParameterError(option, preamble, f"does not survive encoding and decoding "
                             f"(it comes back as {back[:40]!r}); it must be text the "
                             "tokenizer can encode")
    if max_length is None:
        return
    texts = prompt_texts(tokenizer, prompted_questions(questions, preamble), prompt_format)
    encoded = tokenizer(texts, add_special_tokens=prompt_format == "plain")["input_ids"]
    length = max(len(ids) for ids in encoded)
    if length > max_length:
        raise ParameterError(option, preamble, f"makes the longest question's prompt "
                             f"{length} tokens long; it must fit the model's context of "
                             f"{max_length} tokens (max_position_embeddings)")


# --------------------------------------------------------------------------- training


def train_last_layer(features: torch.Tensor, teacher: torch.Tensor, rows: torch.Tensor, *,
                     train, lr: float, steps: int, eval_every: int = 1):
    """Full-batch gradient descent on the Yes/No rows of the output layer.

    ``features (N, d)``: the unprompted ``g(x)`` (their dtype is the run's);
    ``teacher (N, 2)``: the prompted model's (Yes, No) logits; ``rows (2, d)``: the
    starting rows ``W0[Yes], W0[No]``; ``train``: indices of the statements trained
    on. Each step ``W ← W − lr ∇_W mean_train answer_kl(teacher, g Wᵀ)``.

    Returns ``(W (2, d), steps (E,), logits (E, N, 2))``: the student's logits on every
    statement at step 0, every ``eval_every`` steps and the last. The KL's Hessian in
    the gap is ``π(1 − π) ≤ 1/4``, DPO's at β = 1 and margin 0, so the step is stable
    below :func:`llm_probes.last_layer.stability_limit` ``(features, 1)``.
    """
    x = features
    w = rows.to(x.dtype).clone().requires_grad_(True)           # (2, d)
    index = torch.as_tensor(np.asarray(train), dtype=torch.long)
    xt, tt = x[index], teacher[index].to(x.dtype)                 # (n, d), (n, 2)
    recorded, logits = [], []

    def record(step: int) -> None:
        with torch.no_grad():
            logits.append(x @ w.T)                                # (N, 2)
        recorded.append(step)

    record(0)
    for step in range(1, steps + 1):
        loss = answer_kl(tt, xt @ w.T).mean()
        (grad,) = torch.autograd.grad(loss, w)                    # (2, d)
        with torch.no_grad():
            w -= lr * grad
        if step % eval_every == 0 or step == steps:
            record(step)
    return w.detach(), np.asarray(recorded), torch.stack(logits)


def train_lora(policy, data, teacher: torch.Tensor, start: torch.Tensor, *, steps: int,
               lr: float, batch_size: int, eval_every: int, seed: int,
               eval_batch_size: int = 32, progress: bool = False):
    """AdamW on the trainable parameters of ``policy`` (LoRA adapters) by the mean
    :func:`answer_kl` of minibatches of ``data.train`` (a fresh permutation per epoch,
    ``seed``), as :func:`llm_probes.training.train_dpo` does for DPO.

    ``data``: the unprompted :class:`~llm_probes.logprobs.PreferenceData`;
    ``teacher (N, 2)``, ``start (N, 2)``: the prompted and the starting model's log π(Yes),
    log π(No). Returns ``(records, final (N, 2))``: ``records`` are ``(step, split,
    index, pair)`` — the test statements every ``eval_every`` steps, every statement
    at steps 0 (``start``) and ``steps``, and each minibatch before its update
    (``split="batch"``, at the step before it).
    """
    from llm_probes.logprobs import answer_logps, evaluate
    from llm_probes.training import _bar, _batches, _optimizer

    device = next(policy.parameters()).device
    optimizer = _optimizer("adamw", [p for p in policy.parameters() if p.requires_grad], lr)
    optimizer.zero_grad(set_to_none=True)
    batches = _batches(data.train, batch_size, torch.Generator().manual_seed(seed))
    everything = np.arange(len(data.prompts))
    records = [(0, split, index, start[index].double()) for split, index in
               (("train", data.train), ("test", data.test))]
    final = start
    bar = _bar(steps, "distill (lora)", progress)
    try:
        for step in range(1, steps + 1):
            index = next(batches)
            out = answer_logps(policy, data.prompts.batch(index, device), answers=data.answers)
            kl = answer_kl(teacher[index].to(device), out.logps.double())   # (B,)
            kl.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            records.append((step - 1, "batch", index, out.logps.detach().double().cpu()))
            del out, kl
            if step == steps:
                final = evaluate(policy, data, everything, batch_size=eval_batch_size).logps
                records += [(step, split, index, final[index]) for split, index in
                            (("train", data.train), ("test", data.test))]
            elif step % eval_every == 0:
                pair = evaluate(policy, data, data.test, batch_size=eval_batch_size).logps
                records.append((step, "test", data.test, pair))
            bar.update(1)
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
    return records, final


def curves_frame(records, teacher: torch.Tensor, base: torch.Tensor, codes: np.ndarray,
                 names: list[str], *, lr: float) -> pd.DataFrame:
    """One row per step × split × behavior: ``n``, the mean ``kl`` to the teacher, the
    mean student ``gap`` and ``survived`` (:func:`surviving_fraction`'s ratio of means).

    ``records``: ``(step, split, index (k,), pair (k, 2))``; ``teacher``, ``base``
    (N, 2): the prompted and the unprompted base model's pairs."""
    frames = []
    teacher_gap, base_gap = logit_gap(teacher).double(), logit_gap(base).double()
    for step, split, index, pair in records:
        index = np.asarray(index)
        if len(index) == 0:
            continue
        pair = pair.double()
        frames.append(pd.DataFrame({
            "step": step, "split": split, "code": codes[index],
            "kl": answer_kl(teacher[index].double(), pair).numpy(),
            "gap": logit_gap(pair).numpy(), "base": base_gap[index].numpy(),
            "prompted": teacher_gap[index].numpy()}))
    long = pd.concat(frames, ignore_index=True)
    table = long.groupby(["step", "split", "code"], sort=True).agg(
        n=("kl", "size"), kl=("kl", "mean"), gap=("gap", "mean"), base=("base", "mean"),
        prompted=("prompted", "mean")).reset_index()
    effect = table["prompted"] - table["base"]
    table["survived"] = ((table["gap"] - table["base"]) / effect).where(effect != 0)
    table.insert(1, "t", lr * table["step"])
    table.insert(3, "behavior", pd.Categorical.from_codes(table.pop("code"), names))
    table["split"] = pd.Categorical(table["split"], categories=["train", "test", "batch"])
    return table.drop(columns=["base", "prompted"]).sort_values(
        ["split", "behavior", "step"], ignore_index=True)


def summary_frame(teacher: torch.Tensor, base: torch.Tensor, student: torch.Tensor,
                  codes: np.ndarray, names: list[str], split: np.ndarray) -> pd.DataFrame:
    """Per split × behavior: ``kl_before`` (base model) and ``kl_after`` (trained
    student) to the teacher, the mean gaps and :func:`surviving_fraction`."""
    kl_before = answer_kl(teacher.double(), base.double()).numpy()
    kl_after = answer_kl(teacher.double(), student.double()).numpy()
    gaps = {k: logit_gap(v.double()).numpy() for k, v in
            (("base", base), ("prompted", teacher), ("student", student))}
    rows = []
    for part in ("train", "test"):
        for code, name in enumerate(names):
            mask = (split == part) & (codes == code)
            if not mask.any():
                continue
            rows.append(dict(
                split=part, behavior=name, n=int(mask.sum()),
                kl_before=float(kl_before[mask].mean()), kl_after=float(kl_after[mask].mean()),
                **{f"gap_{k}": float(v[mask].mean()) for k, v in gaps.items()},
                **surviving_fraction(gaps["base"][mask], gaps["prompted"][mask],
                                     gaps["student"][mask])))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the probe


def add_arguments(parser) -> None:
    """Options of ``prefdyn probe distill``."""
    from llm_probes.features import add_feature_arguments
    from llm_probes.finetune import add_lora_arguments

    add_feature_arguments(parser)
    group = parser.add_argument_group("context distillation")
    group.add_argument("--mode", choices=list(MODES), default="last-layer",
                       help="what the student trains: " + "; ".join(
                           f"{k}: {v}" for k, v in MODES.items()) + " (default: last-layer)")
    source = group.add_mutually_exclusive_group()
    source.add_argument("--preamble", metavar="TEXT",
                        help=f"the teacher's preamble, before each question (default: "
                        f"{DEFAULT_PREAMBLE!r})")
    source.add_argument("--preamble-file", type=Path, metavar="PATH",
                        help="read the preamble from a UTF-8 text file")
    for name, kind, what in (("--steps", int, "steps"),
                             ("--lr", str, "learning rate; last-layer also takes auto, "
                              "--lr-fraction of the stability limit 4/λ_max(E[g gᵀ])"),
                             ("--eval-every", int, "record the KL every N steps (lora: "
                              "of the held-out statements; of all at the ends)")):
        key = name[2:].replace("-", "_")
        group.add_argument(name, type=kind, default=None, help=f"{what} (default: " + ", ".join(
            f"{mode} {values[key]:g}" for mode, values in DEFAULTS.items()) + ")")
    group.add_argument("--lr-fraction", type=float, metavar="F",
                       help="with --lr auto, the step as a fraction 0 < F < 1 of the "
                       "stability limit (default: 0.5)")
    group.add_argument("--train-batch", type=int, default=8, metavar="N",
                       help="lora: statements per step (default: 8)")
    add_lora_arguments(group)


def resolved(args) -> dict:
    """``steps``, ``lr``, ``eval_every`` of the options, or the mode's :data:`DEFAULTS`;
    validated (:class:`ParameterError` naming the option)."""
    mode = check_choice("--mode", args.mode, MODES)
    values = {key: default if getattr(args, key) is None else getattr(args, key)
              for key, default in DEFAULTS[mode].items()}
    from llm_probes.last_layer import parse_lr

    check_integer("--steps", values["steps"], ge=1)
    values["lr"] = parse_lr("--lr", values["lr"])
    if values["lr"] == "auto" and mode != "last-layer":
        raise ParameterError("--lr", "auto", "applies to --mode last-layer only (LoRA's AdamW "
                             "has no stability limit to take a fraction of)")
    fraction = getattr(args, "lr_fraction", None)
    if fraction is not None:
        check_number("--lr-fraction", fraction, gt=0, lt=1)
        if values["lr"] != "auto":
            raise ParameterError("--lr-fraction", fraction, f"applies only with --lr auto, "
                                 f"not --lr {values['lr']:g}")
    check_integer("--eval-every", values["eval_every"], ge=1, le=values["steps"])
    return values


def check(args) -> None:
    """Validate the options that need no model, reading ``--preamble-file``; writes
    nothing (one-line :class:`ParameterError` naming the option)."""
    from llm_probes.finetune import lora_options

    resolved(args)
    check_integer("--batch-size", args.batch_size, ge=1)
    check_integer("--train-batch", args.train_batch, ge=1)
    lora_options(args)
    resolve_preamble(args)


def _context_length(loaded) -> int | None:
    config = loaded.model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None)


def check_model(ctx) -> None:
    """The rules that need the model, before anything is written: the preamble must be
    text the tokenizer encodes and fit the context with every question
    (:func:`check_preamble`); every behavior needs held-out statements."""
    args = ctx.args
    option, preamble = resolve_preamble(args)
    check_preamble(preamble, ctx.model.tokenizer, list(ctx.statements["question"]),
                   prompt_format=args.prompt_format, max_length=_context_length(ctx.model),
                   option=option)
    counts = ctx.statements.groupby("behavior", sort=False)["split"].agg(
        lambda s: ((s == "train").sum(), (s == "test").sum()))
    for name, (n_train, n_test) in counts.items():
        if n_train == 0 or n_test == 0:
            raise ParameterError("--max-statements", args.max_statements,
                                 f"leaves {name!r} {n_train} train and {n_test} held-out "
                                 "statements; raise it (>= 10 gives both)")


def run(ctx) -> list[Path]:
    """``prefdyn probe distill``: teacher and base pairs, the student's training, the
    tables (see the module docstring)."""
    args = ctx.args
    check(args)
    settings = resolved(args)
    option, preamble = resolve_preamble(args)
    loaded = ctx.model
    frame = ctx.statements
    names = ctx.behaviors
    codes = pd.Categorical(frame["behavior"], categories=names).codes.astype(np.int64)
    split = frame["split"].to_numpy()
    train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    prompted = frame.assign(question=prompted_questions(frame["question"], preamble))
    clock = time.perf_counter()
    given = args.preamble is not None or args.preamble_file is not None
    record = dict(mode=args.mode, preamble=preamble,
                  preamble_source=option if given else "default",
                  separator=SEPARATOR, prompt_format=args.prompt_format, **settings,
                  seed=ctx.seed, behaviors=names, n_train=int(len(train)),
                  n_test=int(len(test)), renormalised_over=["Yes", "No"],
                  torch_threads=torch.get_num_threads(), device=str(loaded.device))
    if args.mode == "last-layer":
        teacher, base, student, records = _run_last_layer(ctx, prompted, train, settings,
                                                          record)
    else:
        teacher, base, student, records = _run_lora(ctx, prompted, settings, record)
    curves = curves_frame(records, teacher, base, codes, names, lr=settings["lr"])
    curves.insert(0, "mode", args.mode)
    summary = summary_frame(teacher, base, student, codes, names, split)
    summary.insert(0, "mode", args.mode)
    statements = _statements_frame(frame, teacher, base, student)
    statements.insert(0, "mode", args.mode)
    record["seconds"]["total"] = time.perf_counter() - clock
    held_out = summary[summary["split"] == "test"]
    record["held_out"] = {row.behavior: dict(kl_before=row.kl_before, kl_after=row.kl_after,
                                             survived=row.survived)
                          for row in held_out.itertuples()}
    out = Path(ctx.out)
    files = [write_parquet(out / "distill.parquet", curves),
             write_parquet(out / "distill_summary.parquet", summary),
             write_parquet(out / "distill_statements.parquet", statements),
             write_json(out / "distill_run.json", record)]
    if ctx.progress:
        survived = ", ".join(f"{r.behavior} {r.survived:.2f}" for r in held_out.itertuples())
        print(f"distill ({args.mode}, {settings['steps']} steps): held-out KL to the prompted "
              f"model {held_out['kl_before'].mean():.4f} -> {held_out['kl_after'].mean():.4f}"
              f" (mean over behaviors); the prompt's effect surviving without it: {survived};"
              f" {record['seconds']['total']:.1f} s", file=sys.stderr)
    return files


def _run_last_layer(ctx, prompted: pd.DataFrame, train: np.ndarray, settings: dict,
                    record: dict):
    """Features with and without the preamble (cached), then :func:`train_last_layer`."""
    from llm_probes.features import answer_rows, probe_features, statement_features
    from llm_probes.last_layer import AUTO_FRACTION, choose_lr, stability_limit

    args, loaded = ctx.args, ctx.model
    clock = time.perf_counter()
    x, _ = probe_features(ctx)                                      # (N, d) unprompted
    xp = statement_features(loaded, prompted, prompt_format=args.prompt_format,
                            batch_size=args.batch_size, progress=ctx.progress)  # (N, d)
    features_s = time.perf_counter() - clock
    x, xp = x.double(), xp.double()
    rows = answer_rows(loaded, args.prompt_format)[:2].double()    # (2, d): Yes, No
    teacher, base = xp @ rows.T, x @ rows.T                         # (N, 2) logits
    limit = stability_limit(x[torch.as_tensor(train)], 1.0)
    fraction = AUTO_FRACTION if args.lr_fraction is None else args.lr_fraction
    record["lr_rule"] = "auto" if settings["lr"] == "auto" else "given"
    settings["lr"] = record["lr"] = choose_lr(
        settings["lr"], {"the train features": limit}, fraction=fraction,
        rule="4/λ_max(E[g gᵀ])")
    clock = time.perf_counter()
    _, steps, logits = train_last_layer(x, teacher, rows, train=train, lr=settings["lr"],
                                        steps=settings["steps"],
                                        eval_every=settings["eval_every"])
    split = ctx.statements["split"].to_numpy()
    records = [(int(step), part, np.flatnonzero(split == part), logits[e][split == part])
               for e, step in enumerate(steps) for part in ("train", "test")]
    record.update(stability_limit_lr=limit, trainable_parameters=int(rows.numel()),
                  seconds=dict(features=features_s, train=time.perf_counter() - clock))
    return teacher, base, logits[-1], records


def _run_lora(ctx, prompted: pd.DataFrame, settings: dict, record: dict):
    """Teacher and base log-probabilities by one forward each, then :func:`train_lora`
    of LoRA adapters on ``ctx.model`` itself (removed afterwards)."""
    from llm_probes.finetune import lora_options
    from llm_probes.logprobs import evaluate, preference_data
    from llm_probes.training import prepare_policy, release_policy

    args, loaded = ctx.args, ctx.model
    clock = time.perf_counter()
    data = preference_data(loaded, ctx.statements, prompt_format=args.prompt_format)
    data_prompted = preference_data(loaded, prompted, prompt_format=args.prompt_format)
    everything = np.arange(len(data.prompts))
    teacher = evaluate(loaded.model, data_prompted, everything, batch_size=args.batch_size).logps
    base = evaluate(loaded.model, data, everything, batch_size=args.batch_size).logps
    reference_s = time.perf_counter() - clock
    policy = prepare_policy(loaded, "lora", copy_model=False, seed=ctx.seed,
                            **lora_options(args))
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    clock = time.perf_counter()
    try:
        records, student = train_lora(policy, data, teacher, base, steps=settings["steps"],
                                      lr=settings["lr"], batch_size=args.train_batch,
                                      eval_every=settings["eval_every"], seed=ctx.seed,
                                      eval_batch_size=args.batch_size, progress=ctx.progress)
    finally:
        release_policy(policy)
    record.update(train_batch=args.train_batch, optimizer="adamw",
                  trainable_parameters=int(trainable), **lora_options(args),
                  seconds=dict(reference=reference_s, train=time.perf_counter() - clock))
    return teacher, base, student, records


def _statements_frame(frame: pd.DataFrame, teacher, base, student) -> pd.DataFrame:
    """Per statement: its (Yes, No) values for the base model, the teacher and the
    trained student (last-layer: logits; lora: log-probabilities over the vocabulary),
    and the KL to the teacher before and after."""
    table = frame[["behavior", "index", "split", "sign"]].reset_index(drop=True)
    for name, pair in (("base", base), ("teacher", teacher), ("student", student)):
        pair = pair.double().numpy()
        table[f"{name}_yes"], table[f"{name}_no"] = pair[:, 0], pair[:, 1]
    table["kl_before"] = answer_kl(teacher.double(), base.double()).numpy()
    table["kl_after"] = answer_kl(teacher.double(), student.double()).numpy()
    return table
