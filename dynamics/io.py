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

import errno
import json
import os
import platform
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from synthetic.validation import ParameterError, check_choice

__all__ = ["atomic_write", "atomic_write_all", "check_out", "write_json", "write_parquet",
           "environment", "resolve_device", "resolve_device_option", "MIN_FREE_BYTES"]

MIN_FREE_BYTES = 1 << 20
"""An output directory on a file system with less free space than this is refused
before anything is computed (:func:`check_out`)."""
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


# ----------------------------------------------------------------------------- files


def check_out(out, option: str = "--out") -> Path:
    """``out`` as a :class:`~pathlib.Path`, refused (a :class:`ParameterError` naming
    ``option``) unless it can become an output directory: not empty, not an existing
    file, not under a file, writable, and on a file system with at least
    :data:`MIN_FREE_BYTES` free. Creates nothing; call it before computing."""
    text = os.fspath(out) if out is not None else ""
    if not str(text).strip():
        raise ParameterError(option, str(text), "must name a directory (it is empty)")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ParameterError(option, str(out), "must be a directory, not an existing file")
    existing = path
    while not existing.exists():  # the nearest ancestor that exists
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise ParameterError(option, str(out), f"must not pass through the broken link "
                                 f"{existing}")
        existing = existing.parent
    if not existing.is_dir():
        raise ParameterError(option, str(out), f"must not lie under a file ({existing} is "
                             f"a file)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ParameterError(option, str(out), f"must be writable ({existing} is not)")
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        free = None
    if free is not None and free < MIN_FREE_BYTES:
        raise ParameterError(option, str(out), f"must be on a disk with free space ({free} "
                             f"bytes left on the disk of {existing})")
    return path


def _write_error(err: OSError, path: Path, option: str) -> ParameterError | None:
    """A full disk or a denied write as a one-line error naming ``option``."""
    if err.errno in _FULL:
        return ParameterError(option, str(path.parent), f"must have free space: the disk "
                              f"filled up while writing {path.name} (nothing half-written "
                              f"was kept)")
    if err.errno in _DENIED:
        return ParameterError(option, str(path.parent), f"must be writable: {path.name} "
                              f"could not be written ({err.strerror})")
    if isinstance(err, (NotADirectoryError, FileExistsError)):
        return ParameterError(option, str(path.parent), f"must be a directory "
                              f"({err.strerror}: {err.filename})")
    return None


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], *,
                 option: str = "--out") -> Path:
    """Write ``path`` whole or not at all; returns ``path`` (a :class:`~pathlib.Path`).

    ``write(tmp)`` creates and fills ``tmp``, a fresh name beside ``path`` (same
    directory, so the rename is atomic): ``.NAME.PID.HEX.tmp``, which a killed
    writer may leave behind and ``prefdyn sweep`` removes. Then ``tmp`` replaces
    ``path``. If ``write`` raises, ``tmp`` is removed and ``path`` is left as it
    was. The parent directory is created if missing. A full disk (``ENOSPC``), a
    denied write or a parent that is a file is a one-line :class:`ParameterError`
    naming ``option`` (the option that chose the directory).
    """
    return atomic_write_all({path: write}, option=option)[0]


def atomic_write_all(files: dict, *, option: str = "--out") -> list[Path]:
    """Write several files all or none: each ``write(tmp)`` of ``{path: write}`` fills
    its temporary first, and only when every one succeeded are they renamed into
    place, in the order given (renames do not fail for space). If any write fails,
    every temporary is removed and no ``path`` changes. Errors as
    :func:`atomic_write`."""
    paths = [Path(p) for p in files]
    done: list[Path] = []
    current = paths[0] if paths else Path(".")
    try:
        for path, write in zip(paths, files.values()):
            current = path
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            done.append(tmp)
            write(tmp)
        for tmp, path in zip(done, paths):
            current = path
            os.replace(tmp, path)
    except BaseException as err:
        for tmp in done:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            mapped = _write_error(err, current, option)
            if mapped is not None:
                raise mapped from None
        raise
    return paths


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
