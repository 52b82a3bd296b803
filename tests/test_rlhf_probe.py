"""``prefdyn probe rlhf`` (:mod:`llm_probes.rlhf`): reward model, RL from it, DPO beside it.

References: the autograd Hessian of the KL penalty for RL's curvature; a hand-written
Bradley–Terry gradient descent for the reward model; the closed-form RL optimum
``W0 + Φ/β`` reached by the engine's exact RL; the Bernoulli KL from its probabilities.
The ``llm`` tier runs the probe on a few real statements and pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dynamics.model import NO, YES
from dynamics.objectives import rlhf_loss
from dynamics.simulate import simulate_sample
from llm_fixtures import llm_cache_dir, loaded_model  # noqa: F401
from llm_probes.cli import main as probe_main
from llm_probes.rlhf import _bernoulli_kl, _head, parse_sizes, reward_curve, rlhf_curvature
from synthetic.sampling import PreferenceSample

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def features(n=24, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    signs = np.where(np.arange(n) % 3 == 0, -1.0, 1.0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.8 * torch.as_tensor(
        signs)[:, None] * torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)[:d]
    return x, signs


def test_rl_curvature_is_the_largest_eigenvalue_of_the_kl_hessian():
    """The curvature :func:`rlhf_curvature` computes is that of RL's KL penalty
    ``β KL(π ‖ π0)`` at ``W0``: the reference is autograd's Hessian of the engine's
    ``rlhf_loss`` with zero rewards."""
    x, _ = features()
    w0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    beta = 0.7

    def penalty(flat):
        logits = (x @ flat.reshape(4, 3).T).T  # (V, n)
        return rlhf_loss(logits, reference=(x @ w0.T).T, rewards=torch.zeros(4, len(x)),
                         beta=beta).mean()

    hess = torch.autograd.functional.hessian(penalty, w0.reshape(-1))
    want = float(torch.linalg.eigvalsh(hess)[-1])
    assert rlhf_curvature(x, w0.numpy(), beta, iterations=500) == pytest.approx(want, rel=1e-6)


def naive_reward_model(x, s, lr, steps):
    """``ψ ← ψ − 2·lr·∇ mean softplus(−s ψᵀg)`` (the difference view: both rows move)."""
    psi = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(steps):
        psi = psi + 2 * lr * (torch.sigmoid(-s * (x @ psi)) * s) @ x / len(s)
    return psi


def test_reward_curve_trains_bradley_terry_and_scores_held_out_pairs():
    x, s = features(30)
    xe, se = features(40, seed=5)
    table = reward_curve(x, s, xe, se, sizes=["all"], seeds=3, lr=0.2, steps=50)
    assert len(table) == 1  # "all" is one subset, whatever the seeds
    psi = naive_reward_model(x, torch.as_tensor(s), 0.2, 50)
    want = ((torch.as_tensor(se) * (xe @ psi)) > 0).double().mean()
    assert table.test_accuracy.iloc[0] == pytest.approx(float(want), abs=1e-12)
    train = ((torch.as_tensor(s) * (x @ psi)) > 0).double().mean()
    assert table.train_accuracy.iloc[0] == pytest.approx(float(train), abs=1e-12)


def test_reward_curve_subsets_are_stratified_and_differ():
    x, s = features(30)
    table = reward_curve(x, s, x, s, sizes=[6, 12, 100], seeds=4, lr=0.2, steps=5)
    assert list(table.groupby("n").size().items()) == [(6, 4), (12, 4), (30, 1)]
    from llm_probes.rlhf import _stratified

    rng = np.random.default_rng(0)
    picks = [_stratified(s, 12, rng) for _ in range(4)]
    for p in picks:  # one third of the statements answer No: 4 of 12
        assert len(set(p)) == 12 and (s[p] < 0).sum() == 4
    assert len({tuple(p) for p in picks}) > 1


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_the_reward_model_at_beta_squared_lr_is_beta_times_dpo(beta):
    x, s = features()
    t = torch.as_tensor(s)
    data = PreferenceSample(x[None], t[None], t[None], torch.zeros(len(s), dtype=torch.long),
                            ("b",))
    reference = np.random.default_rng(2).normal(size=(4, 3))
    dpo = simulate_sample(data, seeds=[0], beta=beta, lr=0.05, steps=80, reference=reference,
                          objective="dpo")
    rm = simulate_sample(data, seeds=[0], beta=beta, lr=beta**2 * 0.05, steps=80,
                         reference=reference, objective="reward_model")
    torch.testing.assert_close(rm.final[0, 0], beta * dpo.final[0, 0], rtol=1e-12, atol=1e-12)


def test_exact_rl_reaches_w0_plus_head_over_beta_which_is_dpos_endpoint():
    """RL's optimum ``W* = W0 + Φ/β``: its Yes − No difference is DPO's ``Δ`` at the
    matched step, its other rows do not move."""
    x, s = features(n=60, d=2)
    t = torch.as_tensor(s)
    data = PreferenceSample(x[None], t[None], t[None], torch.zeros(len(s), dtype=torch.long),
                            ("b",))
    reference = np.zeros((3, 2))  # a uniform start: every answer has mass to move
    beta = 1.0
    dpo = simulate_sample(data, seeds=[0], beta=beta, lr=0.1, steps=40, reference=reference,
                          objective="dpo")
    rm = simulate_sample(data, seeds=[0], beta=beta, lr=beta**2 * 0.1, steps=40,
                         reference=reference, objective="reward_model")
    head = _head(rm.final[0, 0].numpy(), reference.shape)
    rl = simulate_sample(data, seeds=[0], beta=beta, lr=1.0, steps=3000, reference=reference,
                         objective="rlhf", reward_head=head)
    d = rl.final[0, 0].numpy()
    np.testing.assert_allclose(d, head / beta, atol=2e-4)
    np.testing.assert_allclose(d[YES] - d[NO], dpo.final[0, 0].numpy(), atol=4e-4)


def test_bernoulli_kl_is_the_kl_of_the_two_probabilities():
    z, z0 = torch.tensor([-3.0, 0.0, 2.5], dtype=torch.float64), torch.tensor(
        [1.0, -1.0, 2.5], dtype=torch.float64)
    p, q = torch.sigmoid(z), torch.sigmoid(z0)
    want = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(_bernoulli_kl(z, z0), want, rtol=0, atol=1e-14)


def test_parse_sizes():
    assert parse_sizes("8, 16,all") == [8, 16, "all"]
    for bad in ("x", "1", ",", "8,,16"):
        with pytest.raises(Exception, match="--rm-sizes"):
            parse_sizes(bad)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefdyn: error: "), err
    return err[0]


@pytest.mark.parametrize("extra, fragment", [
    (["--rm-sizes", "2,x"], "--rm-sizes = '2,x' must be integers >= 2 or all"),
    (["--steps", "10", "--eval-every", "20"], "--eval-every = 20 must be <= 10"),
    (["--qmc-points", "0"], "--qmc-points = 0 must be >= 16"),
    (["--rl-lr", "-1"], "--rl-lr = -1.0 must be > 0, or be auto"),
    (["--test-fraction", "0.5"], "--test-fraction = 0.5 applies only with --pairs"),
    (["--lr-fraction", "1"], "--lr-fraction = 1.0 must be < 1"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, capsys, extra, fragment):
    out = tmp_path / "out"
    code = probe_main(["rlhf", "--behaviors", "agreeableness", "--persona-dir",
                       str(SHARED / "persona"), "--out", str(out), *extra])
    assert code == 2 and fragment in one_line(capsys) and not out.exists()


def test_pairs_need_held_out_pairs(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "Hi?", "chosen": " Yes.", "rejected": " No."}\n' * 3)
    out = tmp_path / "out"
    assert probe_main(["rlhf", "--pairs", str(data), "--test-fraction", "0", "--out",
                       str(out)]) == 2
    assert "--test-fraction = 0 must be > 0 with --pairs" in one_line(capsys)


@pytest.mark.llm
def test_the_probe_on_real_statements(tmp_path, loaded_model):  # noqa: F811
    out = tmp_path / "out"
    assert probe_main(["rlhf", "--behaviors", "agreeableness", "--persona-dir",
                       str(SHARED / "persona"), "--max-statements", "24", "--steps", "40",
                       "--rl-steps", "40", "--eval-every", "20", "--vocab", "4",
                       "--qmc-points", "64", "--rm-sizes", "4,all", "--rm-seeds", "2",
                       "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    record = json.loads((out / "rlhf_summary.json").read_text())
    row = record["behaviors"][0]
    assert row["rm_equals_beta_dpo"] < 1e-10 and row["vocab"] == 6
    assert 0 < row["rl_to_dpo_endpoint"] < 1  # RL has moved towards DPO's endpoint
    assert abs(row["rl_to_dpo_endpoint"] - row["rl_to_dpo_endpoint_theory"]) < 0.1
    assert row["rl_kl"] < row["rl_optimum_kl"]
    import pandas as pd

    learning = pd.read_parquet(out / "rlhf_reward_model.parquet")
    assert sorted(set(learning.n))[0] == 4 and len(learning) == 2
    assert (out / "probe_rlhf.png").exists()


@pytest.mark.llm
@pytest.mark.skipif(not (SHARED / "hh-rlhf").exists(), reason="../shared/data/hh-rlhf")
def test_the_probe_on_real_pairs(tmp_path, loaded_model):  # noqa: F811
    out = tmp_path / "out"
    assert probe_main(["rlhf", "--pairs", str(SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"),
                       "--skip-bad", "--max-pairs", "8", "--max-prompt-tokens", "32",
                       "--max-response-tokens", "8", "--steps", "6", "--rl-steps", "6",
                       "--eval-every", "3", "--rm-sizes", "2,all", "--rm-seeds", "2",
                       "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    summary = json.loads((out / "rlhf_summary.json").read_text())
    import pandas as pd

    history = pd.read_parquet(out / "rlhf_pairs.parquet")
    rl = history[history.method == "rlhf"]
    assert list(rl.loss) == sorted(rl.loss, reverse=True)  # the return rises every record
    assert rl.to_rl_optimum.iloc[0] == pytest.approx(1.0)  # margins start at zero
    assert rl.to_rl_optimum.iloc[-1] < 1 and rl.prob_to_rl_optimum.iloc[-1] < \
        rl.prob_to_rl_optimum.iloc[0]
    assert summary["train_pairs"] == 6 and summary["test_pairs"] == 2
    dpo = history[history.method == "dpo"]
    assert list(dpo.loss) == sorted(dpo.loss, reverse=True)
    final = pd.read_parquet(out / "rlhf_pairs_final.parquet")
    assert len(final) == 6
    np.testing.assert_allclose(final.rl_optimum, final.reward_gap / 1.0)
    np.testing.assert_allclose(final.rl_prob, 1 / (1 + np.exp(-(final.reference_margin
                                                               + final.rl_margin))))
    assert summary["rlhf_margin"] == pytest.approx(final.rl_margin.mean())
