"""Figures 3 (priority), 5 (misalignment) and 6 (phase diagram) from tiny stored sweeps.

Each figure's own sweep config (``figures/sweeps/``) is run once per module,
shrunk with overrides, a smaller grid and two seeds; then every figure must
render, and the numbers it shows are checked against independent computations:
steps to a threshold against a naive loop, the predicted priority order against
``⟨d_i, b̄⟩`` computed by hand from the problem's means, the sign of the initial
loss slopes, the misalignment starting points and the Bayes limit of the phase
diagram.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import BOUND_SLACK, CLOSED_FORM, FLOAT32, QUADRATURE, assert_close, assert_leq
from scipy.stats import norm

from dynamics.config import build_problem
from dynamics.sweep import run_sweep
from dynamics.sweep_plan import load_plan
from dynamics.sweep_store import load_sweep
from figures import FIGURES, render, sweep_configs
from figures.misalignment import THRESHOLDS, start_summary
from figures.phase_diagram import THRESHOLD, steps_to_threshold, threshold_table
from figures.priority import initial_slopes, measured_order, predicted_order

pytestmark = pytest.mark.sweep

FAST = ["theory.qmc_points=256", "train.eval_every=1"]
SHRINK = {
    "priority": dict(overrides=FAST + ["train.steps=12", "train.n=300"], seeds="0:2"),
    "misalignment": dict(overrides=FAST + ["train.steps=40", "train.n=200",
                                           "train.align_steps=40"], seeds="0:2"),
    "phase_diagram": dict(overrides=FAST + ["train.steps=30", "train.n=200"], seeds="0:2",
                          grids=["problem.behaviors.0.distinguishability=1.0,4.0",
                                 "problem.behaviors.0.sigma=0.25,2.0"]),
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MIN_BYTES = 10_000  # a drawn figure, not an empty canvas


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Each figure's sweeps, shrunk, run in-process with one thread; name → [SweepResults]."""
    root = tmp_path_factory.mktemp("grid_sweeps")
    sweeps = {}
    for name, shrink in SHRINK.items():
        for config in sweep_configs(name):
            out = root / config.stem
            report = run_sweep(load_plan(config, **shrink), out, jobs=1, threads=1,
                               progress=False)
            assert not report.failed, report.failed
            sweeps.setdefault(name, []).append(load_sweep(out))
    return sweeps


def _frame(sweeps):
    import pandas as pd

    return pd.concat([s.frame() for s in sweeps], ignore_index=True)


def _configs(sweeps):
    return {pid: c for s in sweeps for pid, c in s.configs().items()}


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("name", list(SHRINK))
def test_figure_renders_png_and_pdf(stored, tmp_path, name):
    assert all(s.figure == name for s in stored[name])
    written = render(name, stored[name], tmp_path)
    stem = f"fig{FIGURES[name].number}_{name}"
    assert sorted(p.name for p in written) == [f"{stem}.pdf", f"{stem}.png"]
    png, pdf = tmp_path / f"{stem}.png", tmp_path / f"{stem}.pdf"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert png.stat().st_size > MIN_BYTES and pdf.stat().st_size > MIN_BYTES


# ----------------------------------------------------------------------------- steps to threshold


def _naive_first(steps, values, threshold):
    """The smallest step whose value reaches the threshold, by a plain loop."""
    best = None
    for step, value in zip(steps, values):
        if value >= threshold and (best is None or step < best):
            best = step
    return math.nan if best is None else float(best)


def test_steps_to_threshold_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    for trial in range(200):
        size = int(rng.integers(1, 40))
        steps = rng.choice(np.arange(0, 400, int(rng.integers(1, 6))), size=size,
                           replace=False)  # recorded every eval_every, in any order
        values = rng.uniform(0, 1, size)
        threshold = float(rng.choice([*values, rng.uniform(0, 1.2)]))  # ties included
        got = steps_to_threshold(steps, values, threshold)
        want = _naive_first(steps, values, threshold)
        assert (math.isnan(got) and math.isnan(want)) or got == want, (trial, got, want)


def test_steps_to_threshold_edge_cases():
    assert steps_to_threshold([0, 1, 2], [0.95, 0.1, 0.2], 0.9) == 0.0
    assert steps_to_threshold([0, 5, 10], [0.1, 0.9, 0.95], 0.9) == 5.0  # reaching counts
    assert math.isnan(steps_to_threshold([0, 1], [0.1, 0.2], 0.9))
    with pytest.raises(ValueError, match="one length"):
        steps_to_threshold([0, 1], [0.1], 0.9)


def test_threshold_table_matches_a_naive_loop_over_the_stored_frame(stored):
    frame = _frame(stored["phase_diagram"])
    table = threshold_table(frame)
    assert len(table) == frame.groupby(["point", "source", "behavior"]).ngroups
    for row in table.itertuples():
        rows = frame[(frame["point"] == row.point) & (frame["source"] == row.source)
                     & (frame["behavior"] == row.behavior)]
        means = {}
        for step in sorted(set(rows["step"])):
            at = rows[rows["step"] == step]["accuracy"]
            means[step] = sum(at) / len(at)
        want = _naive_first(list(means), list(means.values()), THRESHOLD)
        assert (math.isnan(row.steps) and math.isnan(want)) or row.steps == want
    # the stored grid has cells that reach the threshold and cells that never do, so
    # both branches above were exercised
    assert table["steps"].notna().any() and table["steps"].isna().any()


# ----------------------------------------------------------------------------- figure 6


def test_phase_diagram_respects_the_bayes_limit(stored):
    """Population ranking accuracy of N(±d/2, σ²I) is ≤ Φ(δ/2σ) at every step."""
    frame = _frame(stored["phase_diagram"])
    configs = _configs(stored["phase_diagram"])
    table = threshold_table(frame)
    theory = frame[frame["source"] == "theory"]
    reached = 0
    for pid, config in configs.items():
        behavior = config["problem"]["behaviors"][0]
        limit = norm.cdf(behavior["distinguishability"] / (2 * behavior["sigma"]))
        assert_leq(theory[theory["point"] == pid]["accuracy"], limit, BOUND_SLACK)
        steps = table[(table["point"] == pid) & (table["source"] == "theory")]["steps"].iloc[0]
        if limit < THRESHOLD:
            assert math.isnan(steps)
        reached += not math.isnan(steps)
    assert 0 < reached < len(configs)  # the shrunk grid has both kinds of cell


# ----------------------------------------------------------------------------- figure 3


def _by_hand(problem):
    """⟨d_i, b̄⟩ with d_i = μ_i⁺ − μ_i⁻ and b̄ = Σ_j w_j d_j (weights normalised)."""
    d = [b.mu_pos - b.mu_neg for b in problem.behaviors]
    w = np.array([b.weight for b in problem.behaviors], dtype=np.float64)
    w = w / w.sum()
    bbar = sum(wj * dj for wj, dj in zip(w, d))
    return {b.name: float(di @ bbar) for b, di in zip(problem.behaviors, d)}


def test_priority_predicted_order_is_the_ranking_by_d_dot_bbar(stored):
    configs = _configs(stored["priority"])
    assert len(configs) == 2
    for config in configs.values():
        scores = _by_hand(build_problem(config))
        order = predicted_order(config)
        assert list(order["behavior"]) == sorted(scores, key=scores.get, reverse=True)
        assert list(order["rank"]) == list(range(1, len(scores) + 1))
        assert_close(order.set_index("behavior")["score"].loc[list(scores)].to_numpy(),
                     np.array(list(scores.values())), CLOSED_FORM)


def test_priority_initial_slopes_have_the_sign_of_d_dot_bbar(stored):
    """Theory loss at step 1 moves from log 2 in the direction of −⟨d_i, b̄⟩: the
    negative-cosine case's weak behavior starts by rising."""
    frame = _frame(stored["priority"])
    configs = _configs(stored["priority"])
    slopes = initial_slopes(frame)
    negative = 0
    for pid, config in configs.items():
        scores = _by_hand(build_problem(config))
        theory = slopes[(slopes["point"] == pid) & (slopes["source"] == "theory")]
        measured = theory.set_index("behavior")["slope"]
        for name, score in scores.items():
            assert np.sign(measured[name]) == -np.sign(score), (pid, name)
        negative += min(scores.values()) < 0
        assert measured_order(slopes, pid, "theory") == list(predicted_order(config)["behavior"])
    assert negative == 1  # one grid point (cosine < 0) unlearns a behavior


# ----------------------------------------------------------------------------- figure 5


def test_misalignment_starting_points(stored):
    frame = _frame(stored["misalignment"])
    configs = _configs(stored["misalignment"])
    summary = start_summary(frame, configs).set_index(["start", "source"])
    assert sorted(set(summary.index.get_level_values("start"))) == ["aligned", "reference"]
    for source, tol in (("theory", CLOSED_FORM), ("simulation", FLOAT32)):
        ref, aligned = summary.loc[("reference", source)], summary.loc[("aligned", source)]
        # the aligned policy agrees with the original labels: below the reference
        # on the flipped ones, with a negative margin and a larger starting loss
        assert aligned["accuracy0"] < ref["accuracy0"]
        assert aligned["margin0"] < 0 and aligned["loss0"] > ref["loss0"]
        assert aligned["slope0"] < ref["slope0"] < 0  # its loss falls faster at first
        assert ref["weight_change0"] == 0 and aligned["weight_change0"] > 0
        assert_close(ref["loss0"], math.log(2), tol)
        # frozen features: the same feature distinguishability for both starts
        assert aligned["feature_distinguishability"] == ref["feature_distinguishability"]
        # and the aligned start reaches each flipped accuracy no sooner
        for theta in THRESHOLDS:
            a, r = aligned[f"steps_to_{theta:g}"], ref[f"steps_to_{theta:g}"]
            assert math.isnan(a) or a >= r


def test_misalignment_margin_ratio_is_minus_delta_over_two_sigma(stored):
    """Population DPO from Δ = 0 on isotropic classes keeps Δ ∥ d, so the aligned
    start's margin mean/sd is −δ cos(Δ, d)/2σ = −δ/2σ exactly (flipped labels)."""
    frame = _frame(stored["misalignment"])
    configs = _configs(stored["misalignment"])
    summary = start_summary(frame, configs).set_index(["start", "source"])
    behavior = next(iter(configs.values()))["problem"]["behaviors"][0]
    want = -behavior["distinguishability"] / (2 * behavior["sigma"])
    assert_close(summary.loc[("aligned", "theory"), "margin_ratio0"], want, QUADRATURE)
    assert math.isnan(summary.loc[("reference", "theory"), "margin_ratio0"])


def test_misalignment_steps_match_a_naive_loop(stored):
    frame = _frame(stored["misalignment"])
    configs = _configs(stored["misalignment"])
    summary = start_summary(frame, configs)
    for row in summary.itertuples(index=False):
        rows = frame[(frame["point"] == row.point) & (frame["source"] == row.source)]
        curve = rows.groupby("step")["accuracy"].mean()
        for theta in THRESHOLDS:
            want = _naive_first(list(curve.index), list(curve.values), theta)
            got = summary.loc[(summary["point"] == row.point)
                              & (summary["source"] == row.source), f"steps_to_{theta:g}"].iloc[0]
            assert (math.isnan(got) and math.isnan(want)) or got == want
