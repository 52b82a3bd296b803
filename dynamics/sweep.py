"""Parameter sweeps: the Cartesian product of grids over config keys, each point a run.

A sweep is a base config (any ``prefdyn run`` config, optionally with a
``[sweep]`` table) and grids over its keys::

    [sweep]
    figure = "learning_curves"          # what `prefdyn figures` draws from it
    seeds = "0:8"                       # every point runs these seeds, batched
    [sweep.grid]
    "problem.behaviors.0.distinguishability" = [0.5, 1.0, 2.0, 4.0]
    "train.lr" = "0.05:0.8:5:log"       # START:STOP:NUM[:log]

It is stored under one directory, and every file in it is written atomically
(a temporary file, then a rename), so a sweep killed at any moment loses at most
the points it was computing::

    DIR/sweep.json            the plan: base config, grids, seeds (a rerun must match)
    DIR/points/ID.parquet     one finished point: its tidy metrics, the swept keys
                              as columns, and ``point`` = ID
    DIR/points/ID.json        its overrides, resolved config and wall time
    DIR/points/ID.error.json  a point that raised: its error (the sweep goes on)
    DIR/results.parquet       every finished point in one tidy table (streamed)

``ID`` is a hash of the point's overrides, so it does not depend on the order
of the grids or on which points ran before. Running the same command again
computes only the points with neither a result nor an error file
(``retry_failed`` also reruns failed ones).

Points run on local cores (a process pool) or on an existing Dask cluster
(``scheduler="tcp://HOST:PORT"``); the point function is the same, the parent
process writes every file, and only one point's table is in memory at a time.
"""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import json
import math
import os
import sys
import time
import tomllib
import traceback
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dynamics.config import (
    BEHAVIOR_KEYS,
    SCHEMA,
    apply_override,
    descend,
    parse_config,
    read_toml,
)
from dynamics.io import atomic_write
from dynamics.objectives import OBJECTIVES
from synthetic.validation import ParameterError, check_integer, did_you_mean

__all__ = ["Grid", "Point", "SweepPlan", "SweepReport", "parse_grid", "parse_seeds",
           "load_plan", "run_sweep", "sweep_status", "gather", "load_sweep", "SweepResults",
           "run_point"]

MANIFEST = "sweep.json"
RESULTS = "results.parquet"
FORMAT = 1
SWEEP_KEYS = ("figure", "seeds", "grid")


# ----------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Grid:
    """One swept key and its values, in order."""

    key: str
    values: tuple

    def as_json(self) -> list:
        return [self.key, list(self.values)]


def _scalar(text: str):
    """A TOML scalar (number, boolean, quoted string) or, failing that, a bare word."""
    text = text.strip()
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _range(key: str, text: str) -> tuple:
    """``START:STOP:NUM[:log]``: NUM evenly spaced values, both ends included."""
    parts = text.split(":")
    rule = "must look like START:STOP:NUM or START:STOP:NUM:log"
    if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3].strip() != "log"):
        raise ParameterError(f"--grid {key}", text, rule)
    ends = [_scalar(p) for p in parts[:2]]
    if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in ends):
        raise ParameterError(f"--grid {key}", text, "must have numbers for START and STOP")
    if not all(math.isfinite(e) for e in ends):
        raise ParameterError(f"--grid {key}", text, "must have finite START and STOP")
    num = _scalar(parts[2])
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise ParameterError(f"--grid {key}", text, "must have an integer NUM >= 1")
    start, stop = ends
    if len(parts) == 4:
        if start <= 0 or stop <= 0:
            raise ParameterError(f"--grid {key}", text, "must have START, STOP > 0 for :log")
        values = np.geomspace(start, stop, num)
    else:
        values = np.linspace(start, stop, num)
    if num > 1 and start == stop:
        raise ParameterError(f"--grid {key}", text, "must have START != STOP when NUM > 1")
    integral = all(isinstance(e, int) for e in ends) and np.allclose(values, np.round(values))
    if integral:
        return tuple(int(v) for v in np.round(values))
    return tuple(float(v) for v in values)


def _values(key: str, spec) -> tuple:
    """Grid values from a list, a ``START:STOP:NUM[:log]`` string or a comma list."""
    if isinstance(spec, list):
        values = tuple(spec)
    elif isinstance(spec, str) and spec.count(":") >= 2:
        values = _range(key, spec)
    elif isinstance(spec, str):
        if not spec.strip():
            raise ParameterError(f"--grid {key}", spec, "must list at least one value")
        items = [item.strip() for item in spec.split(",")]
        if any(not item for item in items):
            raise ParameterError(f"--grid {key}", spec, "must not have an empty value "
                                 "between commas")
        values = tuple(_scalar(item) for item in items)
    else:
        values = (spec,)
    if not values:
        raise ParameterError(f"--grid {key}", list(values), "must list at least one value")
    numeric = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in values]
    if all(numeric) and any(isinstance(v, float) for v in values):
        values = tuple(float(v) for v in values)  # one column type per key
    if len(set(map(_canonical, values))) != len(values):
        raise ParameterError(f"--grid {key}", list(values), "must not repeat a value")
    return values


def parse_grid(text: str) -> Grid:
    """``KEY=V1,V2,...`` or ``KEY=START:STOP:NUM[:log]`` (values are TOML scalars)."""
    key, sep, spec = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ParameterError("--grid", text, "must look like KEY=V1,V2,... or "
                             "KEY=START:STOP:NUM[:log]")
    return Grid(key, _values(key, spec))


def parse_seeds(spec) -> list[int]:
    """``"START:STOP"`` (STOP excluded), ``"a,b,c"``, a count ``N`` or a list."""
    if isinstance(spec, list):
        seeds = spec
    elif isinstance(spec, int) and not isinstance(spec, bool):
        seeds = list(range(check_integer("--seeds", spec, ge=1)))
    elif isinstance(spec, str) and ":" in spec:
        parts = spec.split(":")
        ends = [_scalar(p) for p in parts]
        if len(parts) != 2 or not all(isinstance(e, int) and not isinstance(e, bool)
                                      for e in ends):
            raise ParameterError("--seeds", spec, "must look like START:STOP (integers)")
        if not 0 <= ends[0] < ends[1]:
            raise ParameterError("--seeds", spec, "must have 0 <= START < STOP")
        seeds = list(range(*ends))
    elif isinstance(spec, str):
        seeds = [_scalar(p) for p in spec.split(",")]
        if len(seeds) == 1 and isinstance(seeds[0], int):
            return parse_seeds(seeds[0])
    else:
        raise ParameterError("--seeds", spec, "must be START:STOP, a list or a count")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                            for s in seeds):
        raise ParameterError("--seeds", spec, "must be integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ParameterError("--seeds", spec, "must not repeat a seed")
    return list(seeds)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------- keys


def _key_paths(raw: dict) -> list[str]:
    """Every key a grid may set, given the base config's behaviors."""
    paths = [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys if k != "behaviors"]
    paths += sorted({f"train.objective.{k}" for o in OBJECTIVES.values() for k in o.hyper})
    behaviors = raw.get("problem", {}).get("behaviors", [])
    count = len(behaviors) if isinstance(behaviors, list) else 0
    paths += [f"problem.behaviors.{i}.{k}" for i in range(count) for k in BEHAVIOR_KEYS]
    return paths


def check_key(key: str, raw: dict) -> None:
    """A grid key must name a config key (closest valid name suggested otherwise)."""
    paths = _key_paths(raw)
    if key in paths:
        return
    raise ParameterError("--grid", key, f"is not a config key{did_you_mean(key, paths)}")


def _set(raw: dict, key: str, value) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else descend(node, part)
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Point:
    """One grid point: its id, the swept values and the resolved config."""

    id: str
    overrides: dict
    config: dict


def point_id(overrides: dict) -> str:
    """A 12-hex-digit hash of the overrides (independent of grid order)."""
    return hashlib.sha256(_canonical(overrides).encode()).hexdigest()[:12]


@dataclass
class SweepPlan:
    """A base config, its grids and seeds; :meth:`points` validates every point."""

    raw: dict
    grids: list[Grid]
    figure: str | None = None
    source: str = "<config>"
    _points: list[Point] | None = field(default=None, repr=False)

    @property
    def keys(self) -> list[str]:
        return [g.key for g in self.grids]

    def points(self) -> list[Point]:
        if self._points is None:
            points = []
            for combo in itertools.product(*(g.values for g in self.grids)):
                overrides = dict(zip(self.keys, combo))
                raw = copy.deepcopy(self.raw)
                for key, value in overrides.items():
                    _set(raw, key, value)
                config = parse_config(raw)
                points.append(Point(point_id(overrides), overrides, config))
            self._points = points
        return self._points

    def base_config(self) -> dict:
        return parse_config(copy.deepcopy(self.raw))

    def manifest(self) -> dict:
        return {"format": FORMAT, "figure": self.figure, "grids": [g.as_json() for g in self.grids],
                "base": _jsonable(self.base_config()), "points": len(self.points())}


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist")
                                 else str(v)))


def load_plan(path: str | Path, grids: Sequence[str] = (), seeds: str | None = None, *,
              overrides: Sequence[str] = (), text: str | None = None,
              figures: Collection[str] | None = None) -> SweepPlan:
    """Read a sweep config and merge command-line ``--grid``/``--seeds`` (they win);
    ``overrides`` (``KEY=VALUE``, as ``--set``) change the base config first.
    ``figures``: the names ``[sweep] figure`` may take (the CLI passes
    :data:`figures.FIGURES`; this layer does not import the figures); None accepts
    any name."""
    raw = read_toml(path, text)
    table = raw.pop("sweep", {})
    for item in overrides:
        apply_override(raw, item)
    if not isinstance(table, dict):
        raise ParameterError("sweep", table, "must be a table")
    for key in table:
        if key not in SWEEP_KEYS:
            raise ParameterError(f"sweep.{key}", key,
                                 f"is not a known key{did_you_mean(key, SWEEP_KEYS)}")
    figure = table.get("figure")
    if figure is not None and figures is not None and figure not in figures:
        raise ParameterError("sweep.figure", figure,
                             f"is not a known figure{did_you_mean(figure, figures)}")
    grid_table = table.get("grid", {})
    if not isinstance(grid_table, dict):
        raise ParameterError("sweep.grid", grid_table, "must be a table of KEY = values")
    merged = {key: Grid(key, _values(key, spec)) for key, spec in grid_table.items()}
    for item in grids:
        grid = parse_grid(item)
        merged[grid.key] = grid
    seed_spec = seeds if seeds is not None else table.get("seeds")
    if seed_spec is not None:
        raw.setdefault("train", {})["seeds"] = parse_seeds(seed_spec)
    parse_config(copy.deepcopy(raw))  # the base itself must be valid
    for key in merged:
        check_key(key, raw)
        if key == "train.seeds":
            raise ParameterError("--grid", key, "is set with --seeds (every point runs all "
                                 "seeds, batched)")
    plan = SweepPlan(raw, list(merged.values()), figure, str(path))
    plan.points()
    return plan


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


def _write_json(path: Path, record: dict) -> None:
    """``record`` as JSON (indent 1) at ``path``, atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))


def _store_point(points_dir: Path, point: Point, payload: bytes, elapsed: float) -> None:
    frame = pd.read_parquet(io.BytesIO(payload))
    for column in ("source", "behavior"):
        frame[column] = frame[column].astype(str)
    frame.insert(0, "point", point.id)
    for key, value in point.overrides.items():
        frame[key] = value
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    meta = {"point": point.id, "overrides": point.overrides, "elapsed_s": round(elapsed, 3),
            "config": _jsonable(point.config)}
    _write_json(points_dir / f"{point.id}.json", meta)
    atomic_write(points_dir / f"{point.id}.parquet", lambda p: p.write_bytes(buffer.getvalue()))
    (points_dir / f"{point.id}.error.json").unlink(missing_ok=True)


def _store_error(points_dir: Path, point: Point, error: BaseException) -> None:
    meta = {"point": point.id, "overrides": point.overrides,
            "error": f"{type(error).__name__}: {error}",
            "traceback": "".join(traceback.format_exception(error))}
    _write_json(points_dir / f"{point.id}.error.json", meta)


# ----------------------------------------------------------------------------- state


def _diff(a, b, path: str = "") -> str | None:
    """The first key path where two JSON values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{path}{key} is set in only one"
            found = _diff(a[key], b[key], f"{path}{key}.")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and path.endswith(
            "behaviors."):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _diff(x, y, f"{path}{i}.")
            if found:
                return found
        return None
    if a != b:
        return f"{path.rstrip('.')} is {short(a)} there, {short(b)} here"
    return None


def short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_manifest(out: Path, manifest: dict) -> bool:
    """True if ``out`` holds this sweep already; raise if it holds another."""
    path = out / MANIFEST
    if not path.exists():
        if out.exists() and any(p.name != ".DS_Store" for p in out.iterdir()):
            raise ParameterError("--out", str(out), "is not empty and holds no sweep; "
                                 "choose a new directory")
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ParameterError("--out", str(out), f"has an unreadable {MANIFEST} ({err})") from None
    if old.get("base") != manifest["base"]:
        reason = _diff(old.get("base", {}), manifest["base"]) or "the base config differs"
        raise ParameterError("--out", str(out), f"holds a sweep of a different config "
                             f"({reason}); choose another --out")
    if old.get("grids") != manifest["grids"]:
        there = ", ".join(f"{k}={len(v)} values" for k, v in old.get("grids", []))
        raise ParameterError("--out", str(out), f"holds a sweep over different grids "
                             f"({there or 'none'}); choose another --out")
    return True


@dataclass
class SweepReport:
    """What a directory holds for a plan: ids done, failed (id → error), missing."""

    done: list[str]
    failed: dict[str, str]
    missing: list[str]
    computed: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.done) + len(self.failed) + len(self.missing)

    def line(self) -> str:
        return (f"{len(self.done)} done, {len(self.failed)} failed, {len(self.missing)} "
                f"missing (of {self.total})")


def _scan(out: Path, ids: Iterable[str]) -> SweepReport:
    points = out / "points"
    done, failed, missing = [], {}, []
    for pid in ids:
        if (points / f"{pid}.parquet").exists():
            done.append(pid)
        elif (points / f"{pid}.error.json").exists():
            try:
                failed[pid] = json.loads((points / f"{pid}.error.json").read_text())["error"]
            except (OSError, ValueError, KeyError):
                failed[pid] = "unreadable error record"
        else:
            missing.append(pid)
    return SweepReport(done, failed, missing)


def sweep_status(out: str | Path) -> tuple[dict, SweepReport]:
    """The manifest of ``out`` and which of its points are done, failed, missing."""
    out = Path(out)
    path = out / MANIFEST
    if not path.exists():
        raise ParameterError("--status", str(out), f"holds no sweep (no {MANIFEST})")
    manifest = json.loads(path.read_text())
    grids = [Grid(k, tuple(v)) for k, v in manifest["grids"]]
    ids = [point_id(dict(zip([g.key for g in grids], combo)))
           for combo in itertools.product(*(g.values for g in grids))]
    return manifest, _scan(out, ids)


# ----------------------------------------------------------------------------- running


def _local_executor(jobs: int):
    import multiprocessing

    # spawn: a forked child would inherit torch's thread pools mid-state.
    return ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


def _connect(address: str, timeout: float = 8.0):
    try:
        from distributed import Client
    except ImportError:
        raise ParameterError("--scheduler", address, "needs dask.distributed: pip install "
                             "'prefdyn[dask]'") from None
    import logging

    logging.getLogger("distributed").setLevel(logging.ERROR)
    try:
        return Client(address, timeout=f"{timeout}s", set_as_default=False)
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
    cores = os.cpu_count() or 1
    client = _connect(scheduler) if scheduler is not None else None  # before writing anything
    try:
        existed = _check_manifest(out, manifest)
        (out / "points").mkdir(parents=True, exist_ok=True)
        for stale in (out / "points").glob(".*.tmp"):  # left by a killed sweep
            stale.unlink(missing_ok=True)
        if not existed:
            _write_json(out / MANIFEST, manifest)
        by_id = {p.id: p for p in points}
        report = _scan(out, by_id)
        todo = report.missing + (list(report.failed) if retry_failed else [])
        pending = [by_id[pid] for pid in todo]
        if jobs is None:
            jobs = max(1, min(cores, len(pending)))
        jobs = check_integer("--jobs", jobs, ge=1)
        if threads is None:
            threads = 1 if scheduler else max(1, cores // jobs)
        threads = check_integer("--threads", threads, ge=1)
        bar = tqdm(total=len(points), initial=len(points) - len(pending), unit="point",
                   desc="sweep", disable=not progress, file=sys.stderr, smoothing=0.1)
        computed, failures = [], 0
        try:
            for point, payload, elapsed, error in _completions(
                    pending, jobs=jobs, threads=threads, scheduler=scheduler, client=client):
                if error is None:
                    _store_point(out / "points", point, payload, elapsed)
                    status = "done"
                else:
                    _store_error(out / "points", point, error)
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
    report = _scan(out, by_id)
    report.computed = computed
    return report


def _fmt(overrides: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in overrides.items())


def gather(out: str | Path) -> Path:
    """Write ``results.parquet`` from every finished point, one point at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    manifest, report = sweep_status(out)
    files = [out / "points" / f"{pid}.parquet" for pid in report.done]
    target = out / RESULTS
    if not files:
        target.unlink(missing_ok=True)
        return target
    schemas = [pq.read_schema(f) for f in files]
    schema = pa.unify_schemas([sch.remove_metadata() for sch in schemas])
    if all(sch.names == schemas[0].names for sch in schemas):
        schema = schema.with_metadata(schemas[0].metadata)  # pandas dtypes (Int64 seed)

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, schema) as writer:
            for f in files:
                table = pq.read_table(f)
                for name in schema.names:
                    if name not in table.column_names:
                        table = table.append_column(name, pa.nulls(len(table),
                                                                   schema.field(name).type))
                writer.write_table(table.select(schema.names).cast(schema))

    return atomic_write(target, write)


# ----------------------------------------------------------------------------- reading


@dataclass
class SweepResults:
    """A finished (or partly finished) sweep, for figures and notebooks."""

    path: Path
    manifest: dict
    report: SweepReport

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.manifest["grids"]]

    @property
    def figure(self) -> str | None:
        return self.manifest.get("figure")

    def frame(self) -> pd.DataFrame:
        """The tidy results table (gathered again if points changed since)."""
        target = self.path / RESULTS
        if not target.exists() or any(
                (self.path / "points" / f"{p}.parquet").stat().st_mtime > target.stat().st_mtime
                for p in self.report.done):
            gather(self.path)
        if not target.exists():
            raise ParameterError("results", str(self.path), "has no finished points yet")
        return pd.read_parquet(target)

    def configs(self) -> dict[str, dict]:
        """Resolved config of every finished point, by point id."""
        return {pid: json.loads((self.path / "points" / f"{pid}.json").read_text())["config"]
                for pid in self.report.done}

    def overrides(self) -> dict[str, dict]:
        return {pid: json.loads((self.path / "points" / f"{pid}.json").read_text())["overrides"]
                for pid in self.report.done}

    def base_config(self) -> dict:
        return self.manifest["base"]


def load_sweep(path: str | Path) -> SweepResults:
    """Open a sweep directory written by :func:`run_sweep`."""
    manifest, report = sweep_status(path)
    return SweepResults(Path(path), manifest, report)
