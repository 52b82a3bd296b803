"""The prompt once per pair (:mod:`llm_probes.packing`): the packed row ``x + y_w + y_l``
against the two sequences ``x + y_w`` and ``x + y_l`` run one at a time, unpadded, on a
tiny random Llama in float64 (``sdpa`` and ``eager`` attention): the layout, every
state, the sequence log-probabilities and their gradients, and the once-per-model check
that decides whether a model is packed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_probes.packing import pack_pairs, packed_hidden, supports_packing
from llm_probes.pair_dpo import pair_sequence_logps

VOCAB = 37
FLOAT32_ROUNDING = 1e-6
"""Llama's RMSNorm computes in float32 inside a float64 model: two orders of the same
float64 sums can round differently there (relative)."""


def tiny_llama(seed: int = 0, attention: str = "sdpa"):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=False, attn_implementation=attention)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).double().eval()


def states(model, ids) -> torch.Tensor:
    """One unpadded sequence's final states ``(T, d)``."""
    return model.model(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]


def naive_logp(model, prompt, response) -> torch.Tensor:
    table = torch.log_softmax(model(input_ids=torch.tensor([prompt + response])).logits[0], -1)
    return sum(table[len(prompt) - 1 + k, token] for k, token in enumerate(response))


def test_layout_of_one_pair():
    x, yw, yl = [5, 6, 7], [8, 9], [10, 11, 12]
    p = pack_pairs([x, [1]], [yw, [2]], [yl, [3]], pad_id=0)
    assert p.ids[0].tolist() == x + yw + yl and p.ids[1].tolist() == [1, 2, 3] + [0] * 5
    assert p.positions[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    # y_w scored at x's last state and its own; y_l's first token also at x's last state
    assert p.cols[:5].tolist() == [2, 3, 2, 5, 6] and p.rows[:5].tolist() == [0] * 5
    assert p.targets[:5].tolist() == yw + yl and p.owner[:5].tolist() == [0, 0, 2, 2, 2]
    assert p.cols[5:].tolist() == [0, 0] and p.owner[5:].tolist() == [1, 3]
    allowed = p.mask[0, 0] == 0
    assert allowed[5].tolist() == [True, True, True, False, False, True, False, False]
    assert allowed[1, :].sum() == 2 and allowed[3, :4].all() and not allowed[3, 4:].any()
    assert (p.mask[1, 0].diagonal() == 0).all()                # padded queries see themselves


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_every_packed_state_equals_its_own_sequence(attention):
    model = tiny_llama(0, attention)
    rng = np.random.default_rng(4)
    draw = lambda lo, hi: rng.integers(1, VOCAB, rng.integers(lo, hi)).tolist()  # noqa: E731
    pairs = [(draw(1, 9), draw(1, 7), draw(1, 7)) for _ in range(6)]
    p = pack_pairs(*zip(*pairs), dtype=torch.float64)
    with torch.no_grad():
        got = packed_hidden(model.model, p, "cpu")
        for j, (x, yw, yl) in enumerate(pairs):
            a, b = states(model, x + yw), states(model, x + yl)
            used = len(x) + len(yw) + len(yl)
            want = torch.cat([a, b[len(x):]])
            np.testing.assert_allclose(got[j, :used].numpy(), want.numpy(),
                                       rtol=FLOAT32_ROUNDING, atol=FLOAT32_ROUNDING)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 8), st.integers(1, 6), st.integers(1, 6)),
                min_size=1, max_size=5), st.integers(0, 2 ** 16), st.sampled_from([8, 24, 4096]))
def test_packed_logps_equal_one_forward_per_sequence(sizes, seed, budget):
    """Any lengths, any bucket budget (one pair a bucket when it is small)."""
    model = tiny_llama(0)
    rng = np.random.default_rng(seed)
    prompts, chosen, rejected = ([rng.integers(1, VOCAB, n).tolist() for n in column]
                                 for column in zip(*sizes))
    got = pair_sequence_logps(model, prompts, chosen, rejected, packed=True,
                              max_batch_tokens=budget)
    assert got.shape == (len(sizes), 2) and got.dtype == torch.float64
    with torch.no_grad():
        want = torch.tensor([[float(naive_logp(model, x, y)) for y in (yw, yl)]
                             for x, yw, yl in zip(prompts, chosen, rejected)])
    np.testing.assert_allclose(got.detach().numpy(), want.numpy(), rtol=FLOAT32_ROUNDING,
                               atol=FLOAT32_ROUNDING)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_gradient_equals_the_unpacked_one(attention):
    model = tiny_llama(1, attention)
    rng = np.random.default_rng(7)
    draw = lambda lo, hi: rng.integers(1, VOCAB, rng.integers(lo, hi)).tolist()  # noqa: E731
    prompts, chosen, rejected = ([draw(1, 9) for _ in range(4)] for _ in range(3))
    weights = torch.tensor(rng.normal(size=(4, 2)))
    grads = {}
    for packed in (True, False):
        model.zero_grad()
        (pair_sequence_logps(model, prompts, chosen, rejected, packed=packed)
         * weights).sum().backward()
        grads[packed] = [p.grad.clone() for p in model.parameters()]
    scale = max(float(g.abs().max()) for g in grads[False])
    for a, b in zip(grads[True], grads[False]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=FLOAT32_ROUNDING * scale)


def test_supports_packing_checks_the_attention():
    assert supports_packing(tiny_llama(0, "sdpa")) and supports_packing(tiny_llama(0, "eager"))
    model = tiny_llama(0)
    model.config._attn_implementation = "some_kernel"   # a mask it may not honour: refused
    assert not supports_packing(model)


def test_supports_packing_refuses_a_model_that_mixes_the_responses(monkeypatch):
    """A model that ignores the 4D mask (here: the mask replaced by plain causal
    attention, so ``y_l`` sees ``y_w``) fails the check and is scored unpacked."""
    import llm_probes.packing as packing

    def causal_only(decoder, packed, device):
        return decoder(input_ids=packed.ids, position_ids=packed.positions,
                       use_cache=False).last_hidden_state

    monkeypatch.setattr(packing, "packed_hidden", causal_only)
    model = tiny_llama(2)
    assert not supports_packing(model)
    data = ([[3, 4, 5]], [[6, 7]], [[8]])
    got = pair_sequence_logps(model, *data)                 # unpacked: still exact
    with torch.no_grad():
        want = [float(naive_logp(model, data[0][0], y[0])) for y in data[1:]]
    np.testing.assert_allclose(got.detach().numpy()[0], want, rtol=1e-12)


@pytest.mark.parametrize("batch_size, budget", [(1, 4096), (3, 4096), (16, 20)])
def test_shared_prompt_features_equal_response_features(batch_size, budget):
    """Every output of the packed extraction (sums, log π, token counts, per-token states
    and their targets) against :func:`response_features` of the two sequences."""
    from types import SimpleNamespace

    from llm_probes.pair_features import response_features, shared_prompt_features

    model = tiny_llama(3)
    loaded = SimpleNamespace(model=model, device=torch.device("cpu"),
                             tokenizer=SimpleNamespace(pad_token_id=0))
    rng = np.random.default_rng(9)
    draw = lambda lo, hi: rng.integers(1, VOCAB, rng.integers(lo, hi)).tolist()  # noqa: E731
    prompts, chosen, rejected = ([draw(1, 9) for _ in range(7)] for _ in range(3))
    done = []
    got = shared_prompt_features(loaded, prompts, chosen, rejected, batch_size=batch_size,
                                 max_batch_tokens=budget, keep_states=True,
                                 progress=done.append)
    want = response_features(loaded, prompts * 2, chosen + rejected, keep_states=True)
    assert sum(done) == 14 and set(got) == set(want)
    for key in ("tokens", "offsets", "targets"):
        np.testing.assert_array_equal(got[key], want[key])
    for key in ("sum", "logp", "states"):
        np.testing.assert_allclose(got[key], want[key], rtol=FLOAT32_ROUNDING,
                                   atol=FLOAT32_ROUNDING)


def naive_head_logps(states, weight, bias, target) -> torch.Tensor:
    """``log_softmax(states Wᵀ + b)[target]`` by autograd on the whole logit table."""
    table = torch.log_softmax(torch.nn.functional.linear(states, weight, bias), -1)
    return table[torch.arange(len(target)), target]


@pytest.mark.parametrize("keep", [True, False], ids=["kept", "recomputed"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_head_logps_equal_autograd_on_the_whole_table(monkeypatch, keep, bias):
    """``_HeadLogps`` (the gradient ``g (e_y − softmax)`` written out, in place over
    kept or recomputed logits) against autograd's ``log_softmax`` and gather: values
    and the gradients of states, weight and bias, for weights that make some rows
    peaked (log-probabilities near −60); a second backward (``retain_graph``) after
    the kept logits were overwritten recomputes them and gives the same gradient."""
    from llm_probes import pair_dpo

    monkeypatch.setattr(pair_dpo, "_LOGIT_ROWS", 4)            # several blocks
    monkeypatch.setattr(pair_dpo, "_LSE_CHUNK", 2 * VOCAB)     # two rows a chunk
    monkeypatch.setattr(pair_dpo, "_KEEP_LOGITS", 1 << 40 if keep else 0)
    gen = torch.Generator().manual_seed(3)
    rows, width = 11, 8
    head = torch.nn.Linear(width, VOCAB, bias=bias).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, width, generator=gen, dtype=torch.float64) * 3)
    states = torch.randn(rows, width, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, VOCAB, (rows,), generator=gen)
    upstream = torch.randn(rows, generator=gen, dtype=torch.float64)

    got = pair_dpo._response_logps(head, states, target)
    assert got.grad_fn is not None and "HeadLogps" in type(got.grad_fn).__name__
    want = naive_head_logps(states, head.weight, head.bias, target)
    assert want.min() < -20                                       # peaked rows are tested
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-13,
                               atol=1e-12)
    parameters = [states, head.weight] + ([head.bias] if bias else [])
    want_grads = torch.autograd.grad(want, parameters, upstream)
    for retain in (True, False):                          # the second pass recomputes
        got_grads = torch.autograd.grad(got, parameters, upstream, retain_graph=retain)
        for a, b in zip(got_grads, want_grads):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-13)


def test_head_logps_with_a_frozen_head_and_without_a_graph():
    """A frozen output layer (LoRA): only the states get a gradient; under
    ``torch.no_grad`` the blockwise path gives the same values (nothing kept)."""
    from llm_probes import pair_dpo

    gen = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(6, VOCAB, bias=False).double().requires_grad_(False)
    states = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, VOCAB, (5,), generator=gen)
    got = pair_dpo._response_logps(head, states, target)
    want = naive_head_logps(states, head.weight, None, target)
    (a,) = torch.autograd.grad(got.sum(), [states])
    (b,) = torch.autograd.grad(want.sum(), [states])
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-13)
    with torch.no_grad():
        quiet = pair_dpo._response_logps(head, states, target)
    assert quiet.grad_fn is None
    np.testing.assert_allclose(quiet.numpy(), want.detach().numpy(), rtol=1e-13, atol=1e-12)


def test_recomputed_logits_give_the_same_gradient(monkeypatch):
    """Through the whole model: above ``_KEEP_LOGITS`` the output-layer blocks are
    recomputed in backward; the values and every parameter's gradient are those of
    the naive full-vocabulary loss (:func:`naive_logp`)."""
    from llm_probes import pair_dpo

    model = tiny_llama(4)
    rng = np.random.default_rng(11)
    draw = lambda lo, hi: rng.integers(1, VOCAB, rng.integers(lo, hi)).tolist()  # noqa: E731
    prompts, chosen, rejected = ([draw(1, 9) for _ in range(5)] for _ in range(3))
    monkeypatch.setattr(pair_dpo, "_LOGIT_ROWS", 3)       # several blocks
    model.zero_grad()
    naive = torch.stack([torch.stack([naive_logp(model, p, c), naive_logp(model, p, r)])
                         for p, c, r in zip(prompts, chosen, rejected)])
    (naive[:, 0] - 2 * naive[:, 1]).sum().backward()
    want = naive.detach(), [p.grad.clone() for p in model.parameters()]
    for keep in (1 << 40, 0):
        monkeypatch.setattr(pair_dpo, "_KEEP_LOGITS", keep)
        model.zero_grad()
        value = pair_sequence_logps(model, prompts, chosen, rejected)
        (value[:, 0] - 2 * value[:, 1]).sum().backward()
        np.testing.assert_allclose(value.detach().numpy(), want[0].numpy(),
                                   rtol=FLOAT32_ROUNDING, atol=FLOAT32_ROUNDING)
        for a, b in zip(model.parameters(), want[1]):
            np.testing.assert_allclose(a.grad.numpy(), b.numpy(), rtol=FLOAT32_ROUNDING,
                                       atol=FLOAT32_ROUNDING)


def test_head_logps_fall_back_to_autograd_under_autocast():
    """Under autocast the written-out gradient is not used (its buffers would mix
    dtypes): autograd's blocks give the values, and the gradient still flows."""
    from llm_probes import pair_dpo

    gen = torch.Generator().manual_seed(5)
    head = torch.nn.Linear(6, VOCAB, bias=False)
    states = torch.randn(4, 6, generator=gen, requires_grad=True)
    target = torch.randint(0, VOCAB, (4,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pair_dpo._response_logps(head, states, target)
    assert "HeadLogps" not in type(got.grad_fn).__name__
    got.sum().backward()
    assert states.grad is not None and torch.isfinite(states.grad).all()
    want = naive_head_logps(states.detach(), head.weight.detach(), None, target)
    np.testing.assert_allclose(got.detach().numpy(), want.numpy(), rtol=0.05, atol=0.2)
