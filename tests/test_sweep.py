"""Sweeps: grid parsing and expansion (properties), each point equal to its own run,
resume after a kill (bit-equal to an uninterrupted sweep), Dask equal to local,
and the bad inputs of issue 3."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamics.config import parse_config
from dynamics.experiment import run_experiment
from dynamics.sweep import run_sweep
from dynamics.sweep_plan import Grid, SweepPlan, load_plan, parse_grid, parse_seeds, point_id
from dynamics.sweep_store import load_sweep, sweep_status
from synthetic.validation import ParameterError

ROOT = Path(__file__).resolve().parents[1]

TINY = """
[problem]
dim = 4
[[problem.behaviors]]
name = "a"
distinguishability = 1.0
[[problem.behaviors]]
name = "b"
distinguishability = 2.0
[train]
steps = 12
n = 48
seeds = 2
lr = 0.2
[theory]
qmc_points = 256
[sweep]
[sweep.grid]
"problem.behaviors.0.distinguishability" = [0.5, 1.5]
"train.beta" = "0.5:2:2:log"
"""


def tiny_plan(**kwargs) -> SweepPlan:
    return load_plan("<test>", text=TINY, **kwargs)


def sorted_frame(frame: pd.DataFrame) -> pd.DataFrame:
    keys = ["point", "source", "seed", "step", "behavior"]
    return frame.sort_values(keys, na_position="first").reset_index(drop=True)


# ----------------------------------------------------------------------------- parsing

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=60)
@given(st.lists(finite, min_size=1, max_size=6, unique=True))
def test_comma_list_round_trips(values):
    grid = parse_grid("train.beta=" + ",".join(repr(float(v)) for v in values))
    assert grid.key == "train.beta"
    assert list(grid.values) == [float(v) for v in values]


@settings(max_examples=60)
@given(st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), st.integers(2, 12), st.booleans())
def test_range_has_num_values_between_its_ends(start, stop, num, log):
    if np.isclose(start, stop):
        return
    grid = parse_grid(f"train.lr={start!r}:{stop!r}:{num}" + (":log" if log else ""))
    values = np.array(grid.values)
    assert len(values) == num
    assert values[0] == pytest.approx(start, rel=1e-12)
    assert values[-1] == pytest.approx(stop, rel=1e-12)
    steps = np.diff(np.log(values)) if log else np.diff(values)
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9, atol=1e-9 * abs(stop - start))


def test_integer_range_stays_integer():
    assert parse_grid("train.steps=100:400:4").values == (100, 200, 300, 400)
    assert parse_grid("train.steps=1:2:3").values == (1.0, 1.5, 2.0)


@settings(max_examples=40)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.randoms(use_true_random=False))
def test_expansion_is_the_cartesian_product(sizes, rnd):
    keys = ["train.beta", "train.lr", "problem.behaviors.0.distinguishability"][:len(sizes)]
    grids = [Grid(k, tuple(0.1 * (i + 1) for i in range(m))) for k, m in zip(keys, sizes)]
    plan = SweepPlan(load_plan("<t>", text=TINY).raw, grids)
    points = plan.points()
    assert len(points) == int(np.prod(sizes))
    combos = {tuple(p.overrides[k] for k in keys) for p in points}
    assert combos == set(itertools.product(*(g.values for g in grids)))
    assert len({p.id for p in points}) == len(points)
    for p in points:  # every point's config carries its values
        for key, value in p.overrides.items():
            node = p.config
            for part in key.split("."):
                node = node[int(part)] if isinstance(node, list) else node[part]
            assert node == value
    shuffled = grids[:]
    rnd.shuffle(shuffled)  # ids do not depend on the order of the grids
    again = SweepPlan(plan.raw, shuffled).points()
    assert {p.id for p in again} == {p.id for p in points}


@pytest.mark.parametrize("text, fragment", [
    ("train.beta", "must look like KEY="),
    ("train.beta=", "at least one value"),
    ("train.beta=1,,2", "empty value"),
    ("train.beta=1:2", None),  # a one-colon value is not a range: a string, refused later
    ("train.beta=1:2:0", "integer NUM >= 1"),
    ("train.beta=1:2:x", "integer NUM >= 1"),
    ("train.beta=a:b:3", "numbers for START and STOP"),
    ("train.beta=0:1:3:log", "START, STOP > 0"),
    ("train.beta=1:2:3:lin", "START:STOP:NUM"),
    ("train.beta=1,1", "must not repeat"),
    ("train.beta=2:2:3", "START != STOP"),
])
def test_malformed_grids_are_refused(text, fragment):
    if fragment is None:
        with pytest.raises(ParameterError, match="must be a number"):
            tiny_plan(grids=[text])
        return
    with pytest.raises(ParameterError, match=fragment):
        parse_grid(text)


def test_unknown_grid_key_suggests_the_closest():
    with pytest.raises(ParameterError, match=r"train\.betta.*did you mean 'train\.beta'"):
        tiny_plan(grids=["train.betta=1,2"])
    with pytest.raises(ParameterError, match="problem.behaviors.0.distinguishability"):
        tiny_plan(grids=["problem.behaviors.0.distinguishabilty=1,2"])
    with pytest.raises(ParameterError, match="is not a config key"):
        tiny_plan(grids=["problem.behaviors.5.sigma=1,2"])  # only 2 behaviors


def test_non_numeric_value_for_a_numeric_key():
    with pytest.raises(ParameterError, match=r"train\.lr = 'fast' must be a number"):
        tiny_plan(grids=["train.lr=0.1,fast"])
    with pytest.raises(ParameterError, match=r"train\.steps"):
        tiny_plan(grids=["train.steps=10,2.5"])


@pytest.mark.parametrize("spec, seeds", [("0:3", [0, 1, 2]), ("5:7", [5, 6]), ("4", [0, 1, 2, 3]),
                                         ("1,4,9", [1, 4, 9]), (3, [0, 1, 2])])
def test_seeds(spec, seeds):
    assert parse_seeds(spec) == seeds


@pytest.mark.parametrize("spec", ["3:1", "a:b", "1:2:3", "1,1", "-1", "x"])
def test_bad_seeds(spec):
    with pytest.raises(ParameterError, match="--seeds"):
        parse_seeds(spec)


def test_point_id_is_a_hash_of_the_overrides():
    a = point_id({"train.beta": 0.5, "train.lr": 0.1})
    assert a == point_id({"train.lr": 0.1, "train.beta": 0.5})
    assert a != point_id({"train.beta": 0.5, "train.lr": 0.2})


def test_figure_configs_parse():
    from figures import FIGURES, sweep_configs

    for name in FIGURES:
        for config in sweep_configs(name):
            assert config.exists(), f"{name}: missing {config}"
            plan = load_plan(config, figures=FIGURES)
            assert plan.figure == name, f"{config.name} names figure {plan.figure!r}"
            assert plan.points()


def test_unknown_figure_name_is_refused_when_the_names_are_given():
    from figures import FIGURES

    text = TINY.replace("[sweep]", '[sweep]\nfigure = "priorty"')
    with pytest.raises(ParameterError, match=r"sweep\.figure = 'priorty' is not a known "
                       r"figure \(did you mean 'priority'\?\)"):
        load_plan("<t>", text=text, figures=FIGURES)
    assert load_plan("<t>", text=text).figure == "priorty"  # dynamics knows no figures


# ----------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "s"
    report = run_sweep(tiny_plan(), out, jobs=1, threads=1, progress=False)
    return out, report


def test_each_point_is_its_own_run(finished):
    out, report = finished
    assert len(report.done) == 4 and not report.failed and not report.missing
    frame = load_sweep(out).frame()
    plan = tiny_plan()
    assert sorted(frame["point"].unique()) == sorted(p.id for p in plan.points())
    for point in plan.points():
        mine = frame[frame["point"] == point.id].reset_index(drop=True)
        direct = run_experiment(parse_config(json.loads(json.dumps(point.config))),
                                progress=False)
        for key, value in point.overrides.items():
            assert (mine[key] == value).all()
        for column in direct.columns:
            expected = direct[column].astype(str) if column in ("source", "behavior") else (
                direct[column])
            np.testing.assert_array_equal(mine[column].to_numpy(), expected.to_numpy(),
                                          err_msg=column)


def test_rerun_computes_nothing_and_a_lost_point_is_recomputed(finished, tmp_path):
    out, _ = finished
    again = run_sweep(tiny_plan(), out, jobs=1, threads=1, progress=False)
    assert again.computed == []
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    lost = again.done[1]
    (copy / "points" / f"{lost}.parquet").unlink()
    (copy / "points" / f".{lost}.parquet.123.tmp").write_bytes(b"half")  # a killed write
    report = run_sweep(tiny_plan(), copy, jobs=1, threads=1, progress=False)
    assert report.computed == [lost]
    assert not list((copy / "points").glob(".*.tmp"))
    pd.testing.assert_frame_equal(sorted_frame(load_sweep(copy).frame()),
                                  sorted_frame(load_sweep(out).frame()))


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    import dynamics.experiment as experiment

    real = experiment.run_experiment

    def flaky(config, **kwargs):
        if config["train"]["beta"] == 2.0 and config["problem"]["behaviors"][0][
                "distinguishability"] == 0.5:
            raise RuntimeError("injected failure")
        return real(config, **kwargs)

    monkeypatch.setattr(experiment, "run_experiment", flaky)
    report = run_sweep(tiny_plan(), tmp_path / "s", jobs=1, threads=1, progress=False)
    assert len(report.done) == 3 and len(report.failed) == 1
    [(pid, error)] = report.failed.items()
    assert error == "RuntimeError: injected failure"
    _, status = sweep_status(tmp_path / "s")
    assert (len(status.done), len(status.failed), len(status.missing)) == (3, 1, 0)
    assert set(load_sweep(tmp_path / "s").frame()["point"]) == set(report.done)
    monkeypatch.setattr(experiment, "run_experiment", real)
    assert run_sweep(tiny_plan(), tmp_path / "s", jobs=1, progress=False).computed == []
    retried = run_sweep(tiny_plan(), tmp_path / "s", jobs=1, retry_failed=True, progress=False)
    assert retried.computed == [pid] and len(retried.done) == 4 and not retried.failed


def test_a_directory_of_another_sweep_is_refused(finished):
    out, _ = finished
    before = sorted(p.name for p in (out / "points").iterdir())
    with pytest.raises(ParameterError, match=r"different config \(train\.lr is 0\.2 there, "
                       r"0\.1 here\)"):
        run_sweep(tiny_plan(overrides=["train.lr=0.1"]), out, jobs=1, progress=False)
    with pytest.raises(ParameterError, match="different grids"):
        run_sweep(tiny_plan(grids=["train.beta=1,3"]), out, jobs=1, progress=False)
    assert sorted(p.name for p in (out / "points").iterdir()) == before


def test_a_non_empty_directory_without_a_sweep_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ParameterError, match="holds no sweep"):
        run_sweep(tiny_plan(), tmp_path, jobs=1, progress=False)


@pytest.mark.sweep
def test_process_pool_equals_in_process(finished, tmp_path):
    out, _ = finished
    report = run_sweep(tiny_plan(), tmp_path / "pool", jobs=2, threads=1, progress=False)
    assert len(report.computed) == 4
    pd.testing.assert_frame_equal(sorted_frame(load_sweep(tmp_path / "pool").frame()),
                                  sorted_frame(load_sweep(out).frame()))


@pytest.mark.sweep
def test_dask_local_cluster_equals_local(finished, tmp_path):
    distributed = pytest.importorskip("distributed")
    out, _ = finished
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  protocol="tcp", dashboard_address=None) as cluster:
        report = run_sweep(tiny_plan(), tmp_path / "dask", threads=1,
                           scheduler=cluster.scheduler_address, progress=False)
    assert len(report.computed) == 4 and not report.failed
    pd.testing.assert_frame_equal(sorted_frame(load_sweep(tmp_path / "dask").frame()),
                                  sorted_frame(load_sweep(out).frame()))


@pytest.mark.sweep
def test_unreachable_scheduler_fails_fast_and_writes_nothing(tmp_path):
    pytest.importorskip("distributed")
    start = time.perf_counter()
    with pytest.raises(ParameterError, match=r"--scheduler = 'tcp://127\.0\.0\.1:9' is not "
                       r"reachable: the connection was refused"):
        run_sweep(tiny_plan(), tmp_path / "never", scheduler="tcp://127.0.0.1:9",
                  progress=False)
    assert time.perf_counter() - start < 2  # issue 11: a refused port errors at once
    assert not (tmp_path / "never").exists()


# ----------------------------------------------------------------------------- the command


@pytest.mark.sweep
def test_killed_sweep_resumes_each_point_exactly_once(tmp_path, finished):
    """Kill `prefdyn sweep` midway (SIGKILL, no clean-up), run the same command
    again: only the missing points run, and the result is bit-equal to an
    uninterrupted sweep."""
    config = tmp_path / "sweep.toml"
    config.write_text(TINY.replace("[0.5, 1.5]", "[0.5, 1.0, 1.5, 2.0, 2.5, 3.0]").replace(
        "steps = 12", "steps = 400"))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "dynamics.cli", "sweep", str(config), "--out", str(out),
               "--jobs", "1", "--threads", "1", "--quiet"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    points = out / "points"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(points.glob("*.parquet"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    done_before = {p.stem for p in points.glob("*.parquet")}
    assert 3 <= len(done_before) < 12, "the kill did not land mid-sweep"
    assert not (out / "results.parquet").exists()

    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"computed {12 - len(done_before)} now" in result.stdout
    assert "12 done, 0 failed, 0 missing" in result.stdout

    whole = tmp_path / "whole"
    run_sweep(load_plan(config), whole, jobs=1, threads=1, progress=False)
    resumed, reference = load_sweep(out).frame(), load_sweep(whole).frame()
    sizes = resumed.groupby("point").size()
    assert len(sizes) == 12 and (sizes == sizes.iloc[0]).all()  # each point exactly once
    pd.testing.assert_frame_equal(sorted_frame(resumed), sorted_frame(reference),
                                  check_exact=True)


@pytest.mark.cli
def test_cli_status_and_errors(finished, tmp_path, capsys):
    from dynamics.cli import main

    out, _ = finished
    assert main(["sweep", "--status", str(out)]) == 0
    assert "4 done, 0 failed, 0 missing (of 4)" in capsys.readouterr().out
    config = tmp_path / "c.toml"
    config.write_text(TINY)
    for args, message in [
        (["--grid", "train.betta=1,2"], "did you mean 'train.beta'"),
        (["--grid", "train.beta=1:2:0"], "integer NUM >= 1"),
        (["--grid", "train.lr=0.1,abc"], "must be a number"),
        (["--seeds", "3:1"], "--seeds"),
        (["--set", "train.lr=0.1"], "different config"),
    ]:
        target = out if "different config" in message else tmp_path / "x"
        code = main(["sweep", str(config), "--out", str(target), "--quiet", *args])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("prefdyn: error: ") and message in lines[0]
        assert not (tmp_path / "x").exists()
    assert main(["sweep", "--status", str(tmp_path)]) == 2
    assert "holds no sweep" in capsys.readouterr().err


GATHER_PEAK = """
import json, sys
from pathlib import Path
import numpy as np, pandas as pd, pyarrow as pa
from dynamics.sweep_plan import point_id
from dynamics.sweep_store import MANIFEST, gather
out, count, rows = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
(out / "points").mkdir(parents=True)
values = list(range(count))
(out / MANIFEST).write_text(json.dumps({"format": 1, "grids": [["train.steps", values]],
                                        "base": {}, "figure": None}))
rng = np.random.default_rng(0)
for v in values:
    frame = pd.DataFrame({"point": point_id({"train.steps": v}), "step": np.arange(rows),
                          "loss": rng.random(rows), "accuracy": rng.random(rows)})
    frame.to_parquet(out / "points" / f"{point_id({'train.steps': v})}.parquet", index=False)
del frame
gather(out)
peak = pa.default_memory_pool().max_memory()
import pyarrow.parquet as pq
assert pq.ParquetFile(out / "results.parquet").metadata.num_rows == count * rows
print(peak)
"""


@pytest.mark.sweep
def test_gathering_results_streams_one_point_at_a_time(tmp_path):
    """Arrow's peak allocation while gathering 40 points is that of a few points,
    not 10 times that of 4 points: results stream from the point files to disk."""
    peaks = {}
    for count in (4, 40):
        result = subprocess.run([sys.executable, "-c", GATHER_PEAK, str(tmp_path / str(count)),
                                 str(count), "20000"], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        peaks[count] = int(result.stdout.split()[-1])
    one_point = 20000 * (8 + 8 + 8 + 13)  # bytes of one point's columns, roughly
    assert peaks[40] < 2 * peaks[4], peaks
    assert peaks[40] < 8 * one_point, peaks


@pytest.mark.cli
def test_cli_figures_draws_what_the_sweep_names(tmp_path, capsys):
    from dynamics.cli import main

    config = tmp_path / "fig.toml"
    config.write_text(TINY.replace("[sweep]", '[sweep]\nfigure = "distinguishability"'))
    assert main(["sweep", str(config), "--out", str(tmp_path / "s"), "--jobs", "1",
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["figures", str(tmp_path / "s"), "--out", str(tmp_path / "img")]) == 0
    written = capsys.readouterr().out.split()
    assert {Path(p).name for p in written if p.endswith((".png", ".pdf"))} == {
        "fig1_distinguishability.png", "fig1_distinguishability.pdf"}
    assert (tmp_path / "img" / "fig1_distinguishability.png").read_bytes()[:4] == b"\x89PNG"

    for args, message in [
        (["figures", str(tmp_path / "none"), "--out", str(tmp_path / "o")], "holds no sweep"),
        (["figures", "--remake", "priorty", "--out", str(tmp_path / "o")],
         "did you mean 'priority'"),
        (["figures", "--out", str(tmp_path / "o")], "needs sweep directories or --remake"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    unnamed = tmp_path / "unnamed"
    run_sweep(tiny_plan(grids=["train.beta=1"]), unnamed, jobs=1, progress=False)
    assert main(["figures", str(unnamed), "--out", str(tmp_path / "o")]) == 2
    assert "no [sweep] figure" in capsys.readouterr().err


def test_grids_reach_the_principles_and_each_phases_keys():
    """``problem.principles.*`` and ``train.phases.N.*`` (for the base config's phases)
    are grid keys: each point's config carries the value; a phase the base config does
    not have is not."""
    text = PHASED
    plan = load_plan("<t>", ["problem.principles.cosine=0.2,0.9", "train.phases.1.n=10,40"],
                     text=text)
    values = sorted((p.config["problem"]["principles"]["cosine"],
                     p.config["train"]["phases"][1]["n"]) for p in plan.points())
    assert values == [(0.2, 10), (0.2, 40), (0.9, 10), (0.9, 40)]
    with pytest.raises(ParameterError, match="is not a config key"):
        load_plan("<t>", ["train.phases.2.n=10,40"], text=text)


PHASED = """
[problem]
dim = 4
[problem.principles]
cosine = 0.5
[[problem.behaviors]]
name = "a"
distinguishability = 2.0
[[problem.behaviors]]
name = "b"
distinguishability = 2.0
[train]
n = 100
seeds = 1
[[train.phases]]
objective = "reward_model"
steps = 3
behaviors = ["b"]
pretraining = true
[[train.phases]]
objective = "reward_model"
steps = 3
behaviors = ["a"]
"""
