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


def test_recomputed_logits_give_the_same_gradient(monkeypatch):
    """Above ``_KEEP_LOGITS`` the output-layer blocks are checkpointed: the values and
    the gradient are the ones computed keeping every logit."""
    from llm_probes import pair_dpo

    model = tiny_llama(4)
    rng = np.random.default_rng(11)
    draw = lambda lo, hi: rng.integers(1, VOCAB, rng.integers(lo, hi)).tolist()  # noqa: E731
    prompts, chosen, rejected = ([draw(1, 9) for _ in range(5)] for _ in range(3))
    monkeypatch.setattr(pair_dpo, "_LOGIT_ROWS", 3)       # several blocks
    out = {}
    for keep in (1 << 40, 0):
        monkeypatch.setattr(pair_dpo, "_KEEP_LOGITS", keep)
        model.zero_grad()
        value = pair_sequence_logps(model, prompts, chosen, rejected)
        (value[:, 0] - 2 * value[:, 1]).sum().backward()
        out[keep] = value.detach(), [p.grad.clone() for p in model.parameters()]
    np.testing.assert_array_equal(out[0][0].numpy(), out[1 << 40][0].numpy())
    for a, b in zip(out[0][1], out[1 << 40][1]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14)
