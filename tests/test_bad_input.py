"""Bad input (issue 11): output paths, options checked before anything is written,
undecodable files, full key paths in messages, memory, an unreachable scheduler.

Each case ends in one line ``prefdyn: error: NAME = VALUE must RULE`` and exit
code 2, and nothing already written is lost."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from dynamics import experiment, io
from dynamics.cli import main
from dynamics.config import load_config, parse_config, read_toml
from dynamics.experiment import check_memory, estimate_memory, write_run
from dynamics.sweep import run_sweep
from dynamics.sweep_plan import load_plan, point_id
from synthetic.validation import ParameterError

pytestmark = pytest.mark.cli
ROOT = Path(__file__).resolve().parents[1]

SMALL = """
[problem]
dim = 3
[[problem.behaviors]]
name = "a"
distinguishability = 1.5
[[problem.behaviors]]
name = "b"
distinguishability = 1.0
[train]
steps = 4
n = 40
seeds = 2
[theory]
qmc_points = 256
"""

SWEEP = SMALL + """
[sweep]
[sweep.grid]
"train.beta" = [0.5, 1.0]
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(SMALL)
    return path


@pytest.fixture
def sweep_file(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP)
    return path


def one_error(capsys, *fragments) -> str:
    """The captured stderr: exactly one ``prefdyn: error:`` line holding ``fragments``."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefdyn: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err
    return lines[0]


def listing(path: Path) -> dict:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. --out


def _commands(config_file, sweep_file, out):
    return {
        "run": ["run", str(config_file), "--out", out, "--quiet"],
        "demo": ["demo", "--out", out, "--quiet"],
        "sweep": ["sweep", str(sweep_file), "--out", out, "--quiet", "--jobs", "1"],
        "figures": ["figures", "--out", out, "--quiet"],
        "probe": ["probe", "features", "--behaviors", "x", "--out", out, "--quiet"],
    }


@pytest.mark.parametrize("command", ["run", "demo", "sweep", "figures", "probe"])
def test_out_that_is_a_file_or_under_a_file_or_empty(command, config_file, sweep_file,
                                                     tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("keep me")
    for out, rule in [(str(file), "must be a directory, not an existing file"),
                      (str(file / "sub"), "must not lie under a file"),
                      ("", "must name a directory")]:
        argv = _commands(config_file, sweep_file, out)[command]
        start = time.perf_counter()
        assert main(argv) == 2, (command, out)
        one_error(capsys, "--out = ", rule)
        assert time.perf_counter() - start < 5  # refused before computing
    assert file.read_text() == "keep me"


def test_figures_runs_under_a_file_is_refused(tmp_path, capsys):
    file = tmp_path / "f"
    file.write_text("")
    assert main(["figures", "--out", str(tmp_path / "figs"), "--remake", "priority",
                 "--runs", str(file / "runs")]) == 2
    one_error(capsys, "--runs = ", "must not lie under a file")


@pytest.mark.parametrize("command", ["run", "demo", "sweep", "figures", "probe"])
def test_out_that_is_not_writable_or_on_a_full_disk(command, config_file, sweep_file,
                                                    tmp_path, capsys, monkeypatch):
    """Checked through os.access and shutil.disk_usage (tests may run as root, where
    permission bits do not stop a write; the real chmod case is the next test)."""
    out = tmp_path / "new" / "out"
    argv = _commands(config_file, sweep_file, str(out))[command]
    monkeypatch.setattr(io.os, "access", lambda path, mode: False)
    assert main(argv) == 2
    one_error(capsys, "--out = ", "must be writable")
    monkeypatch.undo()
    monkeypatch.setattr(io.shutil, "disk_usage", lambda path: type(
        "Usage", (), {"free": 4096, "total": 1 << 30, "used": 0})())
    assert main(argv) == 2
    one_error(capsys, "--out = ", "must be on a disk with free space (4096 bytes left")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: permission bits do not stop root's writes "
                    "(the monkeypatched os.access test covers the check)")
def test_read_only_directory(config_file, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["run", str(config_file), "--out", str(locked / "o"), "--quiet"]) == 2
        one_error(capsys, "must be writable")
    finally:
        locked.chmod(0o700)


def _disk_full(self, path, *args, **kwargs):
    with open(path, "wb") as handle:
        handle.write(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_while_writing_is_one_line_and_keeps_the_earlier_run(config_file, tmp_path,
                                                                       capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["run", str(config_file), "--out", str(out), "--quiet"]) == 0
    before = listing(out)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", _disk_full)
    assert main(["run", str(config_file), "--out", str(out), "--quiet",
                 "--set", "train.beta=2"]) == 2
    one_error(capsys, "--out = '", "must have free space", "metrics.parquet")
    assert listing(out) == before  # no new config.toml or env.json, no temporaries


def test_a_failed_metrics_write_leaves_no_config_or_env(config_file, tmp_path, monkeypatch):
    """A run directory never holds config.toml and env.json without metrics.parquet."""
    config = load_config(config_file)
    frame = pd.DataFrame({"x": [1.0]})
    monkeypatch.setattr(pd.DataFrame, "to_parquet", _disk_full)
    with pytest.raises(ParameterError, match="must have free space"):
        write_run(tmp_path / "fresh", config, frame)
    assert not any(p.is_file() for p in (tmp_path / "fresh").rglob("*"))
    monkeypatch.undo()

    def broken(config):
        raise RuntimeError("dump failed")

    monkeypatch.setattr(experiment, "dump_config", broken)
    with pytest.raises(RuntimeError):  # any other failure: the same, and it propagates
        write_run(tmp_path / "fresh", config, frame)
    assert not any(p.is_file() for p in (tmp_path / "fresh").rglob("*"))
    monkeypatch.undo()
    write_run(tmp_path / "fresh", config, frame)
    assert {p.name for p in (tmp_path / "fresh").iterdir()} == {"metrics.parquet",
                                                               "config.toml", "env.json"}


def test_disk_full_in_a_sweep_point_is_one_line(sweep_file, tmp_path, capsys, monkeypatch):
    from dynamics import sweep_store

    real = sweep_store.atomic_write

    def full(path, write, **kwargs):
        if str(path).endswith(".parquet"):
            return real(path, lambda p: _disk_full(None, p), **kwargs)
        return real(path, write, **kwargs)

    monkeypatch.setattr(sweep_store, "atomic_write", full)
    out = tmp_path / "s"
    assert main(["sweep", str(sweep_file), "--out", str(out), "--quiet", "--jobs", "1"]) == 2
    one_error(capsys, "--out = ", "must have free space")
    assert not list((out / "points").glob("*.tmp")) and not list((out / "points").glob(".*"))


# ----------------------------------------------------------------------------- 2. options


@pytest.mark.parametrize("option", [["--jobs", "0"], ["--threads", "0"], ["--jobs", "-2"]])
def test_bad_worker_counts_write_nothing_and_do_not_block_the_next_sweep(
        option, sweep_file, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", str(sweep_file), "--out", str(out), "--quiet", *option]) == 2
    one_error(capsys, f"{option[0]} = {option[1]} must be >= 1")
    assert not out.exists()
    assert main(["sweep", str(sweep_file), "--out", str(out), "--quiet", "--jobs", "1"]) == 0
    assert "2 done, 0 failed, 0 missing" in capsys.readouterr().out


def test_figures_bad_jobs_is_refused_before_running(tmp_path, capsys):
    assert main(["figures", "--out", str(tmp_path / "f"), "--remake", "priority",
                 "--runs", str(tmp_path / "runs"), "--jobs", "0"]) == 2
    one_error(capsys, "--jobs = 0 must be >= 1")
    assert not (tmp_path / "runs").exists()


def test_values_equal_as_numbers_are_the_same_point(tmp_path):
    assert point_id({"train.steps": 4}) == point_id({"train.steps": 4.0})
    assert point_id({"o": {"name": "cdpo", "epsilon": 0}}) == point_id(
        {"o": {"name": "cdpo", "epsilon": 0.0}})
    assert point_id({"train.beta": 0.5}) != point_id({"train.beta": 1})
    assert point_id({"t": True}) != point_id({"t": 1})
    ints = load_plan("<t>", ["train.beta=1,2"], text=SMALL)
    floats = load_plan("<t>", ["train.beta=1.0,2.0"], text=SMALL)
    assert [p.id for p in ints.points()] == [p.id for p in floats.points()]
    out = tmp_path / "s"
    run_sweep(ints, out, jobs=1, progress=False)
    report = run_sweep(floats, out, jobs=1, progress=False)
    assert report.computed == [] and len(report.done) == 2


def test_a_grid_key_given_twice_is_refused(sweep_file, tmp_path, capsys):
    with pytest.raises(ParameterError, match=r"--grid = 'train\.lr' is given twice"):
        load_plan("<t>", ["train.lr=0.1,0.2", "train.lr=0.3"], text=SMALL)
    assert main(["sweep", str(sweep_file), "--out", str(tmp_path / "s"), "--quiet",
                 "--grid", "train.lr=0.1,0.2", "--grid", "train.lr = 0.3"]) == 2
    one_error(capsys, "'train.lr' is given twice")
    assert not (tmp_path / "s").exists()
    # the command line still overrides the file's [sweep.grid] key (documented)
    assert load_plan(sweep_file, ["train.beta=3"]).grids[0].values == (3,)


# ----------------------------------------------------------------------------- 3. files


def test_a_config_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes(SMALL.replace('"a"', '"caf\xe9"').encode("latin-1"))
    with pytest.raises(ParameterError, match=r"config = .* must be UTF-8 text \(byte 0xe9 on "
                       r"line 5 is not\)"):
        read_toml(path)
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    one_error(capsys, "must be UTF-8 text")
    code, err = _subprocess("sweep", path, "--out", tmp_path / "s")
    assert code == 2 and "Traceback" not in err and "must be UTF-8" in err


def _subprocess(*args) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "dynamics.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers is not installed")

TINY_LLAMA = {"model_type": "llama", "vocab_size": 4, "hidden_size": 8,
              "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "architectures": ["LlamaForCausalLM"]}


def _tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"Yes": 0, "No": 1, "[UNK]": 2, "a": 3},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))


def _corrupt_models(root: Path) -> list[tuple[Path, str]]:
    garbage = root / "garbage-config"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    (garbage / "tokenizer.json").write_text("{}")
    (garbage / "model.safetensors").write_bytes(b"xx")
    truncated = root / "truncated-weights"
    truncated.mkdir()
    (truncated / "config.json").write_text(json.dumps(TINY_LLAMA))
    _tokenizer(truncated)
    (truncated / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    gguf = root / "truncated.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    return [(garbage, "has a config.json that cannot be read as JSON"),
            (truncated, "cannot be loaded as a causal LM"),
            (gguf, "cannot be loaded from GGUF")]


@needs_transformers
def test_corrupt_model_files_are_one_line(tmp_path):
    from llm_probes.model import load_model

    for path, rule in _corrupt_models(tmp_path):
        with pytest.raises(ParameterError) as err:
            load_model(path, device="cpu", cache_dir=tmp_path / "cache", progress=False)
        text = str(err.value)
        assert "\n" not in text and text.startswith("--model = '") and rule in text, text


@needs_transformers
def test_probe_with_a_corrupt_model_is_one_line_exit_2(tmp_path):
    persona = tmp_path / "persona"
    persona.mkdir()
    lines = [json.dumps({"question": f"Is it so?\n\"s {i}\"", "statement": f"s {i}",
                         "label_confidence": 0.9,
                         "answer_matching_behavior": " Yes" if i % 2 else " No",
                         "answer_not_matching_behavior": " No" if i % 2 else " Yes"})
             for i in range(12)]
    (persona / "agreeableness.jsonl").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PREFDYN_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    for path, rule in _corrupt_models(tmp_path):
        proc = subprocess.run(
            [sys.executable, "-m", "dynamics.cli", "probe", "features", "--behaviors",
             "agreeableness", "--persona-dir", str(persona), "--model", str(path), "--device",
             "cpu", "--out", str(tmp_path / "out"), "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and rule in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr


# ----------------------------------------------------------------------------- 4. key paths


@pytest.mark.parametrize("override, message", [
    ("problem.behaviors.1.name='a'",
     "problem.behaviors.1.name = 'a' must be unique (problem.behaviors.0 has it too)"),
    ("model.reference=[[1.0, 2.0], [1.0, 2.0]]", "model.reference = [[1.0, 2.0], [1.0, 2.0]] "
     "must have shape (2, 3)"),
    ("model.reference=[[1, 2, 3], [1, 2]]", "model.reference = [[1, 2, 3], [1, 2]] must be an "
     "array of numbers"),
    ("problem.behaviors.0.weight=0.001", "train.n = 40 must give every behavior a statement"),
    ("problem.cosines=[[1.0, 0.5], [0.5]]", "problem.cosines = [[1.0, 0.5], [0.5]] must be one "
     "number or a 2×2 matrix"),
])
def test_messages_name_the_full_key_path(override, message, config_file, tmp_path, capsys):
    assert main(["run", str(config_file), "--out", str(tmp_path / "o"), "--set", override]) == 2
    one_error(capsys, message)
    assert not (tmp_path / "o").exists()


def test_sweep_seeds_error_names_the_table_key_or_the_option(tmp_path, capsys):
    text = SWEEP.replace("[sweep]", '[sweep]\nseeds = "x"')
    with pytest.raises(ParameterError, match=r"^sweep\.seeds = 'x' must be integers"):
        load_plan("<t>", text=text)
    with pytest.raises(ParameterError, match=r"^--seeds = 'y' must be integers"):
        load_plan("<t>", seeds="y", text=text)  # the option wins, and is named
    assert load_plan("<t>", seeds="0:3", text=text).base_config()["train"]["seeds"] == [0, 1, 2]
    path = tmp_path / "c.toml"
    path.write_text(SWEEP.replace("[sweep]", '[sweep]\nseeds = "3:1"'))
    assert main(["sweep", str(path), "--out", str(tmp_path / "s"), "--quiet"]) == 2
    one_error(capsys, "sweep.seeds = '3:1' must have 0 <= START < STOP")


# ----------------------------------------------------------------------------- 5. memory


MEASURE = """
import sys
from pathlib import Path
from dynamics.config import load_config
from dynamics.experiment import estimate_memory, run_experiment
import torch  # noqa: F401 - imported before the baseline
config = load_config(sys.argv[1])
def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
run_experiment(config, progress=False)
print(estimate_memory(config), status("VmHWM") - before)
"""


@pytest.mark.parametrize("dtype, n, every", [("float32", 200_000, 50),
                                             ("float64", 150_000, 50),
                                             ("float32", 200, 1)])
def test_memory_estimate_is_within_a_factor_of_the_peak(tmp_path, dtype, n, every):
    """The estimate against the measured peak resident memory of a mid-size run (a
    fresh process, its peak RSS reset after the imports; Linux's /proc); the third
    case is dominated by the recorded metrics (many steps, small n)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak")
    path = tmp_path / "mid.toml"
    steps = 20 if every > 1 else 4000
    path.write_text(SMALL.replace("dim = 3", "dim = 16").replace("n = 40", f"n = {n}")
                    .replace("steps = 4", f"steps = {steps}\neval_every = {every}\n"
                             f"dtype = \"{dtype}\"").replace("seeds = 2", "seeds = 4")
                    + "population = false\nbounds = false\n")
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    estimate, peak = map(int, proc.stdout.split())
    assert estimate > 10 << 20  # a mid-size run, not noise
    assert 0.5 < estimate / peak < 2.5, (estimate, peak)


def test_too_much_memory_is_refused_before_work_starts(config_file, tmp_path, capsys,
                                                       monkeypatch):
    config = load_config(config_file, ["train.n=200000"])
    need = estimate_memory(config)
    monkeypatch.setattr(experiment, "available_memory", lambda device="cpu": need - 1)
    with pytest.raises(ParameterError, match=r"^train\.n = 200000 must be smaller: the run "
                       r"needs about .* of memory and .* are available; reduce train\.n, "
                       r"train\.seeds or problem\.dim"):
        check_memory(config)
    out = tmp_path / "o"
    assert main(["run", str(config_file), "--out", str(out), "--quiet",
                 "--set", "train.n=200000"]) == 2
    one_error(capsys, "train.n = 200000 must be smaller")
    assert not out.exists()
    # many recorded steps: the metrics dominate, and eval_every is the key named
    long = parse_config({**read_toml(config_file),
                         "train": {"steps": 200_000, "n": 40, "seeds": 2}})
    monkeypatch.setattr(experiment, "available_memory",
                        lambda device="cpu": estimate_memory(long) - 1)
    with pytest.raises(ParameterError, match=r"^train\.eval_every = 1 must be larger"):
        check_memory(long)
    # unknown available memory: no check
    monkeypatch.setattr(experiment, "available_memory", lambda device="cpu": None)
    check_memory(config)


def test_a_sweep_too_big_for_memory_writes_nothing(sweep_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiment, "available_memory", lambda device="cpu": 1000)
    out = tmp_path / "s"
    assert main(["sweep", str(sweep_file), "--out", str(out), "--quiet", "--jobs", "2"]) == 2
    one_error(capsys, "(2 at once)", "or --jobs")
    assert not out.exists()


def test_available_memory_reads_meminfo():
    available = experiment.available_memory("cpu")
    if not Path("/proc/meminfo").exists():
        assert available is None
    else:
        assert available is not None and available > 0


# ----------------------------------------------------------------------------- 6. scheduler


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.sweep
def test_a_refused_scheduler_port_errors_at_once(sweep_file, tmp_path, capsys):
    pytest.importorskip("distributed")
    address = f"tcp://127.0.0.1:{_closed_port()}"
    start = time.perf_counter()
    assert main(["sweep", str(sweep_file), "--out", str(tmp_path / "s"), "--quiet",
                 "--scheduler", address]) == 2
    assert time.perf_counter() - start < 2
    one_error(capsys, f"--scheduler = '{address}' is not reachable", "refused")
    assert not (tmp_path / "s").exists()


@pytest.mark.sweep
def test_a_silent_scheduler_errors_within_10_s(sweep_file, tmp_path, capsys):
    pytest.importorskip("distributed")
    with socket.socket() as server:  # listens (the kernel accepts) but never speaks
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        start = time.perf_counter()
        assert main(["sweep", str(sweep_file), "--out", str(tmp_path / "s"), "--quiet",
                     "--scheduler", address]) == 2
        assert time.perf_counter() - start < 10
    one_error(capsys, f"--scheduler = '{address}' is not reachable within")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("address", ["tcp://127.0.0.1", "tcp://:8786", "tcp://127.0.0.1:x"])
def test_a_malformed_scheduler_address(address, sweep_file, tmp_path, capsys):
    pytest.importorskip("distributed")
    assert main(["sweep", str(sweep_file), "--out", str(tmp_path / "s"), "--quiet",
                 "--scheduler", address]) == 2
    one_error(capsys, "must look like tcp://HOST:PORT")
