"""Figure 11 (RLHF's stability: the alignment tax against PPO-ptx, forgetting and
selective rehearsal, unequal reward scales and the advantage model): render from shrunk
sweeps; what it draws is checked as numbers against naive loops over the tidy table,
theory against simulation, and the README's claims as inequalities whose margins are
the Monte Carlo error of the seed count."""

from __future__ import annotations

import tomllib

import numpy as np
import pandas as pd
import pytest

from conftest import CLOSED_FORM, FLOAT32, QMC, assert_close, mc_tolerance, run_shrunk_sweeps
from dynamics.config import objective_name, pretraining_of
from figures import FIGURES, render, sweep_configs
from figures.rlhf_stability import (
    CHOSEN_SELECT_BELOW,
    HAD_RIGHT,
    crowd_out,
    kind,
    ptx_table,
    rehearsal_of,
    rehearsal_table,
    scales_table,
)

pytestmark = pytest.mark.sweep

# config stem -> (text substitutions shrinking the phases, --grid, --set, seeds)
SHRUNK = {
    "rlhf_stability_ptx": ({}, ["train.objective.ptx_coef=0,1,4"],
                           ["train.n=600", "pretrain.n=600", "train.steps=60"], "0:4"),
    "rlhf_stability_rehearsal": ({"steps = 60 }": "steps = 30 }", "steps = 200,": "steps = 60,"},
                                 [], ["train.n=600"], "0:4"),
    "rlhf_stability_scales": ({}, ["problem.behaviors.1.reward_scale=1,10"],
                              ["train.n=600", "train.steps=60"], "0:4"),
}
SMALL = "A (scale 1)"
"""The behavior of the scales sweep whose reward scale stays 1."""


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    configs = {path.stem: path for path in sweep_configs("rlhf_stability")}
    return run_shrunk_sweeps(tmp_path_factory.mktemp("stability"), configs, SHRUNK)


def _full(stem: str) -> dict:
    path = next(p for p in sweep_configs("rlhf_stability") if p.stem == stem)
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _final_per_seed(frame, metric, behavior=None):
    """Per point: the per-seed values of ``metric`` at the point's last step
    (behavior-mean, or one behavior's), as a Series indexed by seed."""
    sim = frame[frame["source"] == "simulation"]
    if behavior is not None:
        sim = sim[sim["behavior"] == behavior]
    out = {}
    for pid, rows in sim.groupby("point"):
        last = rows[rows["step"] == rows["step"].max()]
        out[pid] = last.groupby("seed")[metric].mean()
    return out


def _clearly_below(small, big):
    """``small < big`` by more than the Monte Carlo error of the mean of the per-seed
    differences (paired by seed: both runs share each seed's sample)."""
    diff = (big - small.reindex(big.index)).to_numpy(dtype=np.float64)
    margin = float(mc_tolerance(diff.std(ddof=1), len(diff)))
    assert diff.mean() > margin, (diff.mean(), margin)


# ============================================================================ coverage


def test_the_sweeps_cover_what_the_figure_claims(stored):
    assert {stem: kind(s) for stem, s in stored.items()} == {
        "rlhf_stability_ptx": "ptx", "rlhf_stability_rehearsal": "rehearsal",
        "rlhf_stability_scales": "scales"}
    ptx = _full("rlhf_stability_ptx")["sweep"]["grid"]["train.objective.ptx_coef"]
    assert 0.0 in ptx and sum(g > 0 for g in ptx) >= 5
    for config in stored["rlhf_stability_ptx"].configs().values():
        assert config["model"]["vocab_size"] == 2 and config["train"]["objective"][
            "estimator"] == "exact"
    full = _full("rlhf_stability_rehearsal")
    points = [rehearsal_of({"train": {"phases": p}}) for p in full["sweep"]["grid"]
              ["train.phases"]]
    assert [r for r, _ in points].count("none") == 1
    assert CHOSEN_SELECT_BELOW in [b for r, b in points if r == "selective"]
    assert len([b for r, b in points if r == "selective"]) >= 3
    for config in stored["rlhf_stability_rehearsal"].configs().values():
        names = [objective_name(p["objective"]) for p in config["train"]["phases"]]
        assert names == ["sft", "rlhf"]
        head = np.asarray(config["model"]["reward_head"])
        psi = head[0] - head[1]
        assert psi[0] > 4 * psi[1] > 0  # the head under-rewards B (its e2) against A (e1)
    full = _full("rlhf_stability_scales")["sweep"]["grid"]
    assert 1.0 in full["problem.behaviors.1.reward_scale"]
    assert max(full["problem.behaviors.1.reward_scale"]) >= 10
    assert sorted(full["train.objective.score"]) == ["advantage", "reward"]
    for config in stored["rlhf_stability_scales"].configs().values():
        assert config["problem"]["behaviors"][0]["reward_scale"] == 1.0
        assert config["problem"]["behaviors"][0]["name"] == SMALL


def test_the_reference_is_the_pretraining_optimum():
    """The (a) sweep's W0 minimises the pretraining loss: the gradient of
    ``E[−log π0(y|g)]`` on u = w_Yes − w_No, ``E[(π0(Yes|g) − 1[y = Yes]) g]``, is zero
    within the Monte Carlo error of 400,000 draws (a naive estimate, not the flow's)."""
    from dynamics.config import parse_config

    raw = _full("rlhf_stability_ptx")
    raw.pop("sweep")
    config = parse_config(raw)
    pretrain, _ = pretraining_of(config)
    x, tokens = pretrain.sample(400_000, [11])
    x, yes = x[0].double().numpy(), (tokens.numpy() == 0).astype(np.float64)
    w0 = np.asarray(config["model"]["reference"], dtype=np.float64)
    p = 1 / (1 + np.exp(-(x @ (w0[0] - w0[1]))))
    samples = (p - yes)[:, None] * x
    assert_close(samples.mean(0), 0.0, 1.0, scale=mc_tolerance(samples.std(0), len(x)))


# ============================================================================ tables vs naive loops


def test_ptx_table_against_a_naive_loop(stored):
    sweep = stored["rlhf_stability_ptx"]
    frame, configs = sweep.frame(), sweep.configs()
    table = ptx_table(frame, configs)
    assert len(table) == 2 * len(configs)
    for row in table.itertuples():
        rows = frame[(frame["point"] == row.point) & (frame["source"] == row.source)]
        first, last = rows["step"].min(), rows["step"].max()
        start = _per_seed(rows[rows["step"] == first], "pretrain/loss")
        end = {m: _per_seed(rows[rows["step"] == last], m)
               for m in ("pretrain/loss", "objective/rlhf_reward", "clean_accuracy")}
        assert_close(row.reference_tax, np.mean(start), CLOSED_FORM)
        assert_close(row.final_tax, np.mean(end["pretrain/loss"]), CLOSED_FORM)
        assert_close(row.tax, np.mean(np.subtract(end["pretrain/loss"], start)), CLOSED_FORM)
        assert_close(row.final_return, np.mean(end["objective/rlhf_reward"]), CLOSED_FORM)
        assert_close(row.final_accuracy, np.mean(end["clean_accuracy"]), CLOSED_FORM)
        if row.source == "simulation":
            assert_close(row.final_tax_sd, np.std(end["pretrain/loss"], ddof=1), CLOSED_FORM)
        assert row.ptx_coef == configs[row.point]["train"]["objective"]["ptx_coef"]


def _per_seed(rows, metric):
    """The mean of ``metric`` over the rows of each seed, seeds in order (theory's
    missing seed is one run)."""
    seeds = rows["seed"].astype("float").fillna(-1.0)
    return [rows[seeds == s][metric].mean() for s in sorted(set(seeds))]


def test_rehearsal_table_against_a_naive_loop(stored):
    sweep = stored["rlhf_stability_rehearsal"]
    frame, configs = sweep.frame(), sweep.configs()
    table = rehearsal_table(frame, configs)
    assert len(table) == 2 * 2 * len(configs)
    for row in table.itertuples():
        rows = frame[(frame["point"] == row.point) & (frame["source"] == row.source)
                     & (frame["behavior"] == row.behavior)]
        phases = configs[row.point]["train"]["phases"]
        boundary = phases[0]["steps"]  # the RL phase's first row: the SFT policy
        at = lambda step, phase: rows[(rows["step"] == step) & (rows["phase"] == phase)  # noqa: E731
                                      ].sort_values("seed")["clean_accuracy"].to_numpy()
        start, sft = at(0, 0), at(boundary, 1)
        final = at(boundary + phases[1]["steps"], 1)
        assert_close(row.start, start.mean(), CLOSED_FORM)
        assert_close(row.sft, sft.mean(), CLOSED_FORM)
        assert_close(row.final, final.mean(), CLOSED_FORM)
        assert_close(row.forgetting, (sft - final).mean(), CLOSED_FORM)
        if row.source == "simulation":
            assert_close(row.forgetting_sd, np.std(sft - final, ddof=1), CLOSED_FORM)
        assert row.had_right == (sft.mean() >= HAD_RIGHT)
        hyper = phases[1]["objective"]
        assert row.rehearsal == hyper["rehearsal"]
        assert (np.isnan(row.select_below) if row.rehearsal == "none"
                else row.select_below == hyper["select_below"])


def test_scales_table_and_crowd_out_against_a_naive_loop(stored):
    sweep = stored["rlhf_stability_scales"]
    frame, configs = sweep.frame(), sweep.configs()
    table = scales_table(frame, configs)
    for row in table.to_dict("records"):
        config = configs[row["point"]]
        scales = {b["name"]: b["reward_scale"] for b in config["problem"]["behaviors"]}
        assert row["reward_scale"] == scales[row["behavior"]]
        assert row["ratio"] == max(scales.values()) / min(scales.values())
        assert row["score"] == config["train"]["objective"]["score"]
        rows = frame[(frame["point"] == row["point"]) & (frame["source"] == row["source"])
                     & (frame["behavior"] == row["behavior"])]
        last = rows[rows["step"] == rows["step"].max()]
        assert_close(row["return"], last["objective/rlhf_reward"].mean(), CLOSED_FORM)
        assert_close(row["kl"], last["objective/kl"].mean(), CLOSED_FORM)
        assert_close(row["own_reward"],
                     (last["objective/scores"] / scales[row["behavior"]]).mean(), CLOSED_FORM)
        assert_close(row["accuracy"], last["clean_accuracy"].mean(), CLOSED_FORM)
    crowd = crowd_out(table, SMALL)
    for row in crowd.itertuples():
        mine = table[(table["behavior"] == SMALL) & (table["source"] == row.source)
                     & (table["score"] == row.score)]
        base = mine[mine["ratio"] == 1]["return"].iloc[0]
        here = mine[mine["ratio"] == row.ratio]["return"].iloc[0]
        assert_close(row.crowd_out, 1 - here / base, CLOSED_FORM)


# ============================================================================ theory vs simulation


def _agree(frame, metrics, extra=0.0):
    """|seed mean − theory| ≤ Z·sd/√S (+ extra·(1 + |theory|) where the flow is QMC) at
    every recorded step, behavior and point."""
    sim = frame[frame["source"] == "simulation"]
    theory = frame[frame["source"] == "theory"].set_index(["point", "phase", "step",
                                                           "behavior"])
    grouped = sim.groupby(["point", "phase", "step", "behavior"], observed=True)[metrics]
    mean, sd, count = grouped.mean(), grouped.std(ddof=1), grouped.size()
    for metric in metrics:
        want = theory[metric].reindex(mean.index).to_numpy()
        tol = mc_tolerance(sd[metric].to_numpy(), int(count.min())) + extra * (1 + np.abs(want))
        gap = np.abs(mean[metric].to_numpy() - want)
        moving = sd[metric].to_numpy() > 0
        assert moving.mean() > 0.5
        assert np.all(gap[moving] <= tol[moving]), (metric, float((gap - tol).max()))


def test_theory_agrees_with_simulation(stored):
    """(a) exact RL drift, the pretraining term and the tax by QMC; (b) SFT and the
    selective RL flow by QMC; (c) exact RL, the advantage model's σ_k by QMC."""
    _agree(stored["rlhf_stability_ptx"].frame(),
           ["pretrain/loss", "objective/rlhf_reward", "clean_accuracy"], QMC)
    _agree(stored["rlhf_stability_rehearsal"].frame(),
           ["clean_accuracy", "objective/rlhf_reward"], QMC)
    _agree(stored["rlhf_stability_scales"].frame(),
           ["objective/rlhf_reward", "objective/kl", "clean_accuracy"], QMC)


# ============================================================================ the README's claims


def test_ptx_trades_the_tax_for_reward(stored):
    """(a): RL from the pretraining optimum pays a tax (final − reference pretrain/loss
    > 0), which falls strictly as γ grows, and the reward falls with it."""
    sweep = stored["rlhf_stability_ptx"]
    frame, configs = sweep.frame(), sweep.configs()
    table = ptx_table(frame, configs)
    theory = table[table["source"] == "theory"].sort_values("ptx_coef")
    assert np.all(np.diff(theory["final_tax"]) < 0)
    assert np.all(np.diff(theory["final_return"]) < 0)
    assert np.all(theory["tax"] > 0)
    by_gamma = sorted(configs, key=lambda p: configs[p]["train"]["objective"]["ptx_coef"])
    tax = _final_per_seed(frame, "pretrain/loss")
    reward = _final_per_seed(frame, "objective/rlhf_reward")
    for low, high in zip(by_gamma, by_gamma[1:]):
        _clearly_below(tax[high], tax[low])
        _clearly_below(reward[high], reward[low])
    # the tax at γ = 0 is real: above the reference's loss on the same held-out draw
    start = frame[(frame["source"] == "simulation") & (frame["step"] == 0)
                  & (frame["point"] == by_gamma[0])].groupby("seed")["pretrain/loss"].mean()
    _clearly_below(start, tax[by_gamma[0]])


def test_selective_rehearsal_keeps_what_rl_forgets(stored):
    """(b): SFT has B right; RL on the head that under-rewards B forgets it, and
    selective rehearsal at the figure's threshold forgets less, with A no worse off
    than the Monte Carlo error; in theory B's forgetting falls as the threshold falls."""
    sweep = stored["rlhf_stability_rehearsal"]
    frame, configs = sweep.frame(), sweep.configs()
    table = rehearsal_table(frame, configs)
    sim = table[table["source"] == "simulation"]
    b_name = next(b for b in sim["behavior"] if b.startswith("B"))
    a_name = next(b for b in sim["behavior"] if b.startswith("A"))
    none = next(p for p, c in configs.items() if rehearsal_of(c)[0] == "none")
    chosen = next(p for p, c in configs.items() if rehearsal_of(c)[1] == CHOSEN_SELECT_BELOW)
    assert sim[(sim["point"] == none) & (sim["behavior"] == b_name)]["had_right"].all()

    def fall(pid, behavior):
        rows = frame[(frame["point"] == pid) & (frame["source"] == "simulation")
                     & (frame["behavior"] == behavior)]
        first = rows[rows["objective"] == "rlhf"]["step"].min()
        at = lambda step: rows[(rows["step"] == step) & (rows["objective"] == "rlhf")  # noqa: E731
                               ].groupby("seed")["clean_accuracy"].mean()
        return at(first) - at(rows["step"].max())

    zero = pd.Series(0.0, index=fall(none, b_name).index)
    _clearly_below(zero, fall(none, b_name))  # forgotten without rehearsal
    _clearly_below(fall(chosen, b_name), fall(none, b_name))  # less with it
    a_fall = fall(chosen, a_name).to_numpy()
    assert a_fall.mean() <= mc_tolerance(a_fall.std(ddof=1), len(a_fall))
    theory = table[(table["source"] == "theory") & (table["behavior"] == b_name)
                   & (table["rehearsal"] == "selective")].sort_values("select_below")
    assert np.all(np.diff(theory["forgetting"]) > 0)
    worst = table[(table["source"] == "theory") & (table["behavior"] == b_name)
                  & (table["rehearsal"] == "none")]["forgetting"].iloc[0]
    assert theory["forgetting"].max() < worst


def test_raw_rewards_crowd_out_the_small_scale_and_the_advantage_model_does_not(stored):
    """(c): with raw rewards the unit-scale behavior's KL-regularised return falls as the
    other's scale grows (its KL rises past its own optimum's); with the advantage model
    its whole run is the same at every ratio (each behavior is scaled to unit variance,
    so the ratio cancels), in simulation to float32 rounding and in theory exactly."""
    sweep = stored["rlhf_stability_scales"]
    frame, configs = sweep.frame(), sweep.configs()
    table = scales_table(frame, configs)
    crowd = crowd_out(table, SMALL)
    raw = crowd[crowd["score"] == "reward"]
    assert np.all(raw[raw["ratio"] > 1]["crowd_out"] > 0.3)
    points = {(c["train"]["objective"]["score"], c["problem"]["behaviors"][1]["reward_scale"]):
              p for p, c in configs.items()}
    ret = _final_per_seed(frame, "objective/rlhf_reward", SMALL)
    kl = _final_per_seed(frame, "objective/kl", SMALL)
    _clearly_below(ret[points[("reward", 10.0)]], ret[points[("reward", 1.0)]])
    _clearly_below(kl[points[("reward", 1.0)]], kl[points[("reward", 10.0)]])
    mine = frame[frame["behavior"] == SMALL].sort_values(["source", "seed", "step"])
    one, ten = (mine[mine["point"] == points[("advantage", s)]] for s in (1.0, 10.0))
    for source, tol in (("simulation", FLOAT32), ("theory", CLOSED_FORM)):
        for metric in ("objective/rlhf_reward", "objective/kl", "clean_accuracy"):
            assert_close(ten[ten["source"] == source][metric].to_numpy(),
                         one[one["source"] == source][metric].to_numpy(), tol,
                         err_msg=f"{source} {metric}")


def test_figure_renders_png_and_pdf(stored, tmp_path):
    written = render("rlhf_stability", list(stored.values()), tmp_path)
    number = FIGURES["rlhf_stability"].number
    assert {p.name for p in written} == {f"fig{number}_rlhf_stability.png",
                                         f"fig{number}_rlhf_stability.pdf"}
    for path in written:
        assert path.stat().st_size > 10_000
