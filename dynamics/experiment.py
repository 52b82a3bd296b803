"""One experiment from a resolved config: theory and simulation, written to disk.

:func:`run_experiment` computes; :func:`write_run` writes ``metrics.parquet``
(atomically: a run that fails leaves no half-written file), the resolved
``config.toml`` and ``env.json``. Both are used by ``prefdyn run`` and
``prefdyn demo`` and are importable for notebooks.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from dynamics.analytic import population_descent
from dynamics.config import build_problem, dump_config
from dynamics.model import reference_weights
from dynamics.simulate import simulate
from synthetic.mixture import population_mixture

__all__ = ["run_experiment", "write_run", "resolve_device", "environment", "summary_table"]


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (an error if absent) or ``auto``."""
    from synthetic.validation import ParameterError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParameterError("train.device", name, "needs a CUDA GPU, and torch sees none")
    return torch.device(name)


def run_experiment(config: dict, *, progress: bool = True) -> pd.DataFrame:
    """Theory (if ``theory.population``) and simulation for a validated config.

    Returns the tidy metrics table (see :mod:`dynamics.metrics`).
    """
    problem = build_problem(config)
    model, train, theory = config["model"], config["train"], config["theory"]
    w0 = reference_weights(problem.dim, vocab_size=model["vocab_size"],
                           scale=model["init_scale"], seed=model["init_seed"],
                           given=model.get("reference"))
    frames = []
    steps = train["steps"]
    bar = tqdm(total=steps * (1 + theory["population"]), desc="prefdyn", unit="step",
               disable=not progress, leave=False, file=sys.stderr)
    try:
        if theory["population"]:
            trajectory = population_descent(
                population_mixture(problem), beta=train["beta"], lr=train["lr"], steps=steps,
                reference=w0, objective=train["objective"], continuous=theory["continuous"],
                eval_every=train["eval_every"], panel_width=theory["panel_width"],
                qmc_points=theory["qmc_points"],
            )
            frames.append(trajectory.frame())
            bar.update(steps)
        dtype = torch.float64 if train["dtype"] == "float64" else torch.float32
        result = simulate(
            problem, n=train["n"], seeds=train["seeds"], beta=train["beta"], lr=train["lr"],
            steps=steps, reference=w0, dtype=dtype, device=resolve_device(train["device"]),
            objective=train["objective"], batch_size=train.get("batch_size"),
            eval_every=train["eval_every"], progress=lambda k: bar.update(1),
        )
        frames.append(result.frame())
    finally:
        bar.close()
    return pd.concat(frames, ignore_index=True)


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
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "command": sys.argv,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_run(out: str | Path, config: dict, frame: pd.DataFrame) -> Path:
    """Write ``metrics.parquet``, ``config.toml`` and ``env.json`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(config["train"]["device"])
    _atomic_write(out / "config.toml", lambda p: Path(p).write_text(dump_config(config)))
    _atomic_write(out / "env.json", lambda p: Path(p).write_text(json.dumps(env, indent=2) + "\n"))
    _atomic_write(out / "metrics.parquet", lambda p: frame.to_parquet(p, index=False))
    return out


def _half_life(curve: pd.Series) -> float:
    """First step at which a loss curve has fallen half-way from its start to its end."""
    start, end = curve.iloc[0], curve.iloc[-1]
    if not end < start:
        return float("nan")
    reached = curve.index[curve <= start - (start - end) / 2]
    return float(reached[0])


def summary_table(frame: pd.DataFrame, problem) -> pd.DataFrame:
    """Per behavior: distinguishability, predicted priority rank, the step at which
    the loss is half-way down (theory; simulation mean), final loss and accuracy
    (theory; simulation mean ± sd over seeds), and max |theory − simulation| of
    the mean loss curve."""
    from dynamics.bounds import priority_scores

    rows = priority_scores(problem).set_index("behavior")[["distinguishability", "rank"]]
    sim = frame[frame["source"] == "simulation"]
    sim_curve = sim.groupby(["behavior", "step"], observed=True)["loss"].mean()
    last = sim[sim["step"] == sim["step"].max()].groupby("behavior", observed=True)
    rows["half_step_sim"] = sim_curve.groupby(level=0, observed=True).apply(
        lambda c: _half_life(c.droplevel(0)))
    rows["loss_sim"] = last["loss"].mean()
    rows["loss_sim_sd"] = last["loss"].std(ddof=1)
    rows["accuracy_sim"] = last["accuracy"].mean()
    theory = frame[frame["source"] == "theory"]
    if len(theory):
        th_curve = theory.set_index(["behavior", "step"])["loss"]
        final = theory[theory["step"] == theory["step"].max()].set_index("behavior")
        rows["half_step_theory"] = th_curve.groupby(level=0, observed=True).apply(
            lambda c: _half_life(c.droplevel(0)))
        rows["loss_theory"] = final["loss"]
        rows["accuracy_theory"] = final["accuracy"]
        rows["max_gap"] = (sim_curve - th_curve).abs().groupby(level=0, observed=True).max()
    return rows.reset_index()
