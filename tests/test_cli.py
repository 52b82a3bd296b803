"""End-to-end runs of the ``prefdyn`` command: outputs, overrides, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import numpy as np
import pandas as pd
import pytest

from dynamics.cli import main
from dynamics.config import config_reference, load_config

pytestmark = pytest.mark.cli

SMALL = """
[problem]
dim = 3

[[problem.behaviors]]
name = "a"
distinguishability = 1.5

[[problem.behaviors]]
name = "b"
mu_pos = [0.0, 1.0, 0.0]
mu_neg = [0.0, -1.0, 0.0]
cov_pos = [[1.0, 0.2, 0.0], [0.2, 1.0, 0.0], [0.0, 0.0, 0.5]]

[train]
steps = 5
n = 40
seeds = 2
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(SMALL)
    return path


def run_cli(*args) -> tuple[int, str]:
    """Run ``prefdyn`` in a subprocess (real exit code and stderr)."""
    proc = subprocess.run([sys.executable, "-m", "dynamics.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def test_run_writes_tidy_metrics_config_and_env(config_file, tmp_path):
    out = tmp_path / "out"
    assert main(["run", str(config_file), "--out", str(out), "--quiet",
                 "--set", "train.beta=0.5"]) == 0
    frame = pd.read_parquet(out / "metrics.parquet")
    # one row per source × seed × step × behavior: theory 1 × 6 × 2, simulation 2 × 6 × 2
    assert len(frame) == 12 + 24
    counts = frame.groupby("source", observed=True).size()
    assert counts["theory"] == 12 and counts["simulation"] == 24
    for column in ("source", "seed", "step", "t", "behavior", "loss", "accuracy",
                   "reward_accuracy", "weight_change", "rewards/chosen", "rewards/rejected",
                   "rewards/margins"):
        assert column in frame.columns
    assert frame["seed"][frame["source"] == "theory"].isna().all()
    assert set(frame["seed"].dropna()) == {0, 1}
    np.testing.assert_allclose(frame["t"], frame["lr"] * frame["step"])
    # every run starts at the reference: DPO loss log 2 exactly at step 0
    np.testing.assert_allclose(frame.loc[frame["step"] == 0, "loss"], np.log(2), rtol=1e-6)
    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["train"]["beta"] == 0.5 and resolved["train"]["seeds"] == [0, 1]
    env = json.loads((out / "env.json").read_text())
    assert env["versions"]["torch"] and env["device"] == "cpu"


def test_resolved_config_reruns_to_identical_metrics(config_file, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["run", str(config_file), "--out", str(first), "--quiet"]) == 0
    assert main(["run", str(first / "config.toml"), "--out", str(second), "--quiet"]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(first / "metrics.parquet"),
                                  pd.read_parquet(second / "metrics.parquet"))


BAD_INPUT = [
    ("train.beta=0", "train.beta = 0.0 must be > 0"),
    ("train.lr=-1", "train.lr = -1.0 must be > 0"),
    ("train.steps=0", "train.steps = 0 must be >= 1"),
    ("train.n=1", "train.n = 1 must be >= 2"),
    ("train.batch_size=41", "train.batch_size = 41 must be <= train.n = 40"),
    ("train.objective='dop'", "did you mean 'dpo'"),
    ("problem.family='gausian'", "did you mean 'gaussian'"),
    ("train.bta=1", "train.bta = 'bta' is not a known key (did you mean 'beta'?)"),
    ("problem.behaviors.1.cov_pos=[[1.0, 0.5, 0.0], [0.4, 1.0, 0.0], [0.0, 0.0, 1.0]]",
     "problem.behaviors.1.cov_pos = [[1.0, 0.5, 0.0], [0.4, 1.0, 0.0], [0.0, 0.0, 1.0]] must be "
     "symmetric"),
    ("problem.behaviors.1.cov_pos=[[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]",
     "must be positive semi-definite"),
    ("problem.behaviors.1.mu_pos=[1.0, 2.0]", "problem.behaviors.1.mu_pos = [1.0, 2.0] must "
     "have length dim = 3"),
    ("problem.behaviors.1.cov_pos=[[1.0, 0.0], [0.0, 1.0]]", "must have shape (3, 3)"),
    ("problem.behaviors.1.mu_neg=[nan, 0.0, 0.0]", "must have finite entries"),
    ("problem.behaviors.0.distinguishability=-1", "must be >= 0"),
]


@pytest.mark.parametrize("override, message", BAD_INPUT)
def test_bad_input_is_one_line_exit_2(config_file, tmp_path, capsys, override, message):
    out = tmp_path / "out"
    assert main(["run", str(config_file), "--out", str(out), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefdyn: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (out / "metrics.parquet").exists()


def test_malformed_toml_names_its_line(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[problem]\ndim = 3\nfamily = = 'x'\n")
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not valid TOML" in err and "line 3" in err and err.count("\n") == 1


def test_unreadable_config(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_subprocess_exit_code_and_no_traceback(config_file, tmp_path):
    code, err = run_cli("run", config_file, "--out", tmp_path / "o", "--set", "train.beta=-2")
    assert code == 2
    assert "Traceback" not in err and "train.beta = -2.0 must be > 0" in err


def test_failure_midway_keeps_previous_metrics(config_file, tmp_path, monkeypatch):
    """A run that fails while writing leaves the earlier metrics.parquet whole."""
    out = tmp_path / "out"
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 0
    before = (out / "metrics.parquet").read_bytes()

    def broken(self, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", broken)
    with pytest.raises(OSError):
        main(["run", str(config_file), "--out", str(out), "--quiet", "--set", "train.beta=2"])
    assert (out / "metrics.parquet").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_readme_documents_every_config_key():
    """The README's config reference is generated from the schema and kept current."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert config_reference() in readme


def test_demo_config_is_valid_and_distinguishabilities_differ():
    from dynamics.cli import demo_config_text
    from dynamics.config import build_problem

    problem = build_problem(load_config(None, text=demo_config_text()))
    deltas = sorted(b.distinguishability for b in problem.behaviors)
    assert len(deltas) == 3 and len(set(deltas)) == 3


def test_closed_stdout_ends_quietly(config_file, tmp_path):
    """`prefdyn run ... | head -0`: no traceback when the reader goes away."""
    proc = subprocess.Popen([sys.executable, "-m", "dynamics.cli", "run", str(config_file),
                             "--out", str(tmp_path / "o")],  # not quiet: it prints at the end
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is printed
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1  # main's BrokenPipeError exit, not a crash
    assert "Traceback" not in err, err
    assert (tmp_path / "o" / "metrics.parquet").exists()
