"""``train.objective`` (a name or a table), ``[[train.phases]]``, and their bad input,
through the config loader and the ``prefdyn`` command."""

from __future__ import annotations

import tomllib

import numpy as np
import pandas as pd
import pytest

from conftest import CLOSED_FORM, assert_close
from dynamics.cli import main
from dynamics.config import config_reference, dump_config, load_config, phases_of
from dynamics.experiment import run_experiment
from dynamics.objectives import OBJECTIVES
from synthetic import ParameterError

pytestmark = pytest.mark.cli

BASE = """
[problem]
dim = 3

[[problem.behaviors]]
name = "a"
distinguishability = 1.5

[[problem.behaviors]]
name = "b"
distinguishability = 2.5

[model]
vocab_size = 3

[train]
lr = 0.2
n = 60
seeds = 2
"""


def config(extra: str = "", overrides=()):
    return load_config(None, overrides, text=BASE + extra)


def test_objective_name_or_table_resolves_with_defaults():
    assert config()["train"]["objective"] == "dpo"
    assert config(overrides=["train.objective=ipo"])["train"]["objective"] == "ipo"
    table = config(overrides=["train.objective=cdpo"])["train"]["objective"]
    assert table == {"name": "cdpo", "epsilon": 0.0}  # hyperparameters filled in
    extended = config(overrides=["train.objective=cdpo", "train.objective.epsilon=0.2"])
    assert extended["train"]["objective"] == {"name": "cdpo", "epsilon": 0.2}
    inline = load_config(None, text=BASE.replace(
        "[train]", '[train]\nobjective = { name = "robust_dpo", epsilon = 0.1 }'))
    assert inline["train"]["objective"] == {"name": "robust_dpo", "epsilon": 0.1}
    # the resolved config is valid TOML that reads back to itself
    text = dump_config(inline)
    assert 'objective = { name = "robust_dpo", epsilon = 0.1 }' in text
    assert load_config(None, text=text) == inline


@pytest.mark.parametrize("overrides, message", [
    (["train.objective=cdpo", "train.objective.epsilon=0.5"],
     "train.objective.epsilon = 0.5 must be < 0.5"),
    (["train.objective=robust_dpo", "train.objective.epsilon=-0.1"],
     "train.objective.epsilon = -0.1 must be >= 0"),
    (["train.objective=cdpo", "train.objective.epsilon=true"],
     "train.objective.epsilon = True must be a number"),
    (["train.objective=cdpo", "train.objective.epsilom=0.1"],
     "train.objective.epsilom = 0.1 is not a hyperparameter of 'cdpo'; its keys: epsilon "
     "(did you mean 'epsilon'?)"),
    (["train.objective=ipo", "train.objective.epsilon=0.1"],
     "train.objective.epsilon = 0.1 is not a hyperparameter of 'ipo'; its keys: (none)"),
    (["train.objective=hindge"], "train.objective = 'hindge' must be one of"),
    (["train.objective.epsilon=0.1"], "train.objective.epsilon = 0.1 is not a hyperparameter "
     "of 'dpo'"),
])
def test_bad_objective_is_one_line_naming_key_value_and_rule(overrides, message, tmp_path,
                                                            capsys):
    with pytest.raises(ParameterError) as info:
        config(overrides=overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    path = tmp_path / "c.toml"
    path.write_text(BASE)
    args = ["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefdyn: error: ") and err.count("\n") == 1 and message in err
    assert not (tmp_path / "o").exists()


def test_unknown_objective_suggests_the_closest():
    with pytest.raises(ParameterError, match=r"did you mean 'hinge'\?"):
        config(overrides=["train.objective=hinje"])


PHASES = """
[[train.phases]]
objective = "dpo"
steps = 6
record = false

[[train.phases]]
objective = "dpo"
steps = 8
flip = true
"""


@pytest.mark.parametrize("extra, message", [
    ("\n[[train.phases]]\n", "train.phases.0.objective = None is required"),
    ("\n[[train.phases]]\nobjective = \"dpx\"\nsteps = 3\n",
     "train.phases.0.objective = 'dpx' must be one of"),
    ("\n[[train.phases]]\nobjective = \"dpo\"\nsteps = 0\n",
     "train.phases.0.steps = 0 must be >= 1"),
    ("\n[[train.phases]]\nobjective = \"dpo\"\nsteps = 3\nbehaviors = [\"c\"]\n",
     "train.phases.0.behaviors.0 = 'c' must be one of a, b"),
    ("\n[[train.phases]]\nobjective = \"dpo\"\nsteps = 3\nbehaviors = []\n",
     "train.phases.0.behaviors = [] must be a non-empty list"),
    ("\n[[train.phases]]\nobjective = \"dpo\"\nsteps = 3\nlr = -1\n",
     "train.phases.0.lr = -1.0 must be > 0"),
])
def test_bad_phases(extra, message):
    with pytest.raises(ParameterError) as info:
        config(extra)
    assert message in str(info.value), str(info.value)


def test_empty_phase_list_and_phases_with_shorthand_are_refused():
    with pytest.raises(ParameterError, match="train.phases = \\[\\] must be one or more"):
        load_config(None, text=BASE.replace("[train]", "[train]\nphases = []"))
    with pytest.raises(ParameterError, match="train.steps = 5 cannot be given together"):
        load_config(None, text=BASE.replace("[train]", "[train]\nsteps = 5") + PHASES)


def test_align_then_flip_as_phases_equals_the_shorthand():
    shorthand = config(overrides=["train.steps=8", "train.flip=true", "train.start=aligned",
                                  "train.align_steps=6"])
    phased = config(PHASES)
    assert [p.steps for p in phases_of(phased)] == [p.steps for p in phases_of(shorthand)]
    a, b = run_experiment(shorthand, progress=False), run_experiment(phased, progress=False)
    pd.testing.assert_frame_equal(a, b)
    assert (a["step"].min(), a["step"].max()) == (0, 8)  # the unrecorded phase takes no steps


def test_phases_chain_objectives_and_record_forgetting():
    """SFT on one behavior, then DPO on the other: both recorded, the step count
    continues, metrics for both behaviors in each phase, and the second phase starts
    where the first ended (its step-0 accuracies equal the first phase's last)."""
    extra = """
[[train.phases]]
objective = "sft"
steps = 5
behaviors = ["a"]

[[train.phases]]
objective = { name = "cdpo", epsilon = 0.1 }
steps = 4
lr = 0.1
behaviors = ["b"]
"""
    frame = run_experiment(config(extra, ["train.dtype=float64"]), progress=False)
    assert set(frame["phase"]) == {0, 1} and set(frame["objective"]) == {"sft", "cdpo"}
    for source, rows in frame.groupby("source", observed=True):
        first, second = rows[rows["phase"] == 0], rows[rows["phase"] == 1]
        assert first["step"].max() == 5 and second["step"].min() == 5
        assert second["step"].max() == 9
        assert_close(second["t"].max(), 0.2 * 5 + 0.1 * 4, CLOSED_FORM)
        keys = ["seed", "behavior"] if source == "simulation" else ["behavior"]
        end = first[first["step"] == 5].set_index(keys)
        start = second[second["step"] == 5].set_index(keys)
        for metric in ("accuracy", "reward_accuracy", "weight_change"):
            assert_close(start[metric], end[metric].loc[start.index], CLOSED_FORM, err_msg=metric)
        assert set(first["behavior"]) == {"a", "b"}


def test_theory_and_simulation_agree_across_phases():
    """The chained population (a DPO phase after an SFT phase that moved a third row,
    so the reward correction applies) against a large sample."""
    extra = """
[[train.phases]]
objective = "sft"
steps = 10

[[train.phases]]
objective = "dpo"
steps = 10
"""
    cfg = config(extra, ["train.n=20000", "train.dtype=float64", "theory.qmc_points=16384"])
    frame = run_experiment(cfg, progress=False)
    last = frame[frame["step"] == 20]
    theory = last[last["source"] == "theory"].set_index("behavior")
    sim = last[last["source"] == "simulation"].groupby("behavior", observed=True).mean(
        numeric_only=True)
    for metric in ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "weight_change"):
        assert_close(sim[metric], theory[metric].loc[sim.index], 0.02, err_msg=metric)


def test_sweep_over_objectives_and_hyperparameters(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(BASE + "steps = 4\n")
    assert main(["sweep", str(path), "--out", str(tmp_path / "s"), "--quiet", "--jobs", "1",
                 "--grid", "train.objective=dpo,ipo,hinge"]) == 0
    from dynamics.sweep import load_sweep

    frame = load_sweep(tmp_path / "s").frame()
    assert set(frame["objective"]) == {"dpo", "ipo", "hinge"}
    path.write_text(BASE + "steps = 4\nobjective = \"cdpo\"\n")
    assert main(["sweep", str(path), "--out", str(tmp_path / "e"), "--quiet", "--jobs", "1",
                 "--grid", "train.objective.epsilon=0,0.2"]) == 0
    configs = load_sweep(tmp_path / "e").configs()
    assert sorted(c["train"]["objective"]["epsilon"] for c in configs.values()) == [0.0, 0.2]


def test_config_reference_lists_every_objective_and_its_keys():
    reference = config_reference()
    for obj in OBJECTIVES.values():
        assert f"`{obj.name}`" in reference
        for key in obj.hyper:
            assert f"`train.objective.{key}` ({obj.name})" in reference
    for key in ("objective", "steps", "lr", "behaviors", "flip", "record"):
        assert f"`train.phases[].{key}`" in reference


HEAD = "[[0.5, -0.2, 0.1], [-0.5, 0.2, -0.1], [0.0, 0.3, 0.0]]"
"""A reward head for BASE (V = 3, d = 3), for the objectives that maximise one."""


def test_every_objective_runs_end_to_end(tmp_path):
    for name in OBJECTIVES:
        head = {"prompts": [f"model.reward_head={HEAD}"],
                "context": ["model.prompt_offset=[0.5, -0.2, 0.1]"]}.get(OBJECTIVES[name].data, [])
        cfg = config(overrides=[f"train.objective={name}", "train.steps=3",
                                "train.heldout_n=20", *head])
        frame = run_experiment(cfg, progress=False)
        assert np.isfinite(frame["loss"]).all() and set(frame["objective"]) == {name}
        assert np.isfinite(frame["heldout/accuracy"]).all(), name
        resolved = tomllib.loads(dump_config(cfg))
        assert load_config(None, text=dump_config(cfg)) == cfg, resolved


def test_readme_lists_the_registry():
    """The README's objectives table is generated from the registry and kept current."""
    from pathlib import Path

    from dynamics.objectives import objectives_reference

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert objectives_reference() in readme


def test_a_sweep_over_objective_tables_keeps_one_value_per_point(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(BASE + 'steps = 3\n\n[sweep]\nseeds = "0:2"\n\n[sweep.grid]\n'
                    '"train.objective" = ["dpo", { name = "cdpo", epsilon = 0.1 }]\n')
    assert main(["sweep", str(path), "--out", str(tmp_path / "s"), "--quiet", "--jobs", "1"]) == 0
    from dynamics.sweep_store import load_sweep

    frame = load_sweep(tmp_path / "s").frame()
    assert sorted(set(frame["train.objective"])) == ['dpo', '{"epsilon":0.1,"name":"cdpo"}']
    assert frame.groupby("point")["train.objective"].nunique().eq(1).all()
