"""Full and LoRA DPO of the real model (llm_probes.finetune), misalignment and
likelihood displacement: the numbers issue 4 asks for, on 2 behaviors × a few
statements.

- the DPO loss at step 0 is log 2 (to CLOSED_FORM) when the policy is the reference,
  LoRA's policy included (peft starts B = 0);
- the efficient single-token log-probabilities (one decoder forward, the output layer
  at the last position) equal the full-sequence ones (``model(prompt + answer)
  .logits``), so the losses agree, also with TRL's appended end-of-text token;
- the gradient of the single-token loss equals autograd through the full-sequence
  loss, for ``lm_head`` and for a decoder weight;
- one LoRA step changes only LoRA parameters and lowers the batch loss; one full SGD
  step moves ``lm_head`` only in its Yes and No rows, by equal and opposite amounts
  (THEORY.md §1: the log-partition cancels in the margin);
- each probe's ``run`` writes its tables (tiny runs).

Tolerances: FLOAT32 for float32 computations that differ only in kernel shapes
(a (B, V) against a (B, T, V) output layer, a cached against an uncached step).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CLOSED_FORM, FLOAT32, assert_close
from llm_fixtures import llm_cache_dir, loaded_model, persona_root  # noqa: F401

pytestmark = pytest.mark.llm

BEHAVIORS = ["agreeableness", "narcissism"]


@pytest.fixture(scope="module")
def data(loaded_model, persona_root):  # noqa: F811
    from llm_probes.logprobs import preference_data
    from llm_probes.persona import load_statements

    statements = load_statements(persona_root, BEHAVIORS, max_per_behavior=4, seed=0)
    return preference_data(loaded_model, statements)


def _batch_index(data, per_behavior: int = 2) -> np.ndarray:
    """``per_behavior`` train statements of each behavior, of both signs."""
    rows = []
    for code in range(len(data.names)):
        mine = data.train[data.codes[data.train] == code]
        pos = mine[data.signs[mine].numpy() > 0]
        neg = mine[data.signs[mine].numpy() < 0]
        rows += [pos[0], neg[0]][:per_behavior]
    return np.array(rows)


def _loss(logps, ref, signs, beta):
    from llm_probes.objective import chosen_rejected, single_token_dpo_loss

    chosen, rejected = chosen_rejected(logps.double(), signs)
    ref_chosen, ref_rejected = chosen_rejected(ref.double(), signs)
    return single_token_dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)


def _full_sequence_pair(model, batch, data, signs, eos_id=None):
    """(B, 2) log π(Yes), log π(No) from two full-sequence forwards."""
    from llm_probes.logprobs import full_sequence_logps

    b = batch["input_ids"].shape[0]
    yes, no = (torch.full((b,), t) for t in data.answers)
    return torch.stack([full_sequence_logps(model, batch, yes, eos_id=eos_id),
                        full_sequence_logps(model, batch, no, eos_id=eos_id)], -1)


def _drop_grads(model):
    for p in model.parameters():
        p.grad = None


def test_single_token_loss_is_the_dpo_formula_and_log2_at_the_reference():
    from llm_probes.objective import single_token_dpo_loss

    g = torch.Generator().manual_seed(0)
    a, b, c, d = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(4))
    # −log σ(β h) with h = (a − c) − (b − d), written out with math in float64
    naive = [-math.log(1 / (1 + math.exp(-0.3 * ((ai - ci) - (bi - di)))))
             for ai, bi, ci, di in zip(*(t.tolist() for t in (a, b, c, d)))]
    assert_close(single_token_dpo_loss(a, b, c, d, beta=0.3), naive, CLOSED_FORM)
    assert_close(single_token_dpo_loss(a, b, a, b, beta=0.3), np.full(7, math.log(2)),
                 CLOSED_FORM)


def test_efficient_logps_equal_the_full_sequence_and_step0_loss_is_log2(loaded_model, data):  # noqa: F811,E501
    from llm_probes.logprobs import answer_logps

    model = loaded_model.model
    index = _batch_index(data)
    batch = data.prompts.batch(index, loaded_model.device)
    signs = data.signs[index]
    beta = 0.1
    with torch.no_grad():
        ref = answer_logps(model, batch, answers=data.answers).logps
        policy = answer_logps(model, batch, answers=data.answers).logps
        full = _full_sequence_pair(model, batch, data, signs)
        eos = loaded_model.tokenizer.eos_token_id
        cached = answer_logps(model, batch, answers=data.answers, eos_id=eos).logps
        full_eos = _full_sequence_pair(model, batch, data, signs, eos_id=eos)
    # policy = reference at step 0: every margin 0, the loss log 2
    assert_close(_loss(policy, ref, signs, beta).mean(), math.log(2), CLOSED_FORM)
    # one forward + (B, V) output layer == model(prompt + answer).logits, per answer
    assert_close(policy, full, FLOAT32)
    # a fixed reference so that the losses are not trivially log 2
    fixed = torch.log(torch.full_like(ref, 0.25))
    assert_close(_loss(policy, fixed, signs, beta), _loss(full, fixed, signs, beta), FLOAT32)
    # TRL's completion (answer + EOS) from the key/value cache
    assert_close(cached, full_eos, FLOAT32)
    assert_close(_loss(cached, fixed, signs, beta), _loss(full_eos, fixed, signs, beta),
                 FLOAT32)


def test_gradient_matches_autograd_through_the_full_sequence(loaded_model, data):  # noqa: F811
    from llm_probes.logprobs import answer_logps

    model = loaded_model.model
    index = _batch_index(data, per_behavior=1)
    batch = data.prompts.batch(index, loaded_model.device)
    signs = data.signs[index]
    fixed = torch.log(torch.full((len(index), 2), 0.25, dtype=torch.float64))
    head = loaded_model.lm_head.weight
    inner = model.model.layers[0].self_attn.q_proj.weight
    grads = []
    try:
        for logps_of in (lambda: answer_logps(model, batch, answers=data.answers).logps,
                         lambda: _full_sequence_pair(model, batch, data, signs)):
            _drop_grads(model)
            _loss(logps_of(), fixed, signs, 0.1).mean().backward()
            grads.append((head.grad.clone(), inner.grad.clone()))
    finally:
        _drop_grads(model)
    (head_eff, inner_eff), (head_full, inner_full) = grads
    scale = float(head_full.abs().max())
    assert scale > 0
    assert_close(head_eff, head_full, FLOAT32, scale=scale)
    assert_close(inner_eff, inner_full, FLOAT32, scale=float(inner_full.abs().max()))


def test_one_lora_step_changes_only_lora_parameters_and_lowers_the_loss(loaded_model, data):  # noqa: F811,E501
    from llm_probes.logprobs import answer_logps
    from llm_probes.training import prepare_policy, release_policy

    model = loaded_model.model
    index = _batch_index(data)
    batch = data.prompts.batch(index, loaded_model.device)
    signs = data.signs[index]
    with torch.no_grad():
        ref = answer_logps(model, batch, answers=data.answers).logps
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    policy = prepare_policy(loaded_model, "lora", lora_rank=4, copy_model=False)
    try:
        lora = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
        trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
        assert trainable == set(lora) and lora
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad],
                                      lr=1e-4, weight_decay=0.0)
        loss0 = _loss(answer_logps(policy, batch, answers=data.answers).logps, ref, signs,
                      0.1).mean()
        assert_close(loss0, math.log(2), CLOSED_FORM)  # peft's B = 0: policy = reference
        loss0.backward()
        optimizer.step()
        with torch.no_grad():
            loss1 = _loss(answer_logps(policy, batch, answers=data.answers).logps, ref, signs,
                          0.1).mean()
        assert float(loss1.detach()) < float(loss0.detach())
        moved = [n for n, p in policy.named_parameters() if n in lora
                 and not torch.equal(p, lora[n])]
        assert moved and all("lora_B" in n for n in moved)  # A's gradient is 0 while B = 0
    finally:
        base = release_policy(policy)
    assert base is model
    for name, p in model.named_parameters():  # the base is untouched and restored
        assert torch.equal(p, before[name]), name
        assert p.requires_grad


def test_one_full_step_moves_lm_head_only_in_the_yes_no_rows(loaded_model, data):  # noqa: F811
    from llm_probes.logprobs import answer_logps
    from llm_probes.training import prepare_policy

    index = _batch_index(data, per_behavior=1)
    batch = data.prompts.batch(index, loaded_model.device)
    signs = data.signs[index]
    policy = prepare_policy(loaded_model, "full")  # a copy
    head = policy.get_output_embeddings().weight
    assert head is not policy.get_input_embeddings().weight
    w0 = head.detach().clone()
    with torch.no_grad():
        ref = answer_logps(policy, batch, answers=data.answers).logps
    loss = _loss(answer_logps(policy, batch, answers=data.answers).logps, ref, signs,
                 0.1).mean()
    loss.backward()
    torch.optim.SGD(policy.parameters(), lr=1.0).step()
    change = (head.detach() - w0).double()
    yes, no = data.answers
    others = torch.ones(change.shape[0], dtype=torch.bool)
    others[[yes, no]] = False
    size = float(change[yes].abs().max())
    assert size > 0
    assert float(change[others].abs().max()) <= FLOAT32 * size
    assert_close(change[yes], -change[no], FLOAT32, scale=size)  # equal and opposite
    del policy


def _ctx(tmp_path, loaded, persona_root, module, options, n=4):  # noqa: F811
    from llm_probes.cli import ProbeContext
    from llm_probes.persona import load_statements

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(options + ["--no-figure"])
    args.model, args.device, args.quiet = None, "cpu", True
    statements = load_statements(persona_root, BEHAVIORS, max_per_behavior=n, seed=0)
    return ProbeContext(args=args, out=tmp_path, statements=statements, progress=False,
                        seed=0, _model=loaded)


TINY = ["--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--lora-rank", "2",
        "--eval-every", "1"]


def test_finetune_run_writes_metrics_and_features(loaded_model, persona_root, tmp_path):  # noqa: F811,E501
    from llm_probes import finetune

    ctx = _ctx(tmp_path, loaded_model, persona_root, finetune, TINY)
    files = finetune.run(ctx)
    names = {p.name for p in files}
    assert {"finetune.parquet", "finetune_features.parquet", "finetune_run.json"} <= names
    frame = pd.read_parquet(tmp_path / "finetune.parquet")
    train = frame[frame["source"] == "train"]
    assert sorted(train["step"].unique()) == [0, 1, 2]
    assert set(train["behavior"]) == set(BEHAVIORS)
    assert_close(train[train["step"] == 0]["loss"].to_numpy(), np.full(2, math.log(2)),
                 CLOSED_FORM)
    features = pd.read_parquet(tmp_path / "finetune_features.parquet")
    assert set(features["stage"]) == {"before", "after"}
    assert (features["distinguishability"] > 0).all()
    assert ctx._model is loaded_model  # LoRA adapters removed again
    _renders("finetune", tmp_path)


def _renders(name, out):
    """The probe's figure module draws from the tables the run stored (PNG and PDF)."""
    import importlib

    module = importlib.import_module(f"figures.probe_{name}")
    files = module.plot(out, formats=("png", "pdf"))
    assert sorted(p.suffix for p in files) == [".pdf", ".png"]
    assert all(p.is_file() and p.stat().st_size > 1000 for p in files)


def test_misalignment_and_displacement_runs(loaded_model, persona_root, tmp_path):  # noqa: F811
    from llm_probes import displacement, misalignment

    ctx = _ctx(tmp_path / "m", loaded_model, persona_root, misalignment,
               TINY + ["--align-steps", "1", "--steps", "1"])
    misalignment.run(ctx)
    frame = pd.read_parquet(tmp_path / "m" / "misalignment.parquet")
    flipped = frame[(frame["phase"] == "flip") & (frame["source"] == "train")]
    assert set(flipped["start"]) == {"base", "aligned"}
    at0 = flipped[flipped["step"] == 0].groupby("start", observed=True)["loss"].mean()
    assert_close(at0["base"], math.log(2), CLOSED_FORM)
    _renders("misalignment", tmp_path / "m")

    ctx = _ctx(tmp_path / "d", loaded_model, persona_root, displacement,
               TINY + ["--steps", "1", "--top-k", "3"])
    displacement.run(ctx)
    statements = pd.read_parquet(tmp_path / "d" / "displacement_statements.parquet")
    assert np.isfinite(statements[["ches", "ches_answer", "logp_chosen_change"]]).all().all()
    tokens = pd.read_parquet(tmp_path / "d" / "displacement_tokens.parquet")
    assert (tokens.groupby("group")["rank"].max() <= 20).all()
    assert ctx._model is loaded_model
    _renders("displacement", tmp_path / "d")


def test_ches_from_the_cache_equals_separate_full_forwards(loaded_model, data):  # noqa: F811
    """CHES (Razin et al., Definition 2, response = answer + EOS) from the cached
    answer states equals the definition evaluated on states of separate uncached
    forwards of ``x·y_w`` and ``x·y_l``, summed over the response positions."""
    from llm_probes.displacement import answer_states, ches_scores

    model = loaded_model.model
    index = _batch_index(data)
    g, h = answer_states(model, data, index, eos_id=loaded_model.tokenizer.eos_token_id)
    signs = data.signs[index]
    positive = (signs > 0)[:, None]
    scores = ches_scores(g, torch.where(positive, h[:, 0], h[:, 1]),
                         torch.where(positive, h[:, 1], h[:, 0]))
    decoder = model.get_decoder()
    for row, i in enumerate(index):
        batch = data.prompts.batch([i], "cpu")
        sums = []
        for answer in data.answers:  # one sequence x·a alone: no padding, no cache
            ids = torch.cat([batch["input_ids"], torch.tensor([[answer]])], 1)
            with torch.no_grad():
                states = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
            sums.append(states[-2:].double().sum(0))  # h_{x,y<1} = g(x), h_{x,y<2} = h(x·a)
        yes_sum, no_sum = sums
        w, lose = (yes_sum, no_sum) if signs[row] > 0 else (no_sum, yes_sum)
        expected = float(w @ lose - w @ w)
        assert_close(scores["ches"][row], expected, FLOAT32, scale=float(w @ w))
