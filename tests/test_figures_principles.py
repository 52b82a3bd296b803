"""Figure 14 (principle-driven labels): render from shrunk sweeps; the tables against
naive loops over the tidy table; the labels' quality (closed form) against the judge's
measured agreement on the sweeps' own samples within the binomial error; the flow
against the simulation; and the README's claims as inequalities whose margins are the
Monte Carlo error of the seed count."""

from __future__ import annotations

import tomllib

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CLOSED_FORM, QMC, Z_SCORE, assert_close, mc_tolerance, run_shrunk_sweeps
from dynamics.config import build_problem
from figures import FIGURES, render, sweep_configs
from figures.pretraining import crossing
from figures.principles import (
    DRAWN_COUNTS,
    FIXED_COSINE,
    exchange_rate,
    judge_table,
    kind,
    samples_table,
)
from synthetic import sample_batch

pytestmark = pytest.mark.sweep

KEEP = {"cosine": (0.0, 0.4, 0.8), "count": (1, 3, 9)}
"""The judge sweep's rows the shrunk sweep keeps."""


def _shrunk():
    configs = {path.stem: path for path in sweep_configs("principles")}
    drop = {}
    for cosine in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        for count in (1, 3, 5, 9, 15):
            if cosine in KEEP["cosine"] and count in KEEP["count"]:
                continue
            line = (f'    {{ cosine = {cosine}, count = {count}, combine = "vote", '
                    'seed = 0 },\n')
            drop[line] = ""
    common = ["train.heldout_n=2000"]
    shrunk = {
        "principles_judge": (drop, [], common, "0:8"),
        "principles_samples": ({}, ["train.n=32,256,2048"], common, "0:8"),
        "principles_true": ({}, ["train.n=8,32,128,512,2048"], common, "0:8"),
    }
    return configs, shrunk


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    configs, shrunk = _shrunk()
    return run_shrunk_sweeps(tmp_path_factory.mktemp("principles"), configs, shrunk)


def _judge(stored):
    sweep = stored["principles_judge"]
    return sweep.frame(), sweep.configs()


def _samples(stored):
    group = [stored["principles_samples"], stored["principles_true"]]
    return (pd.concat([s.frame() for s in group], ignore_index=True),
            {p: c for s in group for p, c in s.configs().items()})


# ============================================================================ coverage


def test_the_sweeps_cover_what_the_figure_claims(stored):
    assert {stem: kind(s) for stem, s in stored.items()} == {
        "principles_judge": "judge", "principles_samples": "samples",
        "principles_true": "true"}
    full = {p.stem: tomllib.loads(p.read_text(encoding="utf-8"))
            for p in sweep_configs("principles")}
    tables = full["principles_judge"]["sweep"]["grid"]["problem.principles"]
    pairs = {(t["cosine"], t["count"]) for t in tables}
    assert {(c, k) for c in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) for k in (1, 3, 5, 9, 15)} == pairs
    assert FIXED_COSINE in {c for c, _ in pairs} and set(DRAWN_COUNTS) <= {k for _, k in pairs}
    assert all(t["combine"] == "vote" for t in tables)
    assert [t["cosine"] for t in full["principles_samples"]["sweep"]["grid"][
        "problem.principles"]] == [0.5, 0.8]
    for stem in ("principles_samples", "principles_true"):
        assert min(full[stem]["sweep"]["grid"]["train.n"]) <= 8
        assert max(full[stem]["sweep"]["grid"]["train.n"]) == 2048
    for config in stored["principles_true"].configs().values():
        assert "principles" not in config["problem"] or config["problem"]["principles"] is None
        assert config["train"]["objective"] == "reward_model"
    for sweep in stored.values():
        for config in sweep.configs().values():
            assert config["model"]["init_scale"] == 0.0 and config["train"]["beta"] == 1.0


# ============================================================================ tables vs naive loops


def test_judge_and_samples_tables_against_a_naive_loop(stored):
    frame, configs = _judge(stored)
    table = judge_table(frame, configs)
    assert len(table) == 2 * len(configs)
    for row in table.itertuples():
        rows = frame[(frame["point"] == row.point) & (frame["source"] == row.source)]
        last = rows[rows["step"] == rows["step"].max()]
        assert_close(row.clean, last["heldout/clean_accuracy"].mean(), CLOSED_FORM)
        assert_close(row.agreement, last["accuracy"].mean(), CLOSED_FORM)
        judge = configs[row.point]["problem"]["principles"]
        assert (row.cosine, row.count) == (judge["cosine"], judge["count"])
    frame, configs = _samples(stored)
    table = samples_table(frame, configs)
    for row in table.itertuples():
        rows = frame[(frame["point"] == row.point) & (frame["source"] == row.source)]
        last = rows[rows["step"] == rows["step"].max()]
        metric = "heldout/reward_accuracy" if row.labels == "true" else "heldout/clean_accuracy"
        assert_close(row.accuracy, last[metric].mean(), CLOSED_FORM)
        if row.source == "simulation":
            assert_close(row.accuracy_sd, last[metric].std(ddof=1), CLOSED_FORM)
        assert row.n == configs[row.point]["train"]["n"]
    rate = exchange_rate(frame, configs, boot=100)
    sim = table[table["source"] == "simulation"]
    true = sim[sim["labels"] == "true"].sort_values("n")
    for row in rate.itertuples():
        judge = sim[(sim["labels"] == "judge") & np.isclose(sim["cosine"], row.cosine)]
        level = judge.sort_values("n")["accuracy"].iloc[-1]
        assert_close(row.judge, level, CLOSED_FORM)
        assert row.m == crossing(true["n"], true["accuracy"], level)
        assert row.low <= row.m <= row.high


# ============================================================================ the labels' quality


def test_label_quality_equals_the_measured_agreement(stored):
    """The judge's labels on the points' own training samples (every seed, pooled)
    agree with the truth as often as label_quality says, within Z binomial SEs."""
    _, configs = _judge(stored)
    table = judge_table(*_judge(stored))
    for pid, config in configs.items():
        problem = build_problem(config)
        data = sample_batch(problem, config["train"]["n"], list(range(8)),
                            dtype=torch.float64)
        agree = float((data.signs == data.true_signs).double().mean())
        want = float(table[table["point"] == pid]["quality"].iloc[0])
        count = data.signs.numel()
        assert abs(agree - want) <= Z_SCORE * np.sqrt(want * (1 - want) / count) + 1e-12, (
            config["problem"]["principles"], agree, want)


# ============================================================================ theory vs simulation


def test_the_flow_agrees_with_the_simulation_at_the_largest_n(stored):
    """The flow (QMC over the judge's labels) against the seed mean of the held-out clean
    accuracy: within Z·sd/√S plus the flow's QMC error (an indicator integrated by QMC:
    a few 1e-3) and the finite sample's O(d/n) shortfall."""
    for frame, configs, pick in ((*_judge(stored), judge_table),
                                 (*_samples(stored), samples_table)):
        table = pick(frame, configs)
        metric = "clean" if pick is judge_table else "accuracy"
        if pick is samples_table:
            table = table[table["n"] == table["n"].max()]
        sim = table[table["source"] == "simulation"].set_index("point")
        theory = table[table["source"] == "theory"].set_index("point")
        for pid, row in sim.iterrows():
            want = theory.loc[pid, metric]
            tol = mc_tolerance(row[f"{metric}_sd"], 8) + 30 * QMC + 16 / row["n"]
            assert abs(row[metric] - want) <= tol, (pid, row[metric], want, tol)


# ============================================================================ the README's claims


def test_clean_accuracy_rises_with_the_cosine_and_the_count(stored):
    frame, configs = _judge(stored)
    table = judge_table(frame, configs)
    for source in ("simulation", "theory"):
        rows = table[table["source"] == source]
        for k in KEEP["count"]:
            curve = rows[rows["count"] == k].sort_values("cosine")
            gaps = np.diff(curve["clean"])
            spread = curve["clean_sd"].fillna(0).to_numpy()
            assert np.all(gaps > mc_tolerance(spread[1:] + spread[:-1], 8)), (source, k)
        for cosine in KEEP["cosine"][1:]:
            curve = rows[np.isclose(rows["cosine"], cosine)].sort_values("count")
            assert np.all(np.diff(curve["clean"]) > 0), (source, cosine)
    # ρ = 0: labels independent of the class, nothing learned about the truth
    zero = table[(table["source"] == "theory") & (table["cosine"] == 0.0)]
    assert np.all(np.abs(zero["clean"] - 0.5) < 30 * QMC)
    # at ρ = 0.4 the learner beats its own labels once they vote (k > 1): it fits a
    # direction near their sum, whose quality is the vote's and more; never above Bayes
    sim = table[(table["source"] == "simulation") & (table["cosine"] > 0)]
    voting = sim[(sim["count"] > 1) & np.isclose(sim["cosine"], FIXED_COSINE)]
    assert len(voting) and np.all(voting["clean_low"] > voting["quality"])
    assert np.all(sim["clean"] < sim["bayes"])


def test_true_labels_overtake_the_judge(stored):
    """The judge's accuracy at its largest n is matched by a reward model on far fewer
    true labels, and a stronger judge (larger ρ) is worth more of them."""
    frame, configs = _samples(stored)
    rate = exchange_rate(frame, configs, boot=200).sort_values("cosine")
    assert np.all(np.isfinite(rate["m"])) and np.all(rate["m"] < rate["judge_n"])
    assert np.all(np.diff(rate["m"]) > 0)
    assert rate["high"].iloc[0] < rate["low"].iloc[-1]


def test_figure_renders_png_and_pdf(stored, tmp_path):
    written = render("principles", list(stored.values()), tmp_path)
    number = FIGURES["principles"].number
    assert {p.name for p in written} == {f"fig{number}_principles.png",
                                         f"fig{number}_principles.pdf"}
    for path in written:
        assert path.stat().st_size > 10_000
