"""Multi-token DPO (:mod:`llm_probes.pair_dpo`) and ``probe displacement --pairs``
(:mod:`llm_probes.pair_displacement`).

Fast tier: on a tiny random Llama in float64, the batched, padded, length-bucketed
sequence log-probabilities against one unpadded forward per sequence with the whole
logit table, and one DPO step against the naive loss and its autograd gradient
(through plain SGD, so the update is ``−lr ∇``); CHES against a loop over per-token
states; the bootstrap, the t interval, the drop rules and the option refusals. The
``llm`` tier runs the real model on ≤ 6 pairs with short budgets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from llm_fixtures import llm_cache_dir, loaded_model, persona_root  # noqa: F401
from llm_probes.cli import main as probe_main
from llm_probes.pair_displacement import (
    correlation_table,
    drop_count,
    dropped_pairs,
    mean_interval,
    mitigation_summary,
    pair_ches,
)
from llm_probes.pair_dpo import PairData, pair_logps, sequence_logps, train_pair_dpo
from llm_probes.training import TrainConfig

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / \
    "harmless-base-test.jsonl.gz"
needs_hh = pytest.mark.skipif(not HH.exists(), reason="../shared/data/hh-rlhf is not here")

FLOAT64 = 1e-10
"""Two float64 computations of the same sum in a different order."""
FLOAT32 = 1e-3
"""A float32 model against a float64 reference (relative)."""
FLOAT32_ROUNDING = 1e-6
"""A few float32 roundings (relative): the float32 steps inside a float64 Llama."""


# ------------------------------------------------------------------ a tiny model


def tiny_model(seed: int = 0, vocab: int = 37):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).double().eval()


def random_pairs(n: int, seed: int, vocab: int = 37) -> PairData:
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: rng.integers(1, vocab, rng.integers(lo, hi)).tolist()  # noqa: E731
    return PairData([ids(1, 9) for _ in range(n)], [ids(1, 7) for _ in range(n)],
                    [ids(1, 7) for _ in range(n)], pad_id=0)


def naive_logp(model, prompt, response) -> torch.Tensor:
    """One unpadded forward of ``prompt + response``, the whole logit table."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0]   # (T, V)
    table = torch.log_softmax(logits.double(), -1)
    return sum(table[len(prompt) - 1 + k, token] for k, token in enumerate(response))


@pytest.mark.parametrize("budget", [16, 40, 4096])
def test_sequence_logps_equal_one_unpadded_forward_per_sequence(budget):
    model = tiny_model()
    data = random_pairs(7, seed=1)
    got = sequence_logps(model, data.prompts, data.chosen, max_batch_tokens=budget)
    with torch.no_grad():
        want = torch.stack([naive_logp(model, p, r) for p, r in zip(data.prompts, data.chosen)])
    np.testing.assert_allclose(got.detach().numpy(), want.numpy(), rtol=FLOAT64, atol=FLOAT64)
    assert got.requires_grad and got.dtype == torch.float64
    pairs = pair_logps(model, data, [4, 0, 2])          # rows in the order asked
    with torch.no_grad():
        for row, i in enumerate([4, 0, 2]):
            assert pairs[row, 0] == pytest.approx(float(naive_logp(
                model, data.prompts[i], data.chosen[i])), abs=FLOAT64)
            assert pairs[row, 1] == pytest.approx(float(naive_logp(
                model, data.prompts[i], data.rejected[i])), abs=FLOAT64)


def test_one_dpo_step_is_the_naive_loss_and_its_gradient():
    """SGD: after one step every parameter is ``θ − lr ∇ℓ`` with ``ℓ`` the mean of
    ``−log σ(β[(log π(y_w) − log π₀(y_w)) − (log π(y_l) − log π₀(y_l))])`` computed one
    sequence at a time; the reference is a second model (different weights), so the
    margins at step 0 are not 0 and the gradient is not the symmetric one."""
    beta, lr = 0.7, 0.05
    policy, reference = tiny_model(0), tiny_model(1)
    data = random_pairs(5, seed=2)
    ref = pair_logps(reference, data)
    config = TrainConfig(steps=1, lr=lr, beta=beta, batch_size=5, optimizer="sgd",
                         eval_every=1, seed=0)
    naive = tiny_model(0)
    losses = []
    for i in range(5):
        w = naive_logp(naive, data.prompts[i], data.chosen[i])
        l_ = naive_logp(naive, data.prompts[i], data.rejected[i])
        h = (w - float(ref[i, 0])) - (l_ - float(ref[i, 1]))
        losses.append(-torch.log(torch.sigmoid(beta * h)))
    loss = torch.stack(losses).mean()
    grads = torch.autograd.grad(loss, list(naive.parameters()), allow_unused=True)
    before = [p.detach().clone() for p in policy.parameters()]
    run = train_pair_dpo(policy, data, ref, config)
    assert run.steps.loss.iloc[0] == pytest.approx(loss.item(), abs=FLOAT64)
    moved = 0
    # Llama's RMSNorm computes in float32 even in a float64 model, and the packed forward
    # (the prompt once, llm_probes.packing) sums the prompt's two gradient contributions
    # before the norm's backward instead of after: the updates agree to float32 rounding
    # of the largest gradient, not to float64's.
    scale = max(float(g.abs().max()) for g in grads if g is not None)
    for p, p0, g in zip(policy.parameters(), before, grads):
        want = p0 - lr * (torch.zeros_like(p0) if g is None else g)
        np.testing.assert_allclose(p.detach().numpy(), want.numpy(), rtol=0,
                                   atol=lr * FLOAT32_ROUNDING * scale)
        moved += int(g is not None and bool((g != 0).any()))
    assert moved > 10
    # the recorded evaluations: step 0 evaluated from the policy, step 1 after the update
    np.testing.assert_allclose(run.evals[1].numpy(), pair_logps(policy, data).numpy(),
                               atol=FLOAT64)


def test_training_draws_the_same_batches_from_the_same_seed_and_records_each_eval():
    data = random_pairs(6, seed=3)
    ref = pair_logps(tiny_model(0), data)
    config = TrainConfig(steps=4, lr=1e-2, beta=0.5, batch_size=2, optimizer="adamw",
                         eval_every=3, seed=5)
    runs = [train_pair_dpo(tiny_model(0), data, ref, config, index=[0, 2, 3, 5])
            for _ in range(2)]
    assert sorted(runs[0].evals) == [0, 3, 4]
    np.testing.assert_array_equal(runs[0].steps.loss, runs[1].steps.loss)
    np.testing.assert_allclose(runs[0].evals[0].numpy(), ref[[0, 2, 3, 5]].numpy(),
                               atol=FLOAT64)
    table = runs[0].table([0, 2, 3, 5])
    assert len(table) == 3 * 4 and table.pair.tolist()[:4] == [0, 2, 3, 5]


# ------------------------------------------------------------------ CHES and the statistics


def test_ches_equals_razin_definition_on_per_token_states():
    """Definition 2 written as a loop over the tokens' states (and its length-normalised
    variant), against the vectorised form on the summed states."""
    rng = np.random.default_rng(0)
    n, d = 9, 5
    states_w = [rng.normal(size=(rng.integers(1, 6), d)) for _ in range(n)]
    states_l = [rng.normal(size=(rng.integers(1, 6), d)) for _ in range(n)]
    got = pair_ches(np.stack([s.sum(0) for s in states_w]),
                    np.stack([s.sum(0) for s in states_l]),
                    [len(s) for s in states_w], [len(s) for s in states_l])
    for i in range(n):
        cross = sum(float(a @ b) for a in states_w[i] for b in states_l[i])
        square = sum(float(a @ b) for a in states_w[i] for b in states_w[i])
        assert got["ches"][i] == pytest.approx(cross - square, abs=FLOAT64)
        lw, ll = len(states_w[i]), len(states_l[i])
        assert got["ches_normalized"][i] == pytest.approx(
            cross / (lw * ll) - square / lw**2, abs=FLOAT64)
    same = pair_ches(np.ones((1, 3)), np.ones((1, 3)), [1], [1])
    assert same["ches"][0] == 0.0       # identical responses: CHES = 0


def test_correlation_table_matches_scipy_and_its_bootstrap_brackets_rho():
    rng = np.random.default_rng(4)
    ches = rng.normal(size=40)
    change = -ches + 0.8 * rng.normal(size=40)
    pairs = pd.DataFrame({"ches": ches, "ches_normalized": -ches,
                          "logp_chosen_change": change})
    table = correlation_table(pairs, seed=0, n_boot=500).set_index("predictor")
    want = stats.spearmanr(ches, change)
    assert table.loc["ches", "rho"] == pytest.approx(want.statistic, abs=1e-12)
    assert table.loc["ches", "p_value"] == pytest.approx(want.pvalue, rel=1e-9)
    assert table.loc["ches_normalized", "rho"] == pytest.approx(-want.statistic, abs=1e-12)
    row = table.loc["ches"]
    assert row.ci_low < row.rho < row.ci_high < 0          # a clear negative ρ
    assert row.displaced_fraction == pytest.approx((change < 0).mean())
    # the bootstrap by hand: resample pairs, Spearman of each resample, percentiles
    idx = np.random.default_rng(0).integers(0, 40, size=(500, 40))
    boot = [stats.spearmanr(ches[i], change[i]).statistic for i in idx]
    assert row.ci_low == pytest.approx(np.quantile(boot, 0.025), abs=1e-9)
    assert row.ci_high == pytest.approx(np.quantile(boot, 0.975), abs=1e-9)


def test_mean_interval_is_students_t():
    values = [0.1, 0.4, 0.25, 0.3]
    got = mean_interval(values)
    low, high = stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values))
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert math.isnan(mean_interval([1.0])["ci_low"]) and mean_interval([1.0])["mean"] == 1.0


def test_mitigation_summary_pairs_the_rules_by_seed():
    """Each rule's mean over seeds, and random − CHES paired by seed (a seed only one
    rule ran is left out of the pair), each with Student's t interval."""
    runs = pd.DataFrame({
        "seed": [0, 0, 1, 1, 2, 2, 3], "rule": ["ches", "random"] * 3 + ["random"],
        "displaced_fraction": [0.1, 0.3, 0.05, 0.5, 0.1, 0.2, 0.9],
        "chosen_change": [6.0, 2.0, 6.5, -2.5, 6.2, 3.8, 0.0],
        "displaced_fraction_all": [0.4, 0.45, 0.4, 0.42, 0.4, 0.38, 0.4],
        "chosen_change_all": [1.8, 1.0, 1.8, 1.4, 1.8, 1.7, 1.5]})
    got = mitigation_summary(runs).set_index(["rule", "metric"])
    assert got.loc[("random", "displaced_fraction"), "n"] == 4
    assert got.loc[("ches", "chosen_change_all"), "mean"] == pytest.approx(1.8)
    diff = np.array([0.3 - 0.1, 0.5 - 0.05, 0.2 - 0.1])
    row = got.loc[("random - ches", "displaced_fraction")]
    low, high = stats.t.interval(0.95, 2, loc=diff.mean(), scale=stats.sem(diff))
    assert (row["mean"], row["ci_low"], row["ci_high"], row["n"]) == (
        pytest.approx(diff.mean()), pytest.approx(low), pytest.approx(high), 3)
    assert got.loc[("random - ches", "chosen_change"), "mean"] == pytest.approx(
        np.mean([2.0 - 6.0, -2.5 - 6.5, 3.8 - 6.2]))
    assert "random - ches" not in set(mitigation_summary(runs[runs.rule == "ches"]).rule)


def test_the_drop_rules_pick_the_highest_ches_or_a_seeded_random_set():
    ches = np.array([0.5, 3.0, -1.0, 3.0, 2.0, 0.0])
    assert dropped_pairs(ches, 2, "ches", seed=0).tolist() == [1, 3]
    assert dropped_pairs(ches, 3, "ches", seed=9).tolist() == [1, 3, 4]
    assert dropped_pairs(ches, 1, "ches", seed=0).tolist() == [1]  # ties: the earlier pair
    draws = {tuple(dropped_pairs(ches, 2, "random", seed=s)) for s in range(30)}
    assert len(draws) > 5 and all(len(set(d)) == 2 for d in draws)
    assert tuple(dropped_pairs(ches, 2, "random", seed=7)) == tuple(
        np.sort(np.random.default_rng(7).choice(6, 2, replace=False)))
    assert [drop_count(n, 0.1) for n in (4, 5, 14, 15, 100)] == [0, 1, 1, 2, 10]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefdyn: error: "), err
    return err[0]


GOOD = [{"prompt": "Q: hi", "chosen": " hello there", "rejected": " go away"}] * 4


@pytest.mark.parametrize("extra, fragment", [
    (["--seeds", "-1"], "--seeds = -1 must be >= 0"),
    (["--drop-fraction", "1"], "--drop-fraction = 1.0 must be < 1"),
    (["--drop-fraction", "0"], "--drop-fraction = 0.0 must be > 0"),
    (["--steps", "0"], "--steps = 0 must be >= 1"),
    (["--method", "lora", "--lora-rank", "0"], "--lora-rank = 0 must be >= 1"),
])
def test_pair_options_are_refused_before_anything_is_written(tmp_path, capsys, extra,
                                                            fragment):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    out = tmp_path / "out"
    assert probe_main(["displacement", "--pairs", str(data), "--out", str(out), *extra]) == 2
    assert fragment in one_line(capsys) and not out.exists()


def test_pair_options_are_refused_without_pairs(tmp_path, capsys,
                                                persona_root):  # noqa: F811
    out = tmp_path / "out"
    assert probe_main(["displacement", "--behaviors", "agreeableness", "--persona-dir",
                       str(persona_root), "--max-statements", "8", "--seeds", "2",
                       "--out", str(out)]) == 2
    assert "--seeds = 2 applies only with --pairs" in one_line(capsys) and not out.exists()


# ------------------------------------------------------------------ the real model


def run_in_process(argv, loaded):
    """``prefdyn probe`` as :func:`llm_probes.cli.run_probe` runs it, with the session's
    model in the context instead of a second load."""
    import argparse

    from llm_probes import displacement
    from llm_probes.cli import _record, add_probe_parser, build_context
    from synthetic.validation import ParameterError

    parser = argparse.ArgumentParser(prog="prefdyn")
    add_probe_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["probe", *argv])
    ctx = build_context(args)
    ctx._model = loaded
    try:
        displacement.check(args)
        displacement.check_model(ctx)
    except ParameterError as err:
        return err, ctx
    ctx.out.mkdir(parents=True)
    files = displacement.run(ctx)
    return files + [_record(args, ctx, files)], ctx


@needs_hh
@pytest.mark.llm
def test_real_sequence_logps_equal_the_full_logit_table(loaded_model):  # noqa: F811
    from llm_probes.pairs import load_pairs, tokenize_pairs
    from llm_probes.pair_dpo import pair_data

    tok = tokenize_pairs(load_pairs(HH, skip_bad=True, max_pairs=3), loaded_model.tokenizer,
                         max_prompt_tokens=24, max_response_tokens=8)
    data = pair_data(tok, loaded_model.tokenizer)
    got = pair_logps(loaded_model.model, data, max_batch_tokens=64)
    with torch.no_grad():
        for i in range(3):
            for col, response in enumerate((data.chosen[i], data.rejected[i])):
                want = naive_logp(loaded_model.model, data.prompts[i], response)
                assert float(got[i, col]) == pytest.approx(float(want), rel=FLOAT32)


@needs_hh
@pytest.mark.llm
def test_displacement_on_real_pairs_writes_consistent_tables(tmp_path,
                                                             loaded_model):  # noqa: F811
    out = tmp_path / "out"
    weight = loaded_model.model.get_output_embeddings().weight.detach().clone()
    files, _ = run_in_process(
        ["displacement", "--pairs", str(HH), "--skip-bad", "--max-pairs", "4",
         "--max-prompt-tokens", "16", "--max-response-tokens", "6", "--steps", "1",
         "--batch-size", "4", "--eval-every", "1", "--lr", "1e-3", "--seeds", "1",
         "--drop-fraction", "0.25", "--method", "lora", "--device", "cpu", "--out",
         str(out), "--quiet"], loaded_model)
    # LoRA was removed: the shared model is as it was
    assert torch.equal(loaded_model.model.get_output_embeddings().weight, weight)
    assert not any(n for n, _ in loaded_model.model.named_parameters() if "lora" in n)
    pairs = pd.read_parquet(out / "pair_displacement_pairs.parquet")
    curves = pd.read_parquet(out / "pair_displacement.parquet")
    ches = pd.read_parquet(out / "pair_displacement_ches.parquet").set_index("predictor")
    mitigation = pd.read_parquet(out / "pair_displacement_mitigation.parquet")
    assert len(pairs) == 4 and curves.step.tolist() == [0, 1]
    change = pairs.logp_chosen_end - pairs.logp_chosen_start
    assert curves.displaced_fraction.iloc[-1] == pytest.approx((change < 0).mean())
    assert curves.chosen_change.iloc[-1] == pytest.approx(change.mean(), abs=1e-12)
    assert ches.loc["ches", "rho"] == pytest.approx(
        stats.spearmanr(pairs.ches, pairs.logp_chosen_change).statistic, abs=1e-12)
    # the start is the base model's log π(y_w), one unpadded forward
    from llm_probes.pairs import load_pairs, tokenize_pairs

    tok = tokenize_pairs(load_pairs(HH, skip_bad=True, max_pairs=4), loaded_model.tokenizer,
                         max_prompt_tokens=16, max_response_tokens=6)
    row = tok.frame.iloc[2]
    with torch.no_grad():
        want = naive_logp(loaded_model.model, list(row.prompt_ids), list(row.chosen_ids))
    assert pairs.logp_chosen_start.iloc[2] == pytest.approx(float(want), rel=FLOAT32)
    # the CHES rule dropped the pair of highest CHES; each run kept the other 3
    top = int(pairs.line.iloc[int(np.argmax(pairs.ches))])
    assert mitigation.set_index("rule").loc["ches", "dropped_lines"] == str(top)
    assert (mitigation.kept == 3).all() and (mitigation.dropped == 1).all()
    # the control columns: the kept pairs as they fared in the run on all pairs
    for _, run in mitigation.iterrows():
        kept = ~pairs.line.isin([int(x) for x in run.dropped_lines.split(",")])
        assert run.displaced_fraction_all == pytest.approx((change[kept] < 0).mean())
        assert run.chosen_change_all == pytest.approx(change[kept].mean(), abs=1e-12)
    assert (out / "pair_displacement.png").exists()
    assert any(p.name == "probe_displacement.json" for p in files)


@needs_hh
@pytest.mark.llm
def test_a_drop_that_leaves_nothing_to_compare_is_refused_before_writing(
        tmp_path, loaded_model):  # noqa: F811
    out = tmp_path / "out"
    err, _ = run_in_process(["displacement", "--pairs", str(HH), "--skip-bad", "--max-pairs",
                             "4", "--drop-fraction", "0.1", "--out", str(out)], loaded_model)
    assert str(err) == ("--drop-fraction = 0.1 must drop at least 1 of the 4 pairs and keep "
                        "at least 2 (it drops 0; or --seeds 0)")
    assert not out.exists()
