"""Figure 8 (every objective; DPO's relatives under label noise): renders from stored
sweeps, and what it draws is checked as numbers against naive loops over the tidy
table and against what the theory guarantees."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import CLOSED_FORM, QUADRATURE, assert_close, run_shrunk_sweeps
from dynamics.bounds import priority_scores
from dynamics.config import build_problem
from dynamics.objectives import OBJECTIVES
from figures import FIGURES, render, sweep_configs
from figures.objectives import matched, noise_table, objective_label, priority_table

pytestmark = pytest.mark.sweep

SHRUNK = {
    "objectives_priority": ({}, [], ["train.steps=12", "train.n=300"], "0:3"),
    "objectives_noise": ({}, ["problem.label_noise=0.0,0.2,0.4"],
                         ["train.steps=20", "train.n=300", "train.eval_every=5"], "0:3"),
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    configs = {path.stem: path for path in sweep_configs("objectives")}
    return run_shrunk_sweeps(tmp_path_factory.mktemp("objectives"), configs, SHRUNK)


def test_the_priority_sweep_covers_every_registered_objective(stored):
    names = {c["train"]["objective"] if isinstance(c["train"]["objective"], str)
             else c["train"]["objective"]["name"]
             for c in stored["objectives_priority"].configs().values()}
    # every objective trained on preference data; RL (a reward head) and context
    # distillation (a prompt's teacher) have their own figures
    assert names == {name for name, obj in OBJECTIVES.items()
                     if obj.data not in ("prompts", "context")}


def test_priority_table_against_naive_slopes(stored):
    sweep = stored["objectives_priority"]
    frame, configs = sweep.frame(), sweep.configs()
    table = priority_table(frame, configs).set_index("point")
    for pid, config in configs.items():
        scores = priority_scores(build_problem(config))
        assert table.loc[pid, "predicted"] == tuple(scores.sort_values("rank")["behavior"])
        for source, column in (("simulation", "measured"), ("theory", "theory")):
            rows = frame[(frame["point"] == pid) & (frame["source"] == source)]
            slopes = {}
            for name in pd.unique(rows["behavior"]):
                mine = rows[rows["behavior"] == name]
                at = lambda k: mine[mine["step"] == k]  # noqa: E731
                slopes[name] = ((at(1)["loss"].mean() - at(0)["loss"].mean())
                                / (at(1)["t"].mean() - at(0)["t"].mean()))
            assert table.loc[pid, column] == tuple(sorted(slopes, key=slopes.get)), column
        # for a margin objective the theory's first step orders the behaviors by
        # ⟨d_i, b̄⟩ exactly (every initial slope is −G ℓ'(0)²⟨m_i, m⟩)
        if OBJECTIVES[table.loc[pid, "objective"]].view != "all":
            assert table.loc[pid, "theory"] == table.loc[pid, "predicted"]
    assert table["holds"].all(), table[["label", "predicted", "measured"]]


def test_noise_table_against_a_naive_loop(stored):
    sweep = stored["objectives_noise"]
    frame, configs = sweep.frame(), sweep.configs()
    table = noise_table(frame, configs)
    last = frame[frame["step"] == frame["step"].max()]
    assert len(table) == 2 * len(configs)
    for row in table.itertuples():
        rows = last[(last["point"] == row.point) & (last["source"] == row.source)]
        per_seed = []
        for seed in pd.unique(rows["seed"]):
            mine = rows[rows["seed"] == seed] if not pd.isna(seed) else rows[rows["seed"].isna()]
            per_seed.append(sum(mine["clean_accuracy"]) / len(mine))
        assert_close(row.clean_accuracy, np.mean(per_seed), CLOSED_FORM)
        config = configs[row.point]
        assert row.label_noise == config["problem"]["label_noise"]
    pairs = matched(table)
    for row in pairs.itertuples():
        assert row.objective == "dpo" or np.isclose(row.epsilon, row.label_noise)
    assert set(pairs["objective"]) == {"dpo", "cdpo", "robust_dpo"}


def test_robust_dpo_on_noisy_labels_follows_clean_dpo_in_theory(stored):
    """The population flow of robust DPO with ε = the noise is DPO's on clean labels
    (same expected gradient), so its theory curves equal clean DPO's: the figure's
    matched theory line for robust DPO is flat in the noise."""
    sweep = stored["objectives_noise"]
    frame, configs = sweep.frame(), sweep.configs()
    theory = frame[frame["source"] == "theory"]

    def curve(objective, epsilon, noise):
        for pid, config in configs.items():
            spec = config["train"]["objective"]
            eps = 0.0 if isinstance(spec, str) else spec["epsilon"]
            name = spec if isinstance(spec, str) else spec["name"]
            if (name, eps, config["problem"]["label_noise"]) == (objective, epsilon, noise):
                return theory[theory["point"] == pid].sort_values(["step", "behavior"])
        raise AssertionError((objective, epsilon, noise))

    clean = curve("dpo", 0.0, 0.0)
    for noise in (0.2, 0.4):
        robust = curve("robust_dpo", noise, noise)
        for metric in ("clean_accuracy", "weight_change"):
            assert_close(robust[metric].to_numpy(), clean[metric].to_numpy(), QUADRATURE)
        # plain DPO on the same noisy labels learns more slowly
        noisy = curve("dpo", 0.0, noise)
        assert (noisy["weight_change"].to_numpy()[-1] < clean["weight_change"].to_numpy()[-1])


def test_objective_labels():
    assert objective_label("dpo") == "dpo"
    assert objective_label({"name": "cdpo", "epsilon": 0.25}) == "cdpo (ε=0.25)"


def test_figure_renders_png_and_pdf(stored, tmp_path):
    written = render("objectives", list(stored.values()), tmp_path)
    number = FIGURES["objectives"].number
    assert {p.name for p in written} == {f"fig{number}_objectives.png",
                                         f"fig{number}_objectives.pdf"}
    for path in written:
        assert path.stat().st_size > 10_000
