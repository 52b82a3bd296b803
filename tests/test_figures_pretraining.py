"""Figure 13 (preference-model pre-training): render from shrunk sweeps; the tables
against naive loops over the tidy table, the crossing against its definition, theory
against its closed form and the simulation, and the README's claims (transfer helps
when the behaviors are aligned, hurts at small n when they point apart) as paired-seed
inequalities whose margins are the Monte Carlo error of the seed count."""

from __future__ import annotations

import tomllib

import numpy as np
import pytest

from conftest import CLOSED_FORM, QUADRATURE, assert_close, mc_tolerance, run_shrunk_sweeps
from figures import FIGURES, render, sweep_configs
from figures.pretraining import (
    ACCURACY,
    accuracy_table,
    cosine_of,
    crossing,
    pmp_of,
    samples_needed,
    target_level,
    target_n,
    transfer_accuracy,
)

pytestmark = pytest.mark.sweep

ONE_SIDED_Z = 3.0
"""The claims are one-sided inequalities on paired per-seed differences: the mean must
exceed 3 standard errors (a false claim passes with probability about 1e-3); at n = 4 the
per-seed spread is large (sd ≈ 0.1), so Z_SCORE's 5 would need about 60 seeds."""

KEEP_N = (4, 64, 512)
"""The target sizes the shrunk sweeps keep (of 4 … 512)."""


def _drop_n(text: str, pmp: bool) -> dict:
    """Substitutions removing every phase list whose target n is not in KEEP_N."""
    subs = {}
    for n in (8, 16, 32, 128, 256):
        line = ('     { objective = "reward_model", steps = 50, lr = 0.25, behaviors = '
                f'["target"], n = {n} }}],\n')
        if pmp:
            line = ('    [{ objective = "reward_model", steps = 100, behaviors = ["related"], '
                    'pretraining = true },\n' + line)
        else:
            line = "    [" + line.lstrip()
        assert line in text, line
        subs[line] = ""
    return subs


def _shrunk():
    configs = {path.stem: path for path in sweep_configs("pretraining")}
    text = {stem: path.read_text(encoding="utf-8") for stem, path in configs.items()}
    common = ["train.n=1024", "train.heldout_n=2000"]
    shrunk = {
        "pretraining_pmp": ({**_drop_n(text["pretraining_pmp"], True),
                             '"problem.cosines" = [0.9, 0.5, 0.0, -0.5]':
                             '"problem.cosines" = [0.9, -0.5]'}, [], common, "0:24"),
        "pretraining_scratch": (_drop_n(text["pretraining_scratch"], False), [], common, "0:24"),
    }
    return configs, shrunk


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    configs, shrunk = _shrunk()
    return run_shrunk_sweeps(tmp_path_factory.mktemp("pretraining"), configs, shrunk)


def _both(stored):
    import pandas as pd

    frame = pd.concat([s.frame() for s in stored.values()], ignore_index=True)
    configs = {p: c for s in stored.values() for p, c in s.configs().items()}
    return frame, configs


def _final_per_seed(frame, configs, pmp, cosine, n):
    """Naive: the target's held-out accuracy at the point's last step, per seed."""
    pid = next(p for p, c in configs.items() if pmp_of(c) == pmp and target_n(c) == n
               and (not pmp or np.isclose(cosine_of(c), cosine)))
    rows = frame[(frame["point"] == pid) & (frame["source"] == "simulation")
                 & (frame["behavior"] == "target")]
    return rows[rows["step"] == rows["step"].max()].set_index("seed")[ACCURACY]


def _clearly_below(small, big):
    """``small < big`` by more than the Monte Carlo error of the mean of the per-seed
    differences (paired by seed: both runs share each seed's target sample)."""
    diff = (big - small.reindex(big.index)).to_numpy(dtype=np.float64)
    margin = float(mc_tolerance(diff.std(ddof=1), len(diff), z=ONE_SIDED_Z))
    assert diff.mean() > margin, (diff.mean(), margin)


# ============================================================================ coverage


def test_the_sweeps_cover_what_the_figure_claims(stored):
    full = {p.stem: tomllib.loads(p.read_text(encoding="utf-8"))
            for p in sweep_configs("pretraining")}
    grid = full["pretraining_pmp"]["sweep"]["grid"]
    assert sorted(grid["problem.cosines"]) == [-0.5, 0.0, 0.5, 0.9]
    for stem in full:
        ns = [phases[-1]["n"] for phases in full[stem]["sweep"]["grid"]["train.phases"]]
        assert ns == [4, 8, 16, 32, 64, 128, 256, 512]
    for config in stored["pretraining_pmp"].configs().values():
        phases = config["train"]["phases"]
        assert [p.get("pretraining", False) for p in phases] == [True, False]
        assert phases[0]["behaviors"] == ["related"] and phases[1]["behaviors"] == ["target"]
    for config in stored["pretraining_scratch"].configs().values():
        assert not pmp_of(config) and len(config["train"]["phases"]) == 1


# ============================================================================ tables vs naive loops


def test_accuracy_table_against_a_naive_loop(stored):
    frame, configs = _both(stored)
    table = accuracy_table(frame, configs)
    assert len(table) == 2 * len(configs)
    for row in table.itertuples():
        config = configs[row.point]
        rows = frame[(frame["point"] == row.point) & (frame["source"] == row.source)
                     & (frame["behavior"] == "target")]
        tuning = rows[rows["phase"] == len(config["train"]["phases"]) - 1]
        first = tuning[tuning["step"] == tuning["step"].min()][ACCURACY].to_numpy()
        last = tuning[tuning["step"] == tuning["step"].max()][ACCURACY].to_numpy()
        assert_close(row.start, first.mean(), CLOSED_FORM)
        assert_close(row.final, last.mean(), CLOSED_FORM)
        if row.source == "simulation":
            assert_close(row.final_sd, last.std(ddof=1), CLOSED_FORM)
            assert row.final_low < row.final < row.final_high
        assert row.n == config["train"]["phases"][-1]["n"]
        if row.pmp:
            assert_close(row.cosine, config["problem"]["cosines"], CLOSED_FORM)
        else:  # a zero head: every statement ties, which counts one half
            assert_close(row.start, 0.5, CLOSED_FORM)


def test_crossing_is_the_first_log_linear_crossing():
    ns = [4, 16, 64]
    assert crossing(ns, [0.6, 0.7, 0.8], 0.75) == pytest.approx(32.0, rel=CLOSED_FORM)
    assert crossing(ns, [0.76, 0.7, 0.8], 0.75) == 4.0  # at most the smallest n
    first = crossing(ns, [0.6, 0.8, 0.7], 0.75)  # the first of two crossings
    assert first == pytest.approx(4 * 4 ** 0.75, rel=CLOSED_FORM)
    assert np.isinf(crossing(ns, [0.6, 0.7, 0.72], 0.75))


def test_samples_needed_against_the_seed_means(stored):
    frame, configs = _both(stored)
    table = accuracy_table(frame, configs)
    level, _ = target_level(table)
    needed = samples_needed(frame, configs, level, boot=200)
    sim = table[table["source"] == "simulation"]
    for row in needed.itertuples():
        rows = sim[(sim["pmp"] == row.pmp) & ((not row.pmp) | np.isclose(sim["cosine"],
                                                                          row.cosine))]
        rows = rows.sort_values("n")
        want = crossing(rows["n"], rows["final"], level)
        assert row.needed == (min(want, rows["n"].max()) if np.isinf(want) else want)
        assert row.low <= row.high


# ============================================================================ theory


def test_theory_start_is_the_closed_form_and_the_asymptote_the_bayes_rule(stored):
    """After PMP the flow's head points along d_related, so its accuracy on the target is
    Φ(cos·δ/2σ) (docs/theory.md §13); the flows end at the population optimum Φ(δ/2σ);
    the simulated start agrees with the flow within the Monte Carlo error."""
    frame, configs = _both(stored)
    table = accuracy_table(frame, configs)
    theory = table[(table["source"] == "theory") & table["pmp"]]
    assert_close(theory["start"], transfer_accuracy(theory["cosine"], 2.0), QUADRATURE)
    level, asymptote = target_level(table)
    bayes = transfer_accuracy(1.0, 2.0)
    assert_close(asymptote, bayes, QUADRATURE)
    # from the pre-trained head the flow has nearly turned to d_target by the end (t = 12.5)
    assert np.all(np.abs(theory["final"] - bayes) < 1e-3)
    assert_close(level, 0.9 * asymptote, CLOSED_FORM)
    sim = table[(table["source"] == "simulation") & table["pmp"]]
    for row in sim.itertuples():
        want = theory[np.isclose(theory["cosine"], row.cosine)]["start"].iloc[0]
        # the pre-trained head is a finite-sample fit, and the held-out draw adds its own
        assert abs(row.start - want) <= mc_tolerance(row.start_sd, row.seeds) + 0.01


# ============================================================================ the README's claims


def test_aligned_pretraining_helps_and_opposed_pretraining_hurts_at_small_n(stored):
    frame, configs = _both(stored)
    small = min(KEEP_N)
    scratch = _final_per_seed(frame, configs, False, None, small)
    _clearly_below(scratch, _final_per_seed(frame, configs, True, 0.9, small))
    _clearly_below(_final_per_seed(frame, configs, True, -0.5, small), scratch)
    table = accuracy_table(frame, configs)
    level, _ = target_level(table)
    needed = samples_needed(frame, configs, level, boot=200).set_index(["pmp", "cosine"],
                                                                       drop=False)
    without = needed[~needed["pmp"]].iloc[0]
    aligned = needed[needed["pmp"] & np.isclose(needed["cosine"], 0.9)].iloc[0]
    assert aligned["high"] < without["low"]  # fewer samples, bootstrap intervals apart
    # at the largest n the head forgets where it started: within the Monte Carlo error
    big = max(KEEP_N)
    for cosine in (0.9, -0.5):
        diff = (_final_per_seed(frame, configs, True, cosine, big)
                - _final_per_seed(frame, configs, False, None, big)).to_numpy()
        assert abs(diff.mean()) <= mc_tolerance(diff.std(ddof=1), len(diff)) + 0.005


def test_figure_renders_png_and_pdf(stored, tmp_path):
    written = render("pretraining", list(stored.values()), tmp_path)
    number = FIGURES["pretraining"].number
    assert {p.name for p in written} == {f"fig{number}_pretraining.png",
                                         f"fig{number}_pretraining.pdf"}
    for path in written:
        assert path.stat().st_size > 10_000
