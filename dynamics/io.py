"""Files and machines: atomic writes, the environment record, devices.

Every file the toolkit writes (a run's ``metrics.parquet``, a sweep's points, a
probe's tables, the feature cache) goes through :func:`atomic_write`, so a
process killed at any moment leaves either the old file or the new one, never a
half-written one. :func:`environment` is the ``env.json`` of a run and the
``environment`` of a probe's record; :func:`resolve_device` and
:func:`resolve_device_option` turn a configured device name into a
``torch.device``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from synthetic.validation import ParameterError, check_choice

__all__ = ["atomic_write", "write_json", "write_parquet", "environment", "resolve_device",
           "resolve_device_option"]


# ----------------------------------------------------------------------------- files


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write ``path`` whole or not at all; returns ``path`` (a :class:`~pathlib.Path`).

    ``write(tmp)`` creates and fills ``tmp``, a fresh name beside ``path`` (same
    directory, so the rename is atomic): ``.NAME.PID.HEX.tmp``, which a killed
    writer may leave behind and ``prefdyn sweep`` removes. Then ``tmp`` replaces
    ``path``. If ``write`` raises, ``tmp`` is removed and ``path`` is left as it
    was. The parent directory is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, record: dict) -> Path:
    """``record`` as indented JSON (values it cannot encode as ``str``) at ``path``,
    atomically."""
    text = json.dumps(record, indent=2, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_parquet(path: str | os.PathLike, frame) -> Path:
    """``frame`` (a pandas DataFrame) as Parquet at ``path``, without its index,
    atomically."""
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


# ----------------------------------------------------------------------------- machines


def resolve_device(name: str) -> torch.device:
    """The config's ``train.device``: ``cpu``, ``cuda`` (an error if absent) or ``auto``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParameterError("train.device", name, "needs a CUDA GPU, and torch sees none")
    return torch.device(name)


def resolve_device_option(device: str) -> torch.device:
    """The probes' ``--device``: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or
    ``cuda:N``; an error naming ``--device`` if it is none of these or absent here."""
    if isinstance(device, str) and device.startswith("cuda:") and device[5:].isdigit():
        choice = "cuda"
    else:
        choice = check_choice("--device", device, ("auto", "cpu", "cuda"))
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError("--device", device, "is not available here (no CUDA device); "
                                 "use auto or cpu")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ParameterError("--device", device, f"must name one of the "
                                 f"{torch.cuda.device_count()} CUDA devices")
    return torch.device(device)


def environment(device: str) -> dict:
    """Versions, git commit and device, for ``env.json``."""
    versions = {"python": platform.python_version()}
    for package in ("prefdyn", "torch", "numpy", "scipy", "pandas", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    dev = resolve_device(device)
    return {
        "versions": versions,
        "git_commit": commit,
        "device": str(dev),
        "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "command": sys.argv,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
