"""Sweep plans: the grids over config keys, the seeds, and the points they make.

A sweep is a base config (any ``prefdyn run`` config, optionally with a
``[sweep]`` table) and grids over its keys::

    [sweep]
    figure = "learning_curves"          # what `prefdyn figures` draws from it
    seeds = "0:8"                       # every point runs these seeds, batched
    [sweep.grid]
    "problem.behaviors.0.distinguishability" = [0.5, 1.0, 2.0, 4.0]
    "train.lr" = "0.05:0.8:5:log"       # START:STOP:NUM[:log]

:func:`load_plan` reads it (and the command line's ``--grid``, ``--seeds``,
``--set``) into a :class:`SweepPlan`, whose :meth:`~SweepPlan.points` are the
Cartesian product of the grids, each a resolved and validated config. A point's
``ID`` (:func:`point_id`) is a hash of its overrides, so it does not depend on
the order of the grids or on which points ran before. Running the points is
:mod:`dynamics.sweep`; their files, :mod:`dynamics.sweep_store`.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import tomllib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynamics.config import (
    BEHAVIOR_KEYS,
    PHASE_KEYS,
    PRINCIPLE_KEYS,
    SCHEMA,
    apply_override,
    descend,
    parse_config,
    read_toml,
)
from dynamics.objectives import OBJECTIVES
from synthetic.validation import ParameterError, check_integer, did_you_mean

__all__ = ["Grid", "Point", "SweepPlan", "parse_grid", "parse_seeds", "check_key", "point_id",
           "load_plan", "jsonable", "FORMAT", "SWEEP_KEYS"]

FORMAT = 1
"""Version of the manifest a plan writes (``sweep.json``)."""
SWEEP_KEYS = ("figure", "seeds", "grid")
"""The keys of a ``[sweep]`` table."""


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


def parse_seeds(spec, name: str = "--seeds") -> list[int]:
    """``"START:STOP"`` (STOP excluded), ``"a,b,c"``, a count ``N`` or a list; errors
    name ``name`` (``--seeds``, or ``sweep.seeds`` for the ``[sweep]`` table's)."""
    if isinstance(spec, list):
        seeds = spec
    elif isinstance(spec, int) and not isinstance(spec, bool):
        seeds = list(range(check_integer(name, spec, ge=1)))
    elif isinstance(spec, str) and ":" in spec:
        parts = spec.split(":")
        ends = [_scalar(p) for p in parts]
        if len(parts) != 2 or not all(isinstance(e, int) and not isinstance(e, bool)
                                      for e in ends):
            raise ParameterError(name, spec, "must look like START:STOP (integers)")
        if not 0 <= ends[0] < ends[1]:
            raise ParameterError(name, spec, "must have 0 <= START < STOP")
        seeds = list(range(*ends))
    elif isinstance(spec, str):
        seeds = [_scalar(p) for p in spec.split(",")]
        if len(seeds) == 1 and isinstance(seeds[0], int):
            return parse_seeds(seeds[0], name)
    else:
        raise ParameterError(name, spec, "must be START:STOP, a list or a count")
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                            for s in seeds):
        raise ParameterError(name, spec, "must be integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ParameterError(name, spec, "must not repeat a seed")
    return list(seeds)


def _same_number(value):
    """``value`` with every integral float as an int (``1.0`` → ``1``), in lists and
    tables too, so that values equal as numbers have one canonical form."""
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return int(value)
    if isinstance(value, dict):
        return {k: _same_number(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_same_number(v) for v in value]
    return value


def _canonical(value) -> str:
    """Canonical JSON of a value: sorted keys, and numbers equal as numbers (``1``,
    ``1.0``) written the same."""
    return json.dumps(_same_number(value), sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------- keys


def _key_paths(raw: dict) -> list[str]:
    """Every key a grid may set, given the base config's behaviors."""
    paths = [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys if k != "behaviors"]
    paths += sorted({f"train.objective.{k}" for o in OBJECTIVES.values() for k in o.hyper})
    behaviors = raw.get("problem", {}).get("behaviors", [])
    count = len(behaviors) if isinstance(behaviors, list) else 0
    paths += [f"problem.behaviors.{i}.{k}" for i in range(count) for k in BEHAVIOR_KEYS]
    paths += [f"problem.principles.{k}" for k in PRINCIPLE_KEYS]
    phases = raw.get("train", {}).get("phases", [])
    count = len(phases) if isinstance(phases, list) else 0
    paths += [f"train.phases.{i}.{k}" for i in range(count) for k in PHASE_KEYS]
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
                "base": jsonable(self.base_config()), "points": len(self.points())}


def jsonable(value):
    """``value`` as plain JSON types (arrays as lists, anything else unknown as str)."""
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
    given: set[str] = set()
    for item in grids:
        grid = parse_grid(item)
        if grid.key in given:
            raise ParameterError("--grid", grid.key, "is given twice; give each key once "
                                 "(KEY=V1,V2,...)")
        given.add(grid.key)
        merged[grid.key] = grid  # the command line wins over [sweep.grid]
    if seeds is not None:
        raw.setdefault("train", {})["seeds"] = parse_seeds(seeds)
    elif table.get("seeds") is not None:
        raw.setdefault("train", {})["seeds"] = parse_seeds(table["seeds"], "sweep.seeds")
    parse_config(copy.deepcopy(raw))  # the base itself must be valid
    for key in merged:
        check_key(key, raw)
        if key == "train.seeds":
            raise ParameterError("--grid", key, "is set with --seeds (every point runs all "
                                 "seeds, batched)")
    plan = SweepPlan(raw, list(merged.values()), figure, str(path))
    plan.points()
    return plan
