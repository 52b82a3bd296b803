"""Whole-output-layer DPO on frozen multi-token states (:mod:`llm_probes.pair_last_layer`).

References, all independent of the module's blocked, in-place arithmetic: a naive
per-response loop over tokens with autograd for ``log π``, the loss and its gradient;
the Jacobian of every response's ``log π`` (autograd) for the first-order prediction
and its split into the chosen and rejected sides; Ren & Sutherland's ``A K G`` sum
term by term; the exact Gauss–Newton matrix ``β²/(4n) JᵀJ``; and the Taylor remainder,
which must shrink as ``η²``. The ``llm`` tier runs the probe on real pairs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_fixtures import llm_cache_dir, loaded_model  # noqa: F401
from llm_probes.cli import main as probe_main
from dynamics.objectives import rlhf_loss
from llm_probes.pair_last_layer import (PairStates, WholeLayer, gauss_newton_limit,
                                        one_step_kernel, pair_objective, pair_objectives,
                                        split_pairs)

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / \
    "harmless-base-test.jsonl.gz"
V, D, N, M = 7, 3, 3, 2
BETA = 0.7


def problem(seed: int = 0):
    """Random states, targets and ``W0``; response lengths 1–3 (train and test)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (2 * (N + M),), generator=g).numpy()
    offsets = np.r_[0, np.cumsum(counts)]
    h = torch.randn(int(offsets[-1]), D, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (int(offsets[-1]),), generator=g)
    w0 = torch.randn(V, D, generator=g, dtype=torch.float64)
    return PairStates(h, y, offsets, N, M), w0


def naive_logps(w, data):
    out = []
    for r in range(data.responses):
        total = 0.0
        for k in range(data.offsets[r], data.offsets[r + 1]):
            z = w @ data.states[k]
            total = total + z[data.targets[k]] - torch.logsumexp(z, 0)
        out.append(total)
    return torch.stack(out)


def naive_loss(w, data, reference):
    delta = naive_logps(w, data) - reference
    return torch.nn.functional.softplus(-BETA * (delta[:N] - delta[N:2 * N])).mean()


def jacobian(w, data):
    """``∂ log π(r) / ∂W`` of every response, ``(responses, V·D)``."""
    return torch.autograd.functional.jacobian(
        lambda flat: naive_logps(flat.reshape(V, D), data), w.reshape(-1))


@pytest.mark.parametrize("seed", [0, 1])
def test_steps_equal_autograd_on_a_naive_loss(seed):
    data, w0 = problem(seed)
    model = WholeLayer(w0, data, beta=BETA, dtype=torch.float64, rows=4)
    reference = naive_logps(w0, data)
    torch.testing.assert_close(model.reference, reference, rtol=0, atol=1e-13)
    w = w0.clone()
    for _ in range(4):
        wt = w.clone().requires_grad_(True)
        loss = naive_loss(wt, data, reference)
        grad, = torch.autograd.grad(loss, wt)
        out = model.step(0.3)
        assert out["loss"] == pytest.approx(float(loss.detach()), abs=1e-14)
        torch.testing.assert_close(out["logp"], naive_logps(w, data), rtol=0, atol=1e-13)
        w = w - 0.3 * grad
        torch.testing.assert_close(model.w, w, rtol=0, atol=1e-14)


def test_the_prediction_is_the_first_order_change_and_its_two_sides():
    """``predicted = J ΔW``; the chosen side is ``J`` times the step of the chosen
    responses' terms of the gradient alone (autograd of ``Σ a_r log π(r)`` over them)."""
    data, w0 = problem(2)
    model = WholeLayer(w0, data, beta=BETA, dtype=torch.float64)
    model.step(0.2)  # off the start, where the margins are no longer zero
    w = model.w.clone()
    reference = model.reference
    lr = 0.05
    out = model.step(lr, split=True)
    J = jacobian(w, data)
    wt = w.clone().requires_grad_(True)
    grad, = torch.autograd.grad(naive_loss(wt, data, reference), wt)
    torch.testing.assert_close(out["predicted"], J @ (-lr * grad).reshape(-1), rtol=0,
                               atol=1e-13)
    a = model.coefficients(out["margin"])
    wt = w.clone().requires_grad_(True)
    chosen, = torch.autograd.grad((a[:N] * naive_logps(wt, data)[:N]).sum(), wt)
    torch.testing.assert_close(out["from_chosen"], J @ (-lr * chosen).reshape(-1), rtol=0,
                               atol=1e-13)
    torch.testing.assert_close(out["from_chosen"] + out["from_rejected"], out["predicted"],
                               rtol=0, atol=1e-15)
    kernel = one_step_kernel(w, data, reference, objective=model.objective, lr=lr)
    torch.testing.assert_close(out["predicted"], kernel, rtol=0, atol=1e-13)


def test_the_remainder_of_the_prediction_shrinks_as_the_square_of_the_step():
    data, w0 = problem(3)
    errors = []
    for lr in (0.08, 0.04, 0.02, 0.01):
        model = WholeLayer(w0, data, beta=BETA, dtype=torch.float64)
        model.step(0.2)
        w = model.w.clone()
        out = model.step(lr)
        measured = naive_logps(model.w, data) - naive_logps(w, data)
        # logsumexp is convex: the first-order prediction never falls short of the change
        assert float((measured - out["predicted"]).max()) <= 1e-14
        errors.append(float((measured - out["predicted"]).abs().max()))
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert np.all((ratios > 3.5) & (ratios < 4.5)), ratios


def test_the_gauss_newton_curvature_is_that_of_the_jacobian():
    data, w0 = problem(4)
    model = WholeLayer(w0, data, beta=BETA, dtype=torch.float64, rows=5)
    J = jacobian(w0, data)
    grad_margin = J[:N] - J[N:2 * N]
    want = float(torch.linalg.eigvalsh(BETA**2 / (4 * N) * grad_margin.T @ grad_margin)[-1])
    got = gauss_newton_limit(model)
    assert got["curvature"] == pytest.approx(want, rel=1e-12)
    assert got["limit"] == pytest.approx(2 / want, rel=1e-12)


def objective_for(name, data, w0):
    """``name`` as the model trains it: ``rlhf`` with a random reward gap per train pair
    and the reference margins of ``w0``."""
    if name != "rlhf":
        return name
    gap = torch.linspace(-2.0, 3.0, data.n_train, dtype=torch.float64)
    return lambda ref: pair_objective("rlhf", beta=BETA, reward_gap=gap,
                                      reference_margin=ref[:N] - ref[N:2 * N])


@pytest.mark.parametrize("name", pair_objectives())
def test_every_pair_objective_steps_as_autograd_of_its_own_loss(name):
    """The registry's margin objectives and rlhf: ``ℓ'`` and ``ℓ''`` are autograd's
    derivatives of ``ℓ``, and a step is autograd's step of ``(1/n) Σ ℓ(m_i)`` through
    the naive log-probabilities."""
    data, w0 = problem(6)
    model = WholeLayer(w0, data, beta=BETA, objective=objective_for(name, data, w0),
                       dtype=torch.float64)
    obj = model.objective
    m = torch.linspace(-1.5, 2.5, N, dtype=torch.float64).requires_grad_(True)
    slope, = torch.autograd.grad(obj.loss(m).sum(), m, create_graph=True)
    torch.testing.assert_close(obj.grad(m.detach()), slope.detach(), rtol=0, atol=1e-12)
    if obj.hess is not None:
        curve, = torch.autograd.grad(slope.sum(), m)
        torch.testing.assert_close(obj.hess(m.detach()), curve, rtol=0, atol=1e-12)
    reference = naive_logps(w0, data)
    w = w0.clone()
    for _ in range(3):
        wt = w.clone().requires_grad_(True)
        delta = naive_logps(wt, data) - reference
        loss = obj.loss(delta[:N] - delta[N:2 * N]).mean()
        grad, = torch.autograd.grad(loss, wt)
        out = model.step(0.2)
        assert out["loss"] == pytest.approx(float(loss.detach()), abs=1e-13)
        w = w - 0.2 * grad
        torch.testing.assert_close(model.w, w, rtol=0, atol=1e-13)


def test_rlhf_on_two_responses_is_the_engines_rlhf_with_two_answers():
    """The engine's ``rlhf_loss`` on logits ``(2, n)`` (answers y_w, y_l) is the pairs
    objective plus ``−r(y_l)``, and its optimum is the margin ``Δr/β``."""
    g = torch.Generator().manual_seed(7)
    ref = torch.randn(2, 5, generator=g, dtype=torch.float64)
    logits = torch.randn(2, 5, generator=g, dtype=torch.float64)
    rewards = torch.randn(2, 5, generator=g, dtype=torch.float64)
    z0 = ref[0] - ref[1]
    m = (logits[0] - logits[1]) - z0
    obj = pair_objective("rlhf", beta=BETA, reference_margin=z0,
                         reward_gap=rewards[0] - rewards[1])
    engine = rlhf_loss(logits, reference=ref, rewards=rewards, beta=BETA)
    torch.testing.assert_close(obj.loss(m) - rewards[1], engine, rtol=0, atol=1e-12)
    optimum = (rewards[0] - rewards[1]) / BETA
    torch.testing.assert_close(obj.grad(optimum), torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("name", ["dpo", "ipo", "rlhf"])
def test_the_gauss_newton_curvature_away_from_the_start(name):
    data, w0 = problem(8)
    model = WholeLayer(w0, data, beta=BETA, objective=objective_for(name, data, w0),
                       dtype=torch.float64)
    model.step(0.3)
    J = jacobian(model.w, data)
    delta = naive_logps(model.w, data) - model.reference
    weight = model.objective.hess(delta[:N] - delta[N:2 * N]).clamp_min(0) / N
    grad_margin = J[:N] - J[N:2 * N]
    want = float(torch.linalg.eigvalsh(grad_margin.T @ (weight[:, None] * grad_margin))[-1])
    assert gauss_newton_limit(model)["curvature"] == pytest.approx(want, rel=1e-10)


def test_objectives_that_do_not_train_on_pairs_are_refused():
    for name in ("reward_model", "sft", "distill", "binary"):
        with pytest.raises(Exception, match="must be one of dpo"):
            pair_objective(name, beta=1.0)
    with pytest.raises(Exception, match="estimator = 'ppo' must be exact on pairs"):
        pair_objective({"name": "rlhf", "estimator": "ppo"}, beta=1.0, reward_gap=[0.0],
                       reference_margin=[0.0])


def test_float32_follows_float64():
    data, w0 = problem(5)
    runs = [WholeLayer(w0, data, beta=BETA, dtype=dtype) for dtype in
            (torch.float64, torch.float32)]
    for _ in range(5):
        a, b = (run.step(0.1) for run in runs)
        torch.testing.assert_close(b["logp"], a["logp"], rtol=0, atol=1e-4)
        torch.testing.assert_close(b["predicted"], a["predicted"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("n, fraction", [(10, 0.25), (3, 0.9), (1, 0.5), (8, 0.0)])
def test_split_pairs_is_a_seeded_partition_that_keeps_a_train_pair(n, fraction):
    train, test = split_pairs(n, fraction, seed=3)
    assert sorted(np.r_[train, test]) == list(range(n)) and len(train) >= 1
    assert len(test) == min(round(n * fraction), n - 1)
    again = split_pairs(n, fraction, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


# ------------------------------------------------------------------------ the command

GOOD = ('{"prompt": "Is the sky blue?", "chosen": " Yes.", "rejected": " No."}\n' * 3)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefdyn: error: "), err
    return err[0]


@pytest.mark.parametrize("extra, fragment", [
    (["--center"], "--center = True applies to --behaviors runs only"),
    (["--together"], "--together = True applies to --behaviors runs only"),
    (["--test-fraction", "1"], "--test-fraction = 1.0 must be < 1"),
    (["--lr", "0"], "--lr = 0.0 must be > 0, or be auto"),
    (["--lr", "0.1", "--lr-fraction", "0.3"], "--lr-fraction = 0.3 applies only with --lr auto"),
    (["--objective", "sft"], "--objective = 'sft' must be one of dpo, cdpo"),
    (["--objective", "rlhf"], "(rlhf needs a reward model: prefdyn probe rlhf)"),
    (["--objective", "hinge"], "--lr = 'auto' needs the loss's curvature, which hinge does not "
     "have; give a number"),
])
def test_pairs_options_of_last_layer_are_refused_before_anything_is_written(
        tmp_path, capsys, extra, fragment):
    data = tmp_path / "p.jsonl"
    data.write_text(GOOD)
    out = tmp_path / "out"
    assert probe_main(["last-layer", "--pairs", str(data), "--out", str(out), *extra]) == 2
    assert fragment in one_line(capsys) and not out.exists()


def test_test_fraction_is_refused_without_pairs(tmp_path, capsys):
    out = tmp_path / "out"
    code = probe_main(["last-layer", "--behaviors", "agreeableness", "--persona-dir",
                       str(Path(__file__).resolve().parents[1].parent / "shared" / "data" /
                           "persona"), "--test-fraction", "0.5", "--out", str(out)])
    assert code == 2 and "--test-fraction = 0.5 applies only with --pairs" in one_line(capsys)
    code = probe_main(["last-layer", "--behaviors", "agreeableness", "--persona-dir",
                       str(Path(__file__).resolve().parents[1].parent / "shared" / "data" /
                           "persona"), "--objective", "ipo", "--out", str(out)])
    assert code == 2 and "--objective = 'ipo' applies only with --pairs" in one_line(capsys)
    assert not out.exists()


@pytest.mark.llm
@pytest.mark.skipif(not HH.exists(), reason="../shared/data/hh-rlhf is not here")
def test_the_probe_on_real_pairs(tmp_path, loaded_model, capsys):  # noqa: F811
    """Six real pairs: the start's ``log π`` is the model's own (response_features, a
    separate forward through ``lm_head``); every step's prediction is within a few
    percent of the measured change at half the stability limit; a step over the limit
    is refused."""
    out = tmp_path / "out"
    common = ["last-layer", "--pairs", str(HH), "--skip-bad", "--max-pairs", "6",
              "--max-prompt-tokens", "32", "--max-response-tokens", "8", "--device", "cpu",
              "--quiet", "--test-fraction", "0.34"]
    assert probe_main([*common, "--steps", "4", "--eval-every", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "pair_last_layer_summary.json").read_text())
    import pandas as pd

    curves = pd.read_parquet(out / "pair_last_layer.parquet")
    changes = pd.read_parquet(out / "pair_last_layer_changes.parquet")
    assert summary["train_pairs"] == 4 and summary["test_pairs"] == 2
    assert summary["lr"] == pytest.approx(0.5 * summary["stability_limit"])
    assert curves.loss.iloc[0] == pytest.approx(np.log(2), abs=1e-6)
    assert curves.reward_accuracy.iloc[0] == 0.5  # zero margins count one half
    assert list(curves.loss) == sorted(curves.loss, reverse=True)
    assert summary["prediction_error_max"] < 0.1 and summary["sum_of_predictions_error"] < 0.1
    assert sorted(changes.step.unique()) == [0, 2]

    from llm_probes.pair_features import response_features
    from llm_probes.pairs import load_pairs, tokenize_pairs

    tok = tokenize_pairs(load_pairs(HH, skip_bad=True, max_pairs=6), loaded_model.tokenizer,
                         max_prompt_tokens=32, max_response_tokens=8)
    f = tok.frame
    want = response_features(loaded_model, list(f.prompt_ids) * 2,
                             list(f.chosen_ids) + list(f.rejected_ids))["logp"]
    train, test = split_pairs(6, 0.34, seed=0)
    start = changes[changes.step == 0]
    for split, index in (("train", train), ("test", test)):
        for role, shift in (("chosen", 0), ("rejected", 6)):
            got = start[(start.split == split) & (start.role == role)].logp.to_numpy()
            np.testing.assert_allclose(got, want[index + shift], rtol=1e-4, atol=1e-3)

    over = tmp_path / "over"
    assert probe_main([*common, "--lr", str(3 * summary["stability_limit"]), "--out",
                       str(over)]) == 2
    assert "must be < 2/λ, λ the Gauss-Newton curvature at W0" in one_line(capsys)
    assert not any(over.glob("*"))


def test_pair_states_orders_train_chosen_rejected_then_test():
    """Responses arrive as the chosen of all pairs then the rejected of all; each row of
    the states holds its response's index, so the order can be read back."""
    from llm_probes.pair_last_layer import pair_states

    n, m = 2, 1
    tokens = np.array([1, 2, 3, 2, 1, 2])  # chosen of pairs 0, 1, 2; rejected of 0, 1, 2
    offsets = np.r_[0, np.cumsum(tokens)]
    owner = np.repeat(np.arange(6), tokens)
    states = {"states": owner[:, None].astype(np.float32) * np.ones((1, 3), np.float32),
              "targets": owner, "tokens": tokens, "offsets": offsets}
    data = pair_states(states, n, m)
    want = [0, 1, 3, 4, 2, 5]  # train chosen, train rejected, test chosen, test rejected
    got = [int(data.states[data.offsets[r], 0]) for r in range(data.responses)]
    assert got == want and list(np.diff(data.offsets)) == list(tokens[want])
    assert data.train_rows == tokens[[0, 1, 3, 4]].sum()
