"""Preference-model pre-training (PMP; Askell et al. 2021 §5): a reward-model phase on
related behaviors, then fine-tuning on the target with ``n`` of its statements.

Checked: pre-training on the target itself is training longer (simulation and flow); a
phase's ``n`` trains on a class-stratified subset that equals training on that subset
built by hand, and smaller subsets nest in larger ones; the config refuses a pre-training
list that includes the target unless ``allow_target``."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dynamics import simulate_sample
from dynamics.config import load_config
from dynamics.experiment import run_experiment
from dynamics.simulate import stratified_subset
from synthetic import ParameterError, Problem
from synthetic.problem import isotropic
from synthetic.sampling import PreferenceSample, sample_batch

BASE = """
[problem]
dim = 4
[[problem.behaviors]]
name = "target"
distinguishability = 2.0
direction = [1, 0, 0, 0]
[[problem.behaviors]]
name = "related"
distinguishability = 2.0
direction = [0.6, 0.8, 0, 0]
[train]
n = 120
seeds = 2
lr = 1.0
dtype = "float64"
[theory]
bounds = false
qmc_points = 1024
"""


def phase(objective="reward_model", steps=10, **keys) -> str:
    lines = [f'objective = "{objective}"', f"steps = {steps}"]
    for key, value in keys.items():
        lines.append(f"{key} = {value!r}".replace("'", '"').replace("True", "true"))
    return "[[train.phases]]\n" + "\n".join(lines) + "\n"


def config(*phases: str) -> dict:
    return load_config(None, text=BASE + "".join(phases))


def last(frame: pd.DataFrame) -> pd.DataFrame:
    end = frame[frame.step == frame.step.max()]
    return end.drop(columns=["phase"]).set_index(["source", "seed", "behavior"]).sort_index()


def test_pretraining_on_the_target_is_training_longer():
    """Phase 1 pre-trains on the target for 7 steps, phase 2 fine-tunes it for 13: the
    state after them is that of one 20-step phase, for the flow and every seed."""
    split = run_experiment(config(
        phase(steps=7, behaviors=["target"], pretraining=True, allow_target=True),
        phase(steps=13, behaviors=["target"])), progress=False)
    whole = run_experiment(config(phase(steps=20, behaviors=["target"])), progress=False)
    a, b = last(split), last(whole)
    columns = ["loss", "reward_accuracy", "rewards/margins"]
    np.testing.assert_allclose(a[columns].to_numpy(), b[columns].to_numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("phases, key, rule", [
    ((phase(behaviors=["related", "target"], pretraining=True), phase(behaviors=["target"])),
     "train.phases.0.behaviors", "must not include the target behaviors of train.phases.1"),
    ((phase(pretraining=True), phase(behaviors=["target"])),
     "train.phases.0.behaviors", "is required by pretraining = true"),
    ((phase(behaviors=["related"], pretraining=True),),
     "train.phases.0.pretraining", "needs a later phase that is not pre-training"),
    ((phase(behaviors=["target"], allow_target=True),),
     "train.phases.0.allow_target", "applies only to a phase with pretraining = true"),
    ((phase(behaviors=["target"], n=61),), "train.phases.0.n", "must be <= the 60 statements"),
    ((phase(n=1),), "train.phases.0.n", ">= 2"),
])
def test_bad_pretraining_configs_are_refused(phases, key, rule):
    with pytest.raises(ParameterError) as err:
        config(*phases)
    assert err.value.name == key and rule in str(err.value)


def test_the_target_without_other_behaviors_is_the_default_target():
    """A pre-training phase before a phase on every behavior overlaps the target."""
    with pytest.raises(ParameterError, match="train.phases.1"):
        config(phase(behaviors=["related"], pretraining=True), phase())


def _problem() -> Problem:
    return Problem((isotropic("a", 3, 1.5, sigma=1.0, pos_fraction=0.3),
                    isotropic("b", 3, 1.0, direction=[0, 1, 0])))


def test_stratified_subsets_nest_and_keep_the_class_balance():
    data = sample_batch(_problem(), 100, [0, 1], dtype=torch.float64)
    previous = None
    for size in (4, 10, 33, 64, 100):
        sub = stratified_subset(data, size)
        assert sub.n == size
        rows = {tuple(r) for r in sub.features[0].numpy().round(12)}
        if previous is not None:
            assert previous <= rows  # nested
        previous = rows
        for k in (0, 1):  # each (behavior, class) share within one statement of exact
            for sign in (1.0, -1.0):
                want = size * float(((data.behavior == k) & (data.true_signs[0] == sign)).sum())
                got = float(((sub.behavior == k) & (sub.true_signs[0] == sign)).sum())
                assert abs(got - want / 100) < 1
    assert stratified_subset(data, 100).features.equal(data.features)


def test_train_n_is_training_on_the_subset_built_by_hand():
    data = sample_batch(_problem(), 60, [3, 4], dtype=torch.float64)
    # by hand: behavior a has 30 statements (9 positive, 21 negative), b 30 (15, 15);
    # 20 of 60 take a third of each group (largest remainder: 3, 7, 5, 5)
    index = np.r_[0:3, 9:16, 30:35, 45:50]
    hand = PreferenceSample(data.features[:, index], data.signs[:, index],
                            data.true_signs[:, index], data.behavior[index], data.names)
    w0 = np.array([[0.3, -0.2, 0.1], [-0.1, 0.4, 0.0]])
    common = dict(seeds=[3, 4], beta=1.0, lr=0.5, steps=6, reference=w0,
                  objective="reward_model", keep_deltas=True)
    subset = simulate_sample(data, train_n=20, **common)
    direct = simulate_sample(hand, **common)
    torch.testing.assert_close(subset.deltas, direct.deltas, rtol=0, atol=1e-14)
    with pytest.raises(ParameterError, match="train_n"):
        simulate_sample(data, train_n=61, **common)


def test_a_pretraining_list_with_the_target_exits_2_with_one_line(tmp_path, capsys):
    from dynamics.cli import main

    path = tmp_path / "c.toml"
    path.write_text(BASE + phase(behaviors=["target", "related"], pretraining=True)
                    + phase(behaviors=["target"]))
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.phases.0.behaviors" in err[0], err
    assert "allow_target = true" in err[0] and not (tmp_path / "o").exists()
