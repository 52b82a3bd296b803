"""Figure 15 (imitation, binary discrimination and ranked preference on the same data,
against samples and capacity): render from shrunk sweeps; the tables it draws against
naive loops over the tidy table; docs/theory.md §12 (Proposition 11) on the stored runs;
and the README's claims as inequalities whose margins are the Monte Carlo error of the
seed count."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from conftest import CLOSED_FORM, FLOAT32, QMC, assert_close, mc_tolerance, run_shrunk_sweeps
from figures import FIGURES, render, sweep_configs
from figures.imitation import BUDGET_STEP, METRIC, combine, kind, paired, per_seed, summary

pytestmark = pytest.mark.sweep

# config stem -> (text substitutions, --grid, --set, seeds). Two n (or k) of each grid,
# 8 seeds, the full held-out draw of 2000 and 400 steps (binary discrimination, at half
# the speed, is still 7e-4 short of the flow's limit at step 100); the flows of V = 8
# (a QMC log-partition) and of the start sweep are the slow part, so they are left out.
SHORT = ["train.eval_every=2", "train.heldout_n=2000"]
SHRUNK = {
    "imitation_samples": ({}, ["train.n=16,4096"], SHORT, "0:8"),
    "imitation_start": ({}, ["train.n=16", "model.init_scale=0.0,3.0"],
                        SHORT + ["theory.population=false"], "0:8"),
    "imitation_features": ({}, ["model.features=1,16"], SHORT + ["train.steps=100"], "0:8"),
    "imitation_mlp": ({}, ["model.hidden_units=16"], ["train.steps=150", "train.eval_every=50",
                                                      "train.heldout_n=1000"], "0:4"),
    "imitation_linear": ({}, [], ["train.steps=150", "train.eval_every=50",
                                  "train.heldout_n=1000"], "0:4"),
    "imitation_vocab": ({}, ["train.n=4096"], SHORT + ["theory.population=false"], "0:8"),
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    configs = {path.stem: path for path in sweep_configs("imitation_vs_preference")}
    return run_shrunk_sweeps(tmp_path_factory.mktemp("imitation"), configs, SHRUNK)


def _full(stem: str) -> dict:
    path = next(p for p in sweep_configs("imitation_vs_preference") if p.stem == stem)
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _seeds(sweep, step=None):
    return per_seed(*combine([sweep]), step=step)


def _accuracy(seeds, source="simulation", **where):
    """The per-seed accuracies (seed order) of the one point matching ``where``."""
    rows = seeds[seeds["source"] == source]
    for key, value in where.items():
        rows = rows[rows[key] == value]
    assert rows["point"].nunique() == 1, where
    return rows.sort_values("seed")["accuracy"].to_numpy()


def _within_mc(a, b):
    """Seed means of a and b (paired by seed) agree within the Monte Carlo error of the
    mean of their differences."""
    diff = np.asarray(a) - np.asarray(b)
    assert abs(diff.mean()) <= mc_tolerance(diff.std(ddof=1), len(diff)) + FLOAT32, diff


def _clearly_below(small, big):
    diff = np.asarray(big) - np.asarray(small)
    assert diff.mean() > mc_tolerance(diff.std(ddof=1), len(diff)), (diff.mean(), diff)


# ============================================================================ coverage


def test_the_sweeps_cover_what_the_figure_claims(stored):
    assert {stem: kind(s) for stem, s in stored.items()} == {
        "imitation_samples": "samples", "imitation_start": "start",
        "imitation_features": "features", "imitation_mlp": "mlp", "imitation_linear": "linear",
        "imitation_vocab": "vocab"}
    grids = {stem: _full(stem)["sweep"]["grid"] for stem in SHRUNK}
    assert grids["imitation_samples"]["train.objective"] == ["sft", "binary", "reward_model"]
    ns = grids["imitation_samples"]["train.n"]
    assert max(ns) / min(ns) >= 256 and ns == grids["imitation_start"]["train.n"]
    assert grids["imitation_features"]["model.features"][-1] == 16
    assert max(grids["imitation_mlp"]["model.hidden_units"]) >= 16
    for stem in SHRUNK:
        full = _full(stem)
        assert full["train"]["heldout_n"] >= 2000 and full["sweep"]["seeds"] in ("0:8", "0:16")
        if stem not in ("imitation_mlp", "imitation_linear"):  # budget step recorded
            assert BUDGET_STEP % full["train"]["eval_every"] == 0
    assert _full("imitation_vocab")["model"]["vocab_size"] > 2
    assert _full("imitation_mlp")["theory"]["population"] is False


# ============================================================================ tables vs naive loops


def test_per_seed_summary_and_paired_against_a_naive_loop(stored):
    frame, configs = combine([stored["imitation_samples"]])
    seeds = per_seed(frame, configs, step=BUDGET_STEP)
    table = summary(seeds)
    assert len(table) == 2 * len(configs)
    for row in table.itertuples():
        rows = frame[(frame["point"] == row.point) & (frame["source"] == row.source)
                     & (frame["step"] == BUDGET_STEP)]
        assert row.objective == configs[row.point]["train"]["objective"]
        value = rows.groupby("seed", dropna=False)[METRIC[row.objective]].mean()  # 1 behavior
        assert_close(row.accuracy, value.mean(), CLOSED_FORM)
        if row.source == "simulation":
            half = 2.364624251592785 * value.std(ddof=1) / np.sqrt(8)  # t(0.975, 7)
            assert_close(row.accuracy_half, half, CLOSED_FORM)
    gap = paired(seeds, "reward_model", "sft")
    for row in gap.itertuples():
        a = _accuracy(seeds, objective="reward_model", n=row.n)
        b = _accuracy(seeds, objective="sft", n=row.n)
        assert_close(row.diff, (a - b).mean(), CLOSED_FORM)
    with pytest.raises(ValueError, match="step = 3 was not recorded"):
        per_seed(frame, configs, step=3)


# ======================================================= Proposition 11 on the runs


def test_imitation_from_zero_is_ranked_preference(stored):
    """docs/theory.md §12 (1): with u0 = 0 (init_scale 0) imitation's held-out ranking is
    ranked preference's, seed by seed (float32 runs)."""
    start = _seeds(stored["imitation_start"])
    ranked = _seeds(stored["imitation_samples"])
    assert_close(_accuracy(start, init_scale=0.0, n=16),
                 _accuracy(ranked, objective="reward_model", n=16), FLOAT32)


def test_theory_agrees_with_simulation_at_large_n(stored):
    """At n = 4096 the seed mean is within Monte Carlo error of the population flow at
    the budget and at the end, for every objective (held-out draw of 1000 per seed)."""
    for step in (BUDGET_STEP, None):
        seeds = _seeds(stored["imitation_samples"], step)
        for objective in METRIC:
            sim = _accuracy(seeds, objective=objective, n=4096)
            flow = _accuracy(seeds, "theory", objective=objective, n=4096)[0]
            tol = mc_tolerance(sim.std(ddof=1), len(sim)) + QMC
            assert abs(sim.mean() - flow) <= tol, (objective, step, sim.mean(), flow)


# ============================================================================ the README's claims


def test_at_convergence_the_three_agree_for_two_answers(stored):
    """Proposition 11: at the end (step 400) the three held-out accuracies agree, paired
    by seed, within Monte Carlo error, at n = 16 (a separable sample: imitation keeps a
    trace of u0 longer) and n = 4096; their flows agree to QMC."""
    seeds = _seeds(stored["imitation_samples"])
    for n in (16, 4096):
        ranked = _accuracy(seeds, objective="reward_model", n=n)
        for other in ("sft", "binary"):
            _within_mc(_accuracy(seeds, objective=other, n=n), ranked)
    flows = [_accuracy(seeds, "theory", objective=o, n=4096)[0] for o in METRIC]
    assert max(flows) - min(flows) <= QMC


def test_at_the_budget_ranked_preference_leads(stored):
    """At step BUDGET_STEP (n = 4096), ranked preference is ahead of binary
    discrimination (half its speed) and of imitation (which starts at the reference),
    by more than the Monte Carlo error; and so are their flows."""
    seeds = _seeds(stored["imitation_samples"], BUDGET_STEP)
    ranked = _accuracy(seeds, objective="reward_model", n=4096)
    for other in ("sft", "binary"):
        _clearly_below(_accuracy(seeds, objective=other, n=4096), ranked)
        assert (_accuracy(seeds, "theory", objective=other, n=4096)[0]
                < _accuracy(seeds, "theory", objective="reward_model", n=4096)[0])


def test_accuracy_rises_with_n_and_with_k(stored):
    seeds = _seeds(stored["imitation_samples"])
    features = _seeds(stored["imitation_features"])
    for objective in METRIC:
        _clearly_below(_accuracy(seeds, objective=objective, n=16),
                       _accuracy(seeds, objective=objective, n=4096))
        _clearly_below(_accuracy(features, objective=objective, k=1),
                       _accuracy(features, objective=objective, k=16))
        flows = [_accuracy(features, "theory", objective=objective, k=k)[0] for k in (1, 16)]
        assert flows[0] < flows[1]


def test_the_mlp_beats_the_linear_head_on_the_covariance_problem(stored):
    """Every objective: H = 16 above the linear head by more than the Monte Carlo error
    (paired by seed: the same sample), and the linear head near chance, as its flow."""
    mlp = _seeds(stored["imitation_mlp"])
    linear = _seeds(stored["imitation_linear"])
    for objective in METRIC:
        lin = _accuracy(linear, objective=objective)
        _clearly_below(lin + 0.15, _accuracy(mlp, objective=objective, H=16))
        assert abs(lin.mean() - 0.5) < 0.05
    theory = linear[linear["source"] == "theory"]
    assert np.all(np.abs(theory["accuracy"] - 0.5) < 0.05)


def test_imitation_at_eight_answers_is_slower_and_then_the_same(stored):
    """V = 8 (n = 4096): at the budget imitation is clearly behind ranked preference (the
    V = 2 run: a reward head never reads the other rows); at the end within Monte Carlo
    error of it."""
    ranked = {step: _accuracy(_seeds(stored["imitation_samples"], step),
                              objective="reward_model", n=4096) for step in (BUDGET_STEP, None)}
    eight = {step: _accuracy(_seeds(stored["imitation_vocab"], step), n=4096)
             for step in (BUDGET_STEP, None)}
    _clearly_below(eight[BUDGET_STEP], ranked[BUDGET_STEP])
    _within_mc(eight[None], ranked[None])


def test_figure_renders_png_and_pdf(stored, tmp_path):
    written = render("imitation_vs_preference", list(stored.values()), tmp_path)
    number = FIGURES["imitation_vs_preference"].number
    assert {p.name for p in written} == {f"fig{number}_imitation_vs_preference.png",
                                         f"fig{number}_imitation_vs_preference.pdf"}
    for path in written:
        assert path.stat().st_size > 10_000
