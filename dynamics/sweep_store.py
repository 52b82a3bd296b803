"""A sweep's directory: how points are stored, what is done, and reading the results.

Every file under a sweep directory is written atomically
(:func:`dynamics.io.atomic_write`: a temporary file, then a rename), so a sweep
killed at any moment loses at most the points it was computing::

    DIR/sweep.json            the plan: base config, grids, seeds (a rerun must match)
    DIR/points/ID.parquet     one finished point: its tidy metrics, the swept keys
                              as columns, and ``point`` = ID
    DIR/points/ID.json        its overrides, resolved config and wall time
    DIR/points/ID.error.json  a point that raised: its error (the sweep goes on)
    DIR/results.parquet       every finished point in one tidy table (streamed)

A point with neither a result nor an error file is missing: that is what a rerun
computes (:func:`dynamics.sweep.run_sweep`). :func:`load_sweep` opens a directory
for figures and notebooks (:class:`SweepResults`).
"""

from __future__ import annotations

import io
import itertools
import json
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from dynamics.io import atomic_write
from dynamics.sweep_plan import Grid, Point, jsonable, point_id
from synthetic.validation import ParameterError

__all__ = ["MANIFEST", "RESULTS", "SweepReport", "SweepResults", "gather", "load_sweep",
           "prepare_directory", "scan", "store_error", "store_point", "sweep_status"]

MANIFEST = "sweep.json"
RESULTS = "results.parquet"


# ----------------------------------------------------------------------------- points


def _write_json(path: Path, record: dict) -> None:
    """``record`` as JSON (indent 1) at ``path``, atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(record, indent=1) + "\n"))


def store_point(points_dir: Path, point: Point, payload: bytes, elapsed: float) -> None:
    """Write a finished point: ``ID.json`` (overrides, wall time, config), then
    ``ID.parquet`` (its metrics from the Parquet ``payload``, with ``point`` and the
    swept keys as columns); an earlier ``ID.error.json`` is removed."""
    frame = pd.read_parquet(io.BytesIO(payload))
    for column in ("source", "behavior"):
        frame[column] = frame[column].astype(str)
    frame.insert(0, "point", point.id)
    for key, value in point.overrides.items():
        # a swept table or list (train.objective = { name = "cdpo", epsilon = 0.1 }) is
        # one value per point: stored as its canonical JSON text, not spread over rows
        frame[key] = (json.dumps(value, sort_keys=True, separators=(",", ":"))
                      if isinstance(value, (dict, list)) else value)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    meta = {"point": point.id, "overrides": point.overrides, "elapsed_s": round(elapsed, 3),
            "config": jsonable(point.config)}
    _write_json(points_dir / f"{point.id}.json", meta)
    atomic_write(points_dir / f"{point.id}.parquet", lambda p: p.write_bytes(buffer.getvalue()))
    (points_dir / f"{point.id}.error.json").unlink(missing_ok=True)


def store_error(points_dir: Path, point: Point, error: BaseException) -> None:
    """Write ``ID.error.json``: a point that raised, its error and traceback."""
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


def prepare_directory(out: Path, manifest: dict) -> None:
    """Make ``out`` the directory of the sweep ``manifest`` before any point runs:
    refuse one that holds anything else (:func:`_check_manifest`), create
    ``points/``, remove the temporary files a killed sweep left there, and write
    ``sweep.json`` if the sweep is new."""
    existed = _check_manifest(out, manifest)
    (out / "points").mkdir(parents=True, exist_ok=True)
    for stale in (out / "points").glob(".*.tmp"):  # left by a killed sweep
        stale.unlink(missing_ok=True)
    if not existed:
        _write_json(out / MANIFEST, manifest)


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


def scan(out: Path, ids: Iterable[str]) -> SweepReport:
    """Which of the points ``ids`` of the sweep in ``out`` are done, failed or missing."""
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
    return manifest, scan(out, ids)


# ----------------------------------------------------------------------------- results


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
    """Open a sweep directory written by :func:`dynamics.sweep.run_sweep`."""
    manifest, report = sweep_status(path)
    return SweepResults(Path(path), manifest, report)
