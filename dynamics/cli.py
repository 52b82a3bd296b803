"""The ``prefdyn`` command line.

    prefdyn run CONFIG.toml --out DIR [--set KEY=VALUE ...] [--quiet]
    prefdyn demo [--out DIR] [--quiet]
    prefdyn sweep CONFIG.toml --out DIR [--grid KEY=V1,V2,...] [--grid KEY=A:B:N[:log]]
                  [--seeds 0:8] [--set K=V] [--jobs N] [--scheduler tcp://HOST:PORT]
    prefdyn sweep --status DIR
    prefdyn figures [DIR ...] --out FIGDIR [--remake NAME|all] [--runs RUNSDIR]
    prefdyn probe NAME --behaviors A,B,...|all --out DIR [--persona-dir DIR] [--model PATH]
                  [--device auto|cpu|cuda] [--max-statements N] [--seed S] [--quiet]
                  [options of NAME]    (real-LLM probes, see llm_probes/cli.py)
    prefdyn preflight --pairs PATH | --behaviors A,B --persona-dir DIR --out DIR [options]
                  (the report before training, see llm_probes/preflight/)

Bad input (a config key, a value, a file, an --out that cannot be written, an
option, a run too big for the memory, an unreachable scheduler) ends with a one-line
``prefdyn: error: ...`` on stderr and exit code 2, checked before anything is
computed or written where possible (a disk that fills up while writing too);
nothing already written is removed, and a run's ``metrics.parquet``, ``config.toml``
and ``env.json`` are only ever replaced whole and together.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from importlib import resources
from pathlib import Path

from synthetic.validation import ParameterError, did_you_mean

__all__ = ["main"]

EXIT_USAGE = 2


def _run(args) -> int:
    from dynamics.config import load_config
    from dynamics.experiment import check_memory, run_experiment, write_run
    from dynamics.io import check_out

    args.out = check_out(args.out)
    config = load_config(args.config, args.set)
    check_memory(config)
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
    from dynamics.experiment import check_memory, run_experiment, summary_table, write_run
    from dynamics.io import check_out
    from figures.learning_curves import plot_learning_curves

    start = time.perf_counter()
    args.out = check_out(args.out)
    config = load_config(None, args.set, text=demo_config_text())
    check_memory(config)
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


def _sweep(args) -> int:
    from dynamics.io import check_out
    from dynamics.sweep import check_workers, run_sweep
    from dynamics.sweep_plan import load_plan
    from dynamics.sweep_store import sweep_status
    from figures import FIGURES

    if args.status is not None:
        if args.config is not None:
            raise ParameterError("--status", str(args.status), "takes no CONFIG")
        manifest, report = sweep_status(args.status)
        keys = ", ".join(k for k, _ in manifest["grids"]) or "no grid"
        print(f"{args.status}: {report.line()}  [{keys}]")
        for pid, error in report.failed.items():
            print(f"  failed {pid}: {error.splitlines()[0][:160]}")
        return 0
    if args.config is None or args.out is None:
        raise ParameterError("prefdyn sweep", "", "needs CONFIG and --out DIR (or --status DIR)")
    args.out = check_out(args.out)
    check_workers(args.jobs, args.threads)
    plan = load_plan(args.config, args.grid, args.seeds, overrides=args.set, figures=FIGURES)
    if not args.quiet:
        grids = " × ".join(f"{g.key} ({len(g.values)})" for g in plan.grids) or "one point"
        where = f"Dask at {args.scheduler}" if args.scheduler else "local cores"
        print(f"sweep: {len(plan.points())} points over {grids}, on {where}", file=sys.stderr)
    report = run_sweep(plan, args.out, jobs=args.jobs, threads=args.threads,
                       scheduler=args.scheduler, retry_failed=args.retry_failed,
                       progress=not args.quiet)
    print(f"{args.out}: {report.line()}; computed {len(report.computed)} now; "
          f"results in {args.out / 'results.parquet'}")
    return 1 if report.failed else 0


def _figures(args) -> int:
    from dynamics.io import check_out
    from dynamics.sweep import check_workers, run_sweep
    from dynamics.sweep_plan import load_plan
    from dynamics.sweep_store import load_sweep
    from figures import FIGURES, render, sweep_configs

    args.out = check_out(args.out)
    if args.remake:
        args.runs = check_out(args.runs, "--runs")
        check_workers(args.jobs, None)
    sweeps = [load_sweep(d) for d in args.dirs]
    if args.remake:
        names = list(FIGURES) if args.remake == "all" else [args.remake]
        for name in names:
            if name not in FIGURES:
                raise ParameterError("--remake", name, f"is not a figure"
                                     f"{did_you_mean(name, FIGURES)}; one of "
                                     + ", ".join(FIGURES) + " or all")
        for name in names:
            for config in sweep_configs(name):
                out = args.runs / config.stem
                if not args.quiet:
                    print(f"figures: sweep {config.name} -> {out}", file=sys.stderr)
                run_sweep(load_plan(config, figures=FIGURES), out, jobs=args.jobs,
                          progress=not args.quiet)
                sweeps.append(load_sweep(out))
    if not sweeps:
        raise ParameterError("prefdyn figures", "", "needs sweep directories or --remake NAME")
    wanted: dict[str, list] = {}
    for sweep in sweeps:
        if sweep.figure is None:
            raise ParameterError("DIR", str(sweep.path), "is a sweep with no [sweep] figure "
                                 "name, so no figure is drawn from it")
        wanted.setdefault(sweep.figure, []).append(sweep)
    for name, group in wanted.items():
        for path in render(name, group, args.out):
            print(f"wrote {path}")
    return 0


def _preflight(args) -> int:
    from llm_probes.preflight import main

    return main(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefdyn",
        description="Learning dynamics of preference alignment: theory and simulation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run one experiment from a TOML config",
                         description="Run one experiment: population theory and batched "
                         "simulation; writes metrics.parquet, config.toml, env.json.")
    run.add_argument("config", type=Path, help="experiment config (TOML)")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set train.beta=0.5 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    run.set_defaults(func=_run)

    demo = sub.add_parser("demo", help="the main job on an embedded default: three "
                          "behaviors, theory over simulation, a figure and a table")
    demo.add_argument("--out", default="prefdyn-demo",
                      help="output directory (default: ./prefdyn-demo)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the embedded config")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)

    sweep = sub.add_parser(
        "sweep", help="run a config over a grid of parameters (resumable)",
        description="The Cartesian product of the grids, each point a `prefdyn run`, on local "
        "cores or a Dask cluster. Every point is written atomically under DIR/points/ as it "
        "finishes; the same command again computes only the missing points.")
    sweep.add_argument("config", type=Path, nargs="?", help="experiment config (TOML), "
                       "optionally with a [sweep] table")
    sweep.add_argument("--out", help="sweep directory")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=VALUES",
                       help="KEY=V1,V2,... or KEY=START:STOP:NUM[:log] (repeatable; any config "
                       "key, e.g. problem.behaviors.0.distinguishability)")
    sweep.add_argument("--seeds", metavar="START:STOP", help="seeds of every point, e.g. 0:8")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of the base config (repeatable)")
    sweep.add_argument("--jobs", type=int, help="local worker processes (default: all cores)")
    sweep.add_argument("--threads", type=int, help="torch threads per point (default: cores / "
                       "jobs; 1 on a cluster)")
    sweep.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                       help="run the points on this Dask distributed scheduler")
    sweep.add_argument("--retry-failed", action="store_true", help="run failed points again")
    sweep.add_argument("--status", type=Path, metavar="DIR",
                       help="say which points of DIR are done, failed or missing")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(func=_sweep)

    figures = sub.add_parser(
        "figures", help="draw the figures from stored sweep results",
        description="Draw each figure named by the sweeps in DIR... ([sweep] figure), as PNG "
        "and PDF. With --remake NAME (or all), first run that figure's sweeps from "
        "figures/sweeps/ into --runs (resumable).")
    figures.add_argument("dirs", type=Path, nargs="*", metavar="DIR", help="sweep directories")
    figures.add_argument("--out", required=True, help="figure directory")
    figures.add_argument("--remake", metavar="NAME", help="run this figure's sweeps first "
                         "(or all)")
    figures.add_argument("--runs", default="runs",
                         help="where --remake keeps its sweeps (default: ./runs)")
    figures.add_argument("--jobs", type=int, help="local worker processes for --remake")
    figures.add_argument("--quiet", action="store_true", help="no progress bars")
    figures.set_defaults(func=_figures)

    # Real-LLM probes: llm_probes.cli imports only the standard library here, and a
    # probe's module (torch, transformers) only once that probe is parsed.
    from llm_probes.cli import add_probe_parser

    add_probe_parser(sub)
    from llm_probes import preflight  # its options only: the standard library

    pre = sub.add_parser("preflight", help=preflight.HELP, description=preflight.HELP)
    preflight.add_arguments(pre)
    pre.set_defaults(func=_preflight)
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
    except OSError as err:
        if err.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        # a full disk in a writer that does not go through atomic_write (a figure)
        print(f"prefdyn: error: --out = {str(getattr(args, 'out', ''))!r} must have free "
              f"space: the disk filled up while writing {err.filename or 'a file'}",
              file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
