"""Parameter sweeps: the Cartesian product of grids over config keys, each point a run.

A sweep is a base config and grids over its keys (:mod:`dynamics.sweep_plan`:
the ``[sweep]`` table, ``--grid``, ``--seeds``), stored under one directory, one
file per point (:mod:`dynamics.sweep_store`: the layout, resuming, reading the
results). This module runs the points: :func:`run_sweep` computes the points
with neither a result nor an error file (``retry_failed`` also reruns failed
ones), so running the same command again after a kill finishes the sweep.

Points run on local cores (a process pool) or on an existing Dask cluster
(``scheduler="tcp://HOST:PORT"``); the point function (:func:`run_point`) is the
same, the parent process writes every file, and only one point's table is in
memory at a time.

The names of the plan and the store that make up the sweep API (:func:`load_plan`,
:func:`load_sweep`, :func:`sweep_status`, ...) are importable from here too.
"""

from __future__ import annotations

import io
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from dynamics.sweep_plan import Grid, Point, SweepPlan, load_plan, parse_grid, parse_seeds
from dynamics.sweep_store import (
    SweepReport,
    SweepResults,
    gather,
    load_sweep,
    prepare_directory,
    scan,
    store_error,
    store_point,
    sweep_status,
)
from synthetic.validation import ParameterError, check_integer

__all__ = ["Grid", "Point", "SweepPlan", "SweepReport", "parse_grid", "parse_seeds",
           "load_plan", "run_sweep", "sweep_status", "gather", "load_sweep", "SweepResults",
           "run_point", "check_workers"]


# ----------------------------------------------------------------------------- one point


def run_point(config: dict, threads: int = 1) -> tuple[bytes, float]:
    """Run one point (a resolved config) and return its metrics as Parquet bytes
    and the wall time. Module-level so that process pools and Dask can ship it."""
    import torch

    from dynamics.experiment import run_experiment

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        frame = run_experiment(config, progress=False)
    finally:
        torch.set_num_threads(before)  # in-process (jobs = 1): leave the caller as it was
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue(), time.perf_counter() - start


# ----------------------------------------------------------------------------- running


def _local_executor(jobs: int):
    import multiprocessing

    # spawn: a forked child would inherit torch's thread pools mid-state.
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


def check_workers(jobs, threads) -> None:
    """``--jobs`` and ``--threads``, when given, must be integers >= 1 (checked before
    a sweep writes anything)."""
    if jobs is not None:
        check_integer("--jobs", jobs, ge=1)
    if threads is not None:
        check_integer("--threads", threads, ge=1)


def _probe_address(address: str, timeout: float) -> None:
    """Open (and close) a TCP connection to a ``tcp://`` or ``tls://`` scheduler address,
    so that a refused port or an unknown host is an error at once, not after the
    client's retries; other protocols (``inproc://``, ``ucx://``) are left to Dask."""
    import socket

    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    if scheme not in ("tcp", "tls"):
        return
    host, colon, port = rest.rstrip("/").rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ParameterError("--scheduler", address, "must look like tcp://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except socket.gaierror as err:
        raise ParameterError("--scheduler", address, f"is not reachable: unknown host "
                             f"({err.strerror})") from None
    except ConnectionRefusedError:
        raise ParameterError("--scheduler", address, "is not reachable: the connection was "
                             "refused (no scheduler listens there)") from None
    except (TimeoutError, socket.timeout):
        raise ParameterError("--scheduler", address, f"is not reachable within "
                             f"{timeout:g} s (no answer)") from None
    except OSError as err:
        raise ParameterError("--scheduler", address, f"is not reachable "
                             f"({err.strerror or type(err).__name__})") from None


def _handshake(address: str, timeout: float) -> None:
    """Open a Dask comm to ``address`` (its handshake) within ``timeout`` seconds: a
    host that accepts the connection but never answers (not a scheduler, or a hung
    one) is an error, where the client alone would wait forever. Runs in its own
    thread, so that it works with or without an event loop in the caller's."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect

    async def opened():
        comm = await connect(address, timeout=timeout)
        await comm.close()

    def run():
        asyncio.run(asyncio.wait_for(opened(), timeout))

    with ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(run).result()
        except (TimeoutError, asyncio.TimeoutError):
            raise ParameterError("--scheduler", address, f"is not reachable within "
                                 f"{timeout:.0f} s (connected, but no Dask scheduler "
                                 f"answered)") from None
        except (OSError, ValueError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ParameterError("--scheduler", address, f"is not reachable "
                                 f"({reason[:120]})") from None


def _connect(address: str, timeout: float = 6.0):
    """A Dask client of the scheduler at ``address``; a one-line error naming
    ``--scheduler`` at once if the port is refused, within ``timeout`` seconds (plus
    a moment) if the host or the scheduler does not answer."""
    try:
        from distributed import Client
    except ImportError:
        raise ParameterError("--scheduler", address, "needs dask.distributed: pip install "
                             "'prefdyn[dask]'") from None
    import logging

    start = time.monotonic()
    _probe_address(address, timeout)
    _handshake(address, max(1.0, timeout - (time.monotonic() - start)))
    left = max(1.0, timeout - (time.monotonic() - start))
    logging.getLogger("distributed").setLevel(logging.ERROR)
    try:
        return Client(address, timeout=f"{left:.1f}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ParameterError("--scheduler", address, f"is not reachable within {timeout:g} s "
                             f"({reason[:120]})") from None


def _completions(pending: list[Point], *, jobs: int, threads: int, scheduler: str | None,
                 client=None) -> Iterator[tuple[Point, bytes | None, float, BaseException | None]]:
    """Yield ``(point, payload, elapsed, error)`` as points finish."""
    if scheduler is not None:
        from distributed import as_completed

        futures = client.map(run_point, [p.config for p in pending], threads=threads,
                             key=[f"prefdyn-point-{p.id}" for p in pending], pure=False)
        by_key = {f.key: p for f, p in zip(futures, pending)}
        for future in as_completed(futures, loop=client.loop):
            point = by_key[future.key]
            try:
                payload, elapsed = future.result()
                yield point, payload, elapsed, None
            except Exception as err:  # noqa: BLE001 - a point's own failure
                yield point, None, 0.0, err
            future.release()
        return
    if jobs == 1:
        for point in pending:
            try:
                payload, elapsed = run_point(point.config, threads)
                yield point, payload, elapsed, None
            except Exception as err:  # noqa: BLE001
                yield point, None, 0.0, err
        return
    with _local_executor(jobs) as pool:
        # Keep at most 2 x jobs points in flight: memory stays flat in the number of points.
        queue = iter(pending)
        running = {}
        try:
            for point in itertools.islice(queue, 2 * jobs):
                running[pool.submit(run_point, point.config, threads)] = point
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    point = running.pop(future)
                    try:
                        payload, elapsed = future.result()
                        yield point, payload, elapsed, None
                    except Exception as err:  # noqa: BLE001
                        yield point, None, 0.0, err
                    nxt = next(queue, None)
                    if nxt is not None:
                        running[pool.submit(run_point, nxt.config, threads)] = nxt
        finally:
            for future in running:
                future.cancel()


def run_sweep(plan: SweepPlan, out: str | Path, *, jobs: int | None = None,
              threads: int | None = None, scheduler: str | None = None,
              retry_failed: bool = False, progress: bool = True,
              on_point: Callable[[str, str], None] | None = None) -> SweepReport:
    """Run the missing points of ``plan`` into ``out``, then gather ``results.parquet``.

    ``jobs`` local worker processes (default: the machine's cores, at most the
    number of points); ``threads`` torch threads per point (default: cores /
    jobs locally, 1 on a cluster); ``scheduler`` a Dask address (then ``jobs``
    is ignored). Returns the report, with ``computed`` = the ids run now.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    points = plan.points()
    manifest = plan.manifest()
    from dynamics.experiment import check_memory

    cores = os.cpu_count() or 1
    # every check before anything is written
    check_workers(jobs, threads)
    if scheduler is None:
        for point in points:
            check_memory(point.config, jobs=min(jobs or cores, len(points)))
    client = _connect(scheduler) if scheduler is not None else None
    try:
        prepare_directory(out, manifest)
        by_id = {p.id: p for p in points}
        report = scan(out, by_id)
        todo = report.missing + (list(report.failed) if retry_failed else [])
        pending = [by_id[pid] for pid in todo]
        if jobs is None:
            jobs = max(1, min(cores, len(pending)))
        if threads is None:
            threads = 1 if scheduler else max(1, cores // jobs)
        bar = tqdm(total=len(points), initial=len(points) - len(pending), unit="point",
                   desc="sweep", disable=not progress, file=sys.stderr, smoothing=0.1)
        computed, failures = [], 0
        try:
            for point, payload, elapsed, error in _completions(
                    pending, jobs=jobs, threads=threads, scheduler=scheduler, client=client):
                if error is None:
                    store_point(out / "points", point, payload, elapsed)
                    status = "done"
                else:
                    store_error(out / "points", point, error)
                    failures += 1
                    status = "failed"
                    bar.write(f"point {point.id} {_fmt(point.overrides)} failed: "
                              f"{type(error).__name__}: {error}", file=sys.stderr)
                computed.append(point.id)
                bar.update(1)
                if failures:
                    bar.set_postfix(failed=failures)
                if on_point is not None:
                    on_point(point.id, status)
        finally:
            bar.close()
        gather(out)
    finally:
        if client is not None:
            client.close()
    report = scan(out, by_id)
    report.computed = computed
    return report


def _fmt(overrides: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items())
