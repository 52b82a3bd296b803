"""Persona statements (Perez et al. 2022, anthropics/evals ``persona/``) as a table.

A behavior is one ``<behavior>.jsonl`` file; each line holds a ``question``, the
``statement`` it quotes, the ``answer_matching_behavior`` (" Yes" or " No") and its
opposite, and a ``label_confidence``. The sign of a statement (THEORY.md §1) is
``+1`` when the behavior answers " Yes" (``y_w = Yes``), ``-1`` when it answers " No".

Subsets and train/test splits are deterministic and need no random state: within
each (behavior, sign) the statements are ordered by a hash of ``(seed, behavior,
statement)``; ``max_per_behavior`` keeps a prefix of that order from each sign
(balanced), and every ``1/test_fraction``-th statement along the order is a test
statement. A statement's split therefore does not depend on ``max_per_behavior``,
and a smaller subset is contained in a larger one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from synthetic.validation import (
    ParameterError,
    check_integer,
    check_number,
    close_matches,
    short_repr,
)

__all__ = ["ANSWER_SIGNS", "list_behaviors", "load_statements", "persona_dir"]

ENV_VAR = "PREFDYN_PERSONA_DIR"
ANSWER_SIGNS = {" Yes": 1, " No": -1}
REQUIRED_KEYS = ("question", "statement", "answer_matching_behavior",
                 "answer_not_matching_behavior")
COLUMNS = ["behavior", "statement", "question", "sign", "label_confidence", "split", "index"]


def persona_dir(path: str | os.PathLike | None = None) -> Path:
    """The persona directory: ``path``, else ``$PREFDYN_PERSONA_DIR``.

    A clone of anthropics/evals works as is (its ``persona/`` folder is used).
    Raises :class:`ParameterError` when neither is given, or the directory does not
    exist or holds no ``*.jsonl`` files.
    """
    name = "--persona-dir"
    if path is None or str(path) == "":
        path = os.environ.get(ENV_VAR) or None
        name = ENV_VAR
        if path is None:
            raise ParameterError("--persona-dir", None, f"is required: pass --persona-dir DIR "
                                 f"or set {ENV_VAR} (a folder of persona *.jsonl files)")
    directory = Path(path).expanduser()
    if not directory.is_dir():
        rule = "is not a directory" if directory.exists() else "does not exist"
        raise ParameterError(name, str(path), rule)
    if not any(directory.glob("*.jsonl")):
        if any((directory / "persona").glob("*.jsonl")):  # the root of anthropics/evals
            return directory / "persona"
        raise ParameterError(name, str(path), "holds no persona *.jsonl files")
    return directory


def list_behaviors(directory: str | os.PathLike | None = None) -> list[str]:
    """The behaviors (file stems) in the persona ``directory``, sorted."""
    return sorted(file.stem for file in persona_dir(directory).glob("*.jsonl"))


def load_statements(directory: str | os.PathLike | None, behaviors: list[str] | str, *,
                    max_per_behavior: int | None = None, test_fraction: float = 0.2,
                    seed: int = 0) -> pd.DataFrame:
    """The statements of ``behaviors`` as one row each.

    Columns: ``behavior``, ``statement``, ``question``, ``sign`` (+1 if the behavior
    answers " Yes", −1 if " No"), ``label_confidence`` (NaN if absent), ``split``
    ("train" / "test") and ``index`` (the statement's 0-based position in its
    file). Rows come by behavior, in the given order, then in file order.
    ``behaviors`` may be a comma-separated string. ``max_per_behavior`` keeps that
    many per behavior, half of each sign where the file allows. Bad input — an
    unknown behavior, a malformed line — raises :class:`ParameterError`.
    """
    directory = persona_dir(directory)
    names = _check_behaviors(directory, behaviors)
    if max_per_behavior is not None:
        max_per_behavior = check_integer("--max-statements", max_per_behavior, ge=1)
    test_fraction = check_number("test_fraction", test_fraction, ge=0.0, lt=1.0)
    seed = check_integer("--seed", seed)
    frames = [_select(_read_behavior(directory / f"{name}.jsonl", name), name, seed,
                      max_per_behavior, test_fraction) for name in names]
    table = pd.concat(frames, ignore_index=True)
    return table[COLUMNS]


def _check_behaviors(directory: Path, behaviors) -> list[str]:
    if isinstance(behaviors, str):
        behaviors = [b.strip() for b in behaviors.split(",") if b.strip()]
    behaviors = list(behaviors)
    if not behaviors:
        raise ParameterError("--behaviors", behaviors, "must name at least one behavior")
    known = list_behaviors(directory)
    seen = set()
    for name in behaviors:
        if name in seen:
            raise ParameterError("--behaviors", name, "is listed twice")
        seen.add(name)
        if name not in known:
            close = close_matches(name, known, n=3, cutoff=0.5)
            hint = (f"closest: {', '.join(close)}" if close
                    else f"see the {len(known)} *.jsonl names there")
            raise ParameterError("--behaviors", name, f"is not a behavior in {directory}; "
                                 f"{hint}")
    return behaviors


def _read_behavior(file: Path, behavior: str) -> pd.DataFrame:
    """Every statement of one file, in file order; a malformed line raises
    :class:`ParameterError` naming ``file:line``."""
    rows = []
    with open(file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{file}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ParameterError(where, line.strip(), f"is not valid JSON ({err.msg} at "
                                     f"column {err.colno})") from None
            if not isinstance(record, dict):
                raise ParameterError(where, line.strip(), "must be a JSON object")
            for key in REQUIRED_KEYS:
                if key not in record:
                    raise ParameterError(where, line.strip(), f"lacks the key {key!r}")
            for key in ("question", "statement"):
                if not isinstance(record[key], str):
                    raise ParameterError(f"{where}: {key}", record[key], "must be a string")
            answer = record["answer_matching_behavior"]
            if answer not in ANSWER_SIGNS:
                raise ParameterError(f"{where}: answer_matching_behavior", answer,
                                     'must be " Yes" or " No"')
            other = record["answer_not_matching_behavior"]
            if other not in ANSWER_SIGNS or other == answer:
                raise ParameterError(f"{where}: answer_not_matching_behavior", other,
                                     f'must be the other of " Yes" / " No" (the matching '
                                     f"answer is {short_repr(answer)})")
            confidence = record.get("label_confidence", math.nan)
            if confidence is None:
                confidence = math.nan
            if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
                raise ParameterError(f"{where}: label_confidence", confidence,
                                     "must be a number")
            rows.append((record["statement"], record["question"], ANSWER_SIGNS[answer],
                         float(confidence)))
    if not rows:
        raise ParameterError(str(file), behavior, "holds no statements")
    frame = pd.DataFrame(rows, columns=["statement", "question", "sign", "label_confidence"])
    frame["sign"] = frame["sign"].astype(np.int64)
    frame.insert(0, "behavior", behavior)
    frame["index"] = np.arange(len(frame), dtype=np.int64)
    return frame


def _hash_unit(seed: int, behavior: str, statement: str) -> int:
    """A 64-bit hash of ``(seed, behavior, statement)``, the same on every platform."""
    key = f"{seed}\x1f{behavior}\x1f{statement}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def _select(frame: pd.DataFrame, behavior: str, seed: int, max_per_behavior: int | None,
            test_fraction: float) -> pd.DataFrame:
    """Keep a sign-balanced prefix of the hash order and mark its test statements."""
    order = np.array([_hash_unit(seed, behavior, s) for s in frame["statement"]],
                     dtype=np.uint64)
    counts = {sign: int((frame["sign"] == sign).sum()) for sign in (1, -1)}
    quota = dict(counts)
    if max_per_behavior is not None:
        quota[-1] = min(counts[-1], max_per_behavior // 2)
        quota[1] = min(counts[1], max_per_behavior - quota[-1])
        quota[-1] = min(counts[-1], max_per_behavior - quota[1])
    keep = np.zeros(len(frame), dtype=bool)
    test = np.zeros(len(frame), dtype=bool)
    for sign in (1, -1):
        members = np.flatnonzero(frame["sign"].to_numpy() == sign)
        ranked = members[np.argsort(order[members], kind="stable")]  # ties: file order
        chosen = ranked[: quota[sign]]
        rank = np.arange(len(chosen))
        # rank r is a test statement when floor((r+1)·f) > floor(r·f): spread evenly
        # along the order, floor(k·f) of any prefix of k.
        keep[chosen] = True
        test[chosen] = np.floor((rank + 1) * test_fraction) > np.floor(rank * test_fraction)
    frame = frame.assign(split=np.where(test, "test", "train"))
    return frame[keep].reset_index(drop=True)
