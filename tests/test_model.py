"""THEORY §1's reduction: training the full unembedding ``W`` is training ``Δ``.

The reference here is a naive loop: plain torch autograd gradient descent on the
mean DPO loss of the whole ``V × d`` matrix, with log-probabilities from a
log-softmax over the whole vocabulary, in float64. ``simulate_sample`` never
sees ``W``; the two must agree to rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CLOSED_FORM, assert_close
from dynamics import NO, YES, answer_logps, policy_weights, reference_weights, simulate_sample
from synthetic import Behavior, Problem, isotropic, sample_batch

VOCAB = 5
DIM = 3
SEEDS = [3, 8]


def problem() -> Problem:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((DIM, DIM)) / 2
    skewed = Behavior("skewed", [0.5, 0.2, -0.3], [-0.4, 0.1, 0.2], a @ a.T + 0.3 * np.eye(DIM),
                      0.5 * np.eye(DIM), weight=2.0, pos_fraction=0.35)
    return Problem((isotropic("iso", DIM, 1.5, sigma=0.8), skewed), label_noise=0.1)


def naive_logps(w: torch.Tensor, x: torch.Tensor, s: torch.Tensor):
    """log π(y_w|g), log π(y_l|g) by explicit indexing of the full log-softmax."""
    logp = x @ w.T - torch.logsumexp(x @ w.T, dim=1, keepdim=True)  # (n, V)
    chosen = torch.stack([logp[j, YES if s[j] > 0 else NO] for j in range(len(s))])
    rejected = torch.stack([logp[j, NO if s[j] > 0 else YES] for j in range(len(s))])
    return chosen, rejected


def naive_training(x, s, w0, *, beta, lr, steps, batches=None):
    """Autograd GD on the full ``W``; returns ``W`` after every step, ``(steps+1, V, d)``."""
    w = w0.clone().requires_grad_(True)
    ref_chosen, ref_rejected = (t.detach() for t in answer_logps(w0, x, s))
    history = [w.detach().clone()]
    for k in range(steps):
        idx = torch.arange(len(s)) if batches is None else batches[k]
        chosen, rejected = answer_logps(w, x[idx], s[idx])
        h = (chosen - ref_chosen[idx]) - (rejected - ref_rejected[idx])
        loss = (-F.logsigmoid(beta * h)).mean()
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w = (w - lr * grad).requires_grad_(True)
        history.append(w.detach().clone())
    return torch.stack(history)


def naive_metrics(w, w0, x, s, behavior, beta, k_behaviors):
    """Per-behavior metrics of the policy ``w`` straight from log-probabilities."""
    chosen, rejected = naive_logps(w, x, s)
    ref_chosen, ref_rejected = naive_logps(w0, x, s)
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    per_sample = {
        "loss": -F.logsigmoid(beta * h),
        "accuracy": _tie_half(chosen - rejected),
        "reward_accuracy": _tie_half(h),
        "rewards/chosen": beta * (chosen - ref_chosen),
        "rewards/rejected": beta * (rejected - ref_rejected),
        "rewards/margins": beta * h,
    }
    return {name: np.array([v[behavior == i].mean().item() for i in range(k_behaviors)])
            for name, v in per_sample.items()}


def _tie_half(x):
    return (x > 0).double() + 0.5 * (x == 0).double()


@pytest.fixture(scope="module")
def data():
    return sample_batch(problem(), 60, SEEDS, dtype=torch.float64)


@pytest.fixture(scope="module")
def w0():
    return reference_weights(DIM, vocab_size=VOCAB, scale=1.0, seed=4)


def test_answer_logps_index_the_full_softmax(data, w0):
    x, s = data.features[0], data.signs[0]
    w = torch.as_tensor(w0) + 0.3
    for got, want in zip(answer_logps(w, x, s), naive_logps(w, x, s)):
        assert_close(got, want, CLOSED_FORM)


def test_reference_weights_shape_and_given():
    w = reference_weights(4, vocab_size=7, scale=2.0, seed=1)
    assert w.shape == (7, 4)
    assert np.array_equal(w, np.random.default_rng(1).standard_normal((7, 4)) * (2.0 / 2.0))
    assert np.array_equal(reference_weights(4, vocab_size=7, given=w), w)


@pytest.mark.parametrize("beta, lr", [(1.0, 0.5), (0.3, 2.0)])
def test_full_batch_gd_on_w_is_gd_on_delta(data, w0, beta, lr):
    steps = 25
    result = simulate_sample(data, seeds=SEEDS, beta=beta, lr=lr, steps=steps, reference=w0,
                             keep_deltas=True)
    w0_t = torch.as_tensor(w0)
    e = torch.zeros(VOCAB, dtype=torch.float64)
    e[YES], e[NO] = 0.5, -0.5
    for seed_index in range(len(SEEDS)):
        x, s = data.features[seed_index], data.signs[seed_index]
        history = naive_training(x, s, w0_t, beta=beta, lr=lr, steps=steps)
        change = history - w0_t  # (steps+1, V, d)
        others = [v for v in range(VOCAB) if v not in (YES, NO)]
        assert torch.all(change[:, others] == 0), "rows other than Yes/No moved"
        assert_close(change[:, YES], -change[:, NO], CLOSED_FORM)
        deltas = result.deltas[:, seed_index, 0]  # (E, d)
        assert_close(change, e[None, :, None] * deltas[:, None, :], CLOSED_FORM)
        assert_close(result.weight_change[:, seed_index, 0],
                     torch.linalg.matrix_norm(change), CLOSED_FORM)
        assert_close(policy_weights(w0_t, deltas[-1]), history[-1], CLOSED_FORM)


def test_simulation_metrics_match_the_trained_policy(data, w0):
    """Several configurations (β, lr zipped) and seeds in one call, metrics at every step."""
    betas, lrs, steps = [0.5, 2.0], [1.0, 0.1], 12
    result = simulate_sample(data, seeds=SEEDS, beta=betas, lr=lrs, steps=steps, reference=w0,
                             eval_every=4)
    assert list(result.steps) == [0, 4, 8, 12]
    w0_t = torch.as_tensor(w0)
    k = len(data.names)
    for p, (beta, lr) in enumerate(zip(betas, lrs)):
        for si in range(len(SEEDS)):
            x, s = data.features[si], data.signs[si]
            history = naive_training(x, s, w0_t, beta=beta, lr=lr, steps=steps)
            for e, step in enumerate(result.steps):
                want = naive_metrics(history[step], w0_t, x, s, data.behavior, beta, k)
                for name, values in want.items():
                    assert_close(result.per_behavior[name][e, si, p], values, CLOSED_FORM,
                                 err_msg=f"{name} step {step} run {p} seed {si}")
    # step 0: every margin is exactly 0, a tie: reward accuracy 1/2, loss log 2
    assert_close(result.per_behavior["reward_accuracy"][0], 0.5, CLOSED_FORM)
    assert_close(result.per_behavior["loss"][0], math.log(2), CLOSED_FORM)


def test_metrics_do_not_depend_on_sample_order(data, w0):
    """Behaviors interleaved (as in features read from disk) instead of in
    blocks: the per-behavior metrics are those of the naive reference on the
    shuffled sample, and those of the ordered one up to rounding."""
    from synthetic.sampling import PreferenceSample

    perm = torch.randperm(data.n, generator=torch.Generator().manual_seed(5))
    assert not torch.all(torch.diff(data.behavior[perm]) >= 0)
    shuffled = PreferenceSample(data.features[:, perm], data.signs[:, perm],
                                data.true_signs[:, perm], data.behavior[perm], data.names)
    beta, lr, steps = 0.7, 0.9, 9
    runs = [simulate_sample(d, seeds=SEEDS, beta=beta, lr=lr, steps=steps, reference=w0,
                            eval_every=3) for d in (shuffled, data)]
    w0_t = torch.as_tensor(w0)
    for si in range(len(SEEDS)):
        x, s = shuffled.features[si], shuffled.signs[si]
        history = naive_training(x, s, w0_t, beta=beta, lr=lr, steps=steps)
        for e, step in enumerate(runs[0].steps):
            want = naive_metrics(history[step], w0_t, x, s, shuffled.behavior, beta,
                                 len(data.names))
            for name, values in want.items():
                assert_close(runs[0].per_behavior[name][e, si, 0], values, CLOSED_FORM,
                             err_msg=f"{name} step {step} seed {si}")
    for name in runs[0].per_behavior:
        assert_close(runs[0].per_behavior[name], runs[1].per_behavior[name], CLOSED_FORM)


def naive_batches(seed: int, n: int, batch_size: int, steps: int) -> list[torch.Tensor]:
    """The documented index stream: one torch.Generator per seed, a fresh
    ``randperm(n)`` per epoch, batches in order, the incomplete last one dropped."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out += [perm[b * batch_size:(b + 1) * batch_size] for b in range(n // batch_size)]
    return out[:steps]


@pytest.mark.parametrize("batch_size", [7, 25, 60])
def test_minibatch_sgd_follows_the_documented_index_stream(data, w0, batch_size):
    steps, beta, lr = 23, 0.8, 0.7
    n = data.n
    result = simulate_sample(data, seeds=SEEDS, beta=beta, lr=lr, steps=steps, reference=w0,
                             batch_size=batch_size, keep_deltas=True)
    w0_t = torch.as_tensor(w0)
    for si, seed in enumerate(SEEDS):
        x, s = data.features[si], data.signs[si]
        batches = naive_batches(seed, n, batch_size, steps)
        history = naive_training(x, s, w0_t, beta=beta, lr=lr, steps=steps, batches=batches)
        change = history - w0_t
        assert_close(change[:, YES], result.deltas[:, si, 0] / 2, CLOSED_FORM)
        assert_close(change[:, NO], -result.deltas[:, si, 0] / 2, CLOSED_FORM)
        want = naive_metrics(history[-1], w0_t, x, s, data.behavior, beta, len(data.names))
        for name, values in want.items():
            assert_close(result.per_behavior[name][-1, si, 0], values, CLOSED_FORM, err_msg=name)
    if batch_size < n:  # a different stream would give a different path
        full = simulate_sample(data, seeds=SEEDS, beta=beta, lr=lr, steps=steps, reference=w0)
        assert not torch.allclose(full.final, result.final)


def test_logit_form_and_plain_gradient_paths_train_identically(monkeypatch):
    """DPO's logit form (the simulation carries Φ = −βΔ) against the plain path
    that applies ℓ' to the margins, on the same float64 data, full batch and SGD."""
    from dataclasses import replace

    from dynamics import objectives

    plain = replace(objectives.OBJECTIVES["dpo"], name="dpo_plain", inner_scale=None,
                    inner_=None, outer=None)
    monkeypatch.setitem(objectives.OBJECTIVES, "dpo_plain", plain)
    problem = Problem((isotropic("a", 4, 2.0), isotropic("b", 4, 1.0, direction=[0, 1, 0, 0])))
    data = sample_batch(problem, 60, [3, 4], dtype=torch.float64)
    w0 = reference_weights(4, vocab_size=3, seed=1)
    for batch_size in (None, 16):
        runs = [simulate_sample(data, seeds=[3, 4], beta=[0.5, 2.0], lr=[0.3, 0.1], steps=25,
                                reference=w0, objective=name, batch_size=batch_size,
                                keep_deltas=True)
                for name in ("dpo", "dpo_plain")]
        assert_close(runs[0].deltas, runs[1].deltas, CLOSED_FORM)
        for metric in runs[0].per_behavior:
            assert_close(runs[0].per_behavior[metric], runs[1].per_behavior[metric], CLOSED_FORM)
