"""The ``prefdyn`` command line.

    prefdyn run CONFIG.toml --out DIR [--set KEY=VALUE ...] [--quiet]
    prefdyn demo [--out DIR] [--quiet]

Bad input (a config key, a value, a file) ends with a one-line
``prefdyn: error: ...`` on stderr and exit code 2; nothing already written is
removed, and ``metrics.parquet`` is only ever replaced whole.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import resources
from pathlib import Path

from synthetic.validation import ParameterError

__all__ = ["main"]

EXIT_USAGE = 2


def _run(args) -> int:
    from dynamics.config import load_config
    from dynamics.experiment import run_experiment, write_run

    config = load_config(args.config, args.set)
    frame = run_experiment(config, progress=not args.quiet)
    out = write_run(args.out, config, frame)
    if not args.quiet:
        print(f"wrote {out / 'metrics.parquet'} ({len(frame)} rows), config.toml, env.json")
    return 0


def demo_config_text() -> str:
    """The embedded default experiment (``dynamics/configs/demo.toml``)."""
    return resources.files("dynamics").joinpath("configs/demo.toml").read_text(encoding="utf-8")


def _demo(args) -> int:
    import pandas as pd

    from dynamics.config import build_problem, load_config
    from dynamics.experiment import run_experiment, summary_table, write_run
    from figures.learning_curves import plot_learning_curves

    start = time.perf_counter()
    config = load_config(None, args.set, text=demo_config_text())
    frame = run_experiment(config, progress=not args.quiet)
    out = write_run(args.out, config, frame)
    figure = plot_learning_curves(
        frame, out / "demo",
        title="DPO on three behaviors: theory (dashed) over simulation")[0]
    table = summary_table(frame, build_problem(config))
    with pd.option_context("display.width", 140, "display.precision", 3,
                           "display.max_columns", 20):
        print(table.to_string(index=False))
    print(f"\nfigure: {figure}\nmetrics: {out / 'metrics.parquet'}  "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefdyn",
        description="Learning dynamics of preference alignment: theory and simulation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one experiment from a TOML config",
                         description="Run one experiment: population theory and batched "
                         "simulation; writes metrics.parquet, config.toml, env.json.")
    run.add_argument("config", type=Path, help="experiment config (TOML)")
    run.add_argument("--out", type=Path, required=True, help="output directory")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.beta=0.5 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="the main job on an embedded default: three "
                          "behaviors, theory over simulation, a figure and a table")
    demo.add_argument("--out", type=Path, default=Path("prefdyn-demo"),
                      help="output directory (default: ./prefdyn-demo)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the embedded config")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``prefdyn`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ParameterError as err:
        print(f"prefdyn: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("prefdyn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. `prefdyn demo | head`): stop quietly, and keep
        # Python from raising again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
