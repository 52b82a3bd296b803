"""RLHF in the last-layer model: the closed forms and limits of THEORY §3.1, each
against a reference computed independently of the code under test.

* the exact two-answer drift against QMC over the full law and against a Monte
  Carlo estimate with its error bar; it vanishes at ``π* ∝ π0 e^{r/β}``
  (``D* = Φ/β``) for any vocabulary, and population ascent reaches the closed-form
  value ``E[β log Σ_y π0(y) e^{r(y)/β}]`` (one-dimensional quadrature);
* DPO and RLHF share their optimum: with the Bradley–Terry head the population RL
  flow ends where population DPO does, by another path;
* PPO with one pass of one minibatch is REINFORCE bit for bit; REINFORCE's mean
  update is the exact gradient (``1 − 1/B`` of it with the rollout-mean baseline)
  at the Monte Carlo rate; PPO equals a naive autograd loop on its clipped
  surrogate, random draws and all;
* bad input: one line naming the key, the value and the rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from conftest import CLOSED_FORM, EXACT_CONSTRUCTION, QMC, QUADRATURE, assert_close, mc_tolerance
from dynamics import population_descent, reference_weights, simulate_sample
from dynamics.analytic import PopulationFlow
from dynamics.model import NO, YES
from dynamics.objectives import ppo_clip_loss, reinforce_loss
from synthetic import Behavior, ParameterError, Problem, population_mixture, sample_batch
from synthetic.sampling import PreferenceSample

DIM = 3
HEAD2 = np.array([[0.8, -0.3, 0.4], [-0.2, 0.5, -0.1]])  # Φ for V = 2: ψ = (1.0, −0.8, 0.5)


def problem(family: str = "gaussian") -> Problem:
    return Problem((
        Behavior("a", [0.9, 0.2, 0.0], [-0.5, 0.1, 0.3], 0.6 * np.eye(DIM), 0.4 * np.eye(DIM),
                 pos_fraction=0.4),
        Behavior("b", [0.0, 0.4, 0.7], [0.1, -0.6, -0.2], np.diag([0.5, 0.3, 0.8]),
                 np.diag([0.5, 0.3, 0.8]), weight=0.5),
    ), family=family)


def rl(**hyper) -> dict:
    return {"name": "rlhf", **hyper}


def flow(beta=0.7, vocab=2, family="gaussian", **options) -> PopulationFlow:
    head = HEAD2 if vocab == 2 else np.random.default_rng(3).normal(size=(vocab, DIM))
    return PopulationFlow(population_mixture(problem(family)), beta=beta,
                          reference=reference_weights(DIM, vocab_size=vocab, seed=1),
                          objective="rlhf", reward_head=head, **options)


def rows(difference: np.ndarray) -> np.ndarray:
    """A policy change ``D`` with rows ``±Δ/2`` on Yes/No (two answers)."""
    return np.stack([difference / 2, -difference / 2])


# ============================================================================ the exact flow


def test_exact_drift_equals_qmc_over_the_full_law():
    exact = flow(qmc_points=2**16)
    assert exact.exact_rlhf
    for theta in (np.zeros((2, DIM)), rows(np.array([0.6, -0.4, 0.2])),
                  rows(np.array([-2.0, 3.0, 1.0]))):
        assert_close(exact.drift(theta).numpy(), exact._drift_all(torch.as_tensor(theta)).numpy(),
                     QMC)


def test_exact_drift_equals_a_monte_carlo_gradient():
    """``E[∇_W J]`` by autograd on 200,000 draws, within 5 standard errors."""
    f = flow()
    theta = rows(np.array([0.6, -0.4, 0.2]))
    data = sample_batch(problem(), 200_000, [5], dtype=torch.float64)
    g = data.features[0]
    w0 = torch.as_tensor(reference_weights(DIM, vocab_size=2, seed=1))
    w = (w0 + torch.as_tensor(theta)).requires_grad_()
    logp, logp0 = torch.log_softmax(g @ w.T, -1), torch.log_softmax(g @ w0.T, -1)
    per = (logp.exp() * (g @ torch.as_tensor(HEAD2).T - 0.7 * (logp - logp0))).sum(-1)
    # per-sample gradient of J on row Yes: (∂J/∂x) g with x the Yes − No log-odds
    (dx,) = torch.autograd.grad(per.sum(), w)  # (2, d): the sum of per-sample gradients
    p = torch.sigmoid(g @ (w[YES] - w[NO]).detach())
    y = g @ torch.as_tensor(HEAD2[YES] - HEAD2[NO] - 0.7 * (theta[YES] - theta[NO]))
    samples = (p * (1 - p) * y)[:, None] * g  # E of this is the Yes row's gradient
    assert_close(dx[YES] / len(g), samples.mean(0), CLOSED_FORM)  # the per-sample formula
    # the sample allocates statements by the mixture weights exactly (n = 200,000)
    mean, sd = samples.mean(0).numpy(), samples.std(0).numpy()
    assert_close(f.drift(theta).numpy()[YES], mean, 1.0,
                 scale=mc_tolerance(sd, len(g)))


@pytest.mark.parametrize("vocab,family", [(2, "gaussian"), (3, "gaussian"), (4, "laplace"),
                                          (3, "uniform")])
def test_gradient_vanishes_at_the_closed_form_optimum(vocab, family):
    """``π* ∝ π0 e^{r/β}``: ``D* = Φ/β`` (plus any multiple of 𝟙 per column), where
    every prompt's advantage ``r − β log π/π0`` is the same for every answer."""
    f = flow(beta=0.7, vocab=vocab, family=family)
    optimum = f.head.numpy() / 0.7 + np.ones((vocab, 1)) * np.array([0.3, -1.0, 0.2])
    assert np.abs(f.drift(optimum).numpy()).max() < EXACT_CONSTRUCTION
    assert np.abs(f.drift(optimum * 0.9).numpy()).max() > 1e-3  # not trivially zero
    # the sample's exact estimator does not move from there either
    data = sample_batch(problem(family), 200, [1], dtype=torch.float64)
    sim = simulate_sample(data, seeds=[1], beta=0.7, lr=0.5, steps=3,
                          reference=f.w0.numpy(), objective=rl(), reward_head=f.head.numpy(),
                          delta0=optimum, keep_deltas=True)
    assert_close(sim.deltas[-1, 0, 0].numpy(), optimum, CLOSED_FORM)


def closed_form_value(mixture, w0, head, beta) -> np.ndarray:
    """``E[β log Σ_y π0(y) e^{r(y)/β}]`` per component, two answers: with ``x0 = u0ᵀg``
    and ``ψ = φ_Yes − φ_No`` it is ``φ_Noᵀμ + β E[softplus(x0 + ψᵀg/β) − softplus(x0)]``,
    two one-dimensional Gaussian integrals (scipy's adaptive quadrature)."""
    u0, psi = w0[YES] - w0[NO], head[YES] - head[NO]
    out = []
    for mu, cov in zip(mixture.means, mixture.covs):
        def expect(v):
            m, s = v @ mu, np.sqrt(v @ cov @ v)
            return integrate.quad(lambda z: np.logaddexp(0, m + s * z) * stats.norm.pdf(z),
                                  -12, 12, epsabs=1e-13, epsrel=1e-13, limit=200)[0]
        out.append(head[NO] @ mu + beta * (expect(u0 + psi / beta) - expect(u0)))
    return np.array(out)


def test_population_ascent_reaches_the_closed_form_value():
    beta = 0.7
    mixture = population_mixture(problem())
    w0 = reference_weights(DIM, vocab_size=2, seed=1)
    path = population_descent(mixture, beta=beta, lr=2.0, steps=1500, reference=w0,
                              objective=rl(), reward_head=HEAD2, eval_every=1500,
                              qmc_points=2**15)
    final = path.deltas[-1]
    assert_close(final[YES] - final[NO], (HEAD2[YES] - HEAD2[NO]) / beta, 1e-7)
    per_c = closed_form_value(mixture, w0, HEAD2, beta)
    members = np.eye(2)[mixture.behavior]  # (C, K)
    want = (mixture.weights * per_c) @ members / (mixture.weights @ members)
    assert_close(path.per_behavior["objective/rlhf_reward"][-1], want, QMC * 3)
    # and the start is below it: the policy improves on the reference
    assert np.all(path.per_behavior["objective/rlhf_reward"][0] < want - 0.05)


def test_dpo_and_rlhf_share_their_optimum():
    """Population DPO at β ends at ``Δ* = ψ*/β`` with ``ψ*`` the Bradley–Terry head's
    optimum, and the RL flow maximising that head ends there too, by another path."""
    beta, lr = 0.8, 1.5
    mixture = population_mixture(problem())
    w0 = reference_weights(DIM, vocab_size=2, seed=1)
    bt = population_descent(mixture, beta=1.0, lr=lr, steps=3000, reference=w0,
                            objective="reward_model", eval_every=3000)
    psi = bt.deltas[-1]
    grad_bt = PopulationFlow(mixture, beta=1.0, reference=w0, objective="reward_model").drift(psi)
    assert np.abs(grad_bt.numpy()).max() < 1e-12  # converged
    dpo = population_descent(mixture, beta=beta, lr=lr / beta**2, steps=3000, reference=w0,
                             eval_every=5)
    assert_close(beta * dpo.deltas[-1], psi, QUADRATURE)
    rlhf = population_descent(mixture, beta=beta, lr=lr, steps=3000, reference=w0,
                              objective=rl(), reward_head=rows(psi), eval_every=5)
    ends = rlhf.deltas[:, YES] - rlhf.deltas[:, NO]
    assert_close(ends[-1], dpo.deltas[-1], QUADRATURE)
    # different paths: early on, the two policies differ
    assert np.abs(ends[1] - dpo.deltas[1]).max() > 0.1


# ============================================================================ sampled estimators

def replicated(n: int, copies: int, seed: int = 2) -> PreferenceSample:
    """One sample, ``copies`` times: the seeds then differ only in their answers."""
    one = sample_batch(problem(), n, [seed], dtype=torch.float64)
    return PreferenceSample(one.features.expand(copies, -1, -1).contiguous(),
                            one.signs.expand(copies, -1).contiguous(),
                            one.true_signs.expand(copies, -1).contiguous(), one.behavior,
                            one.names)


W0 = reference_weights(DIM, vocab_size=3, seed=4)
HEAD3 = np.random.default_rng(9).normal(size=(3, DIM))
START = np.random.default_rng(10).normal(size=(3, DIM)) * 0.5


@pytest.mark.parametrize("baseline", ["none", "mean", "expected", "value"])
@pytest.mark.parametrize("kl_in", ["reward", "loss"])
@pytest.mark.parametrize("rollout", [0, 24])
def test_ppo_with_one_pass_of_one_minibatch_is_reinforce_bit_for_bit(baseline, kl_in, rollout):
    data = sample_batch(problem(), 60, [0, 1], dtype=torch.float64)
    common = dict(seeds=[0, 1], beta=[0.5, 1.5], lr=0.3, steps=5, reference=W0,
                  reward_head=HEAD3, delta0=START, keep_deltas=True)
    hyper = dict(baseline=baseline, kl_in=kl_in, rollout_size=rollout)
    base = simulate_sample(data, objective=rl(estimator="reinforce", **hyper), **common)
    ppo = simulate_sample(data, objective=rl(estimator="ppo", ppo_epochs=1, num_minibatches=1,
                                             clip=0.1, **hyper), **common)
    assert torch.equal(base.deltas, ppo.deltas)
    assert np.array_equal(base.per_run["loss/value"], ppo.per_run["loss/value"], equal_nan=True)
    assert np.all(ppo.per_run["policy/clipfrac"][1:] == 0)
    assert np.all(ppo.per_run["policy/approxkl"][1:] == 0)
    assert not torch.equal(base.deltas[1], base.deltas[0])  # it moved


@pytest.mark.parametrize("baseline,kl_in,factor", [("none", "reward", 1.0), ("none", "loss", 1.0),
                                                   ("expected", "reward", 1.0),
                                                   ("mean", "reward", 1 - 1 / 16)])
def test_reinforce_mean_update_is_the_exact_gradient(baseline, kl_in, factor):
    """Over 4,000 rollouts of the same 16 prompts, the mean REINFORCE step equals the
    exact step (times ``1 − 1/B`` with the rollout-mean baseline) within 5 standard
    errors, and its error shrinks like ``1/√S``."""
    copies, n = 4000, 16
    data = replicated(n, copies)
    common = dict(seeds=list(range(copies)), beta=0.6, lr=0.5, steps=1, reference=W0,
                  reward_head=HEAD3, delta0=START, keep_deltas=True)
    exact = simulate_sample(data, objective=rl(), **common).deltas[1, 0, 0] - torch.as_tensor(START)
    steps = simulate_sample(data, objective=rl(estimator="reinforce", baseline=baseline,
                                               kl_in=kl_in), **common).deltas[1, :, 0]
    steps = (steps - torch.as_tensor(START)).numpy()  # (S, V, d)
    mean, sd = steps.mean(0), steps.std(0, ddof=1)
    assert_close(mean, factor * exact.numpy(), 1.0, scale=mc_tolerance(sd, copies))
    assert np.all(sd > 1e-3)  # a sampled estimator: the runs differ


def naive_ppo(data, seed, *, beta, lr, steps, hyper):
    """PPO written from its definition with autograd (one seed, one configuration),
    drawing its randomness in the engine's order from a generator seeded by the seed."""
    g, n = data.features[0], data.features.shape[1]
    w0 = torch.as_tensor(W0)
    head = torch.as_tensor(HEAD3)
    w = (w0 + torch.as_tensor(START)).clone().requires_grad_()
    v = torch.zeros(DIM, dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(seed)
    size = hyper["rollout_size"] or n
    out, ratio_stats = [w.detach().clone()], [(np.nan, np.nan)]
    target, horizon = hyper.get("kl_target", 0.0), hyper.get("kl_horizon", 50.0)
    for _ in range(steps):
        idx = (torch.randperm(n, generator=gen)[:size] if size < n else torch.arange(n))
        x = g[idx]
        with torch.no_grad():
            logp = torch.log_softmax(x @ w.T, -1)
            u = torch.rand(1, size, generator=gen, dtype=torch.float64)[0]
            y = (logp.exp().cumsum(-1) < u[:, None]).sum(-1).clamp_max(2)
            old = logp[torch.arange(size), y]
            ref = torch.log_softmax(x @ w0.T, -1)[torch.arange(size), y]
            returns = (x @ head.T)[torch.arange(size), y] - beta * (old - ref)
            adv = returns - x @ v if hyper["baseline"] == "value" else returns - returns.mean()
            kl = float((old - ref).mean())  # the rollout's sampled KL
        parts = hyper["num_minibatches"]
        means = []
        for _ in range(hyper["ppo_epochs"]):
            order = torch.randperm(size, generator=gen) if parts > 1 else torch.arange(size)
            for m in range(parts):
                sel = order[m * size // parts:(m + 1) * size // parts]
                xm = x[sel]
                new = torch.log_softmax(xm @ w.T, -1)[torch.arange(len(sel)), y[sel]]
                means.append(float(torch.exp(new.detach() - old[sel]).mean()))
                loss = ppo_clip_loss(new, old[sel], adv[sel], hyper["clip"]).mean()
                (grad,) = torch.autograd.grad(loss, w)
                value_loss = 0.5 * ((xm @ v - returns[sel]) ** 2).mean()
                (grad_v,) = torch.autograd.grad(value_loss, v)
                with torch.no_grad():
                    w -= lr * grad
                    if hyper["baseline"] == "value":
                        v -= hyper["vf_coef"] * lr * grad_v
        if target > 0:  # Ziegler et al.'s controller, from its definition
            beta *= 1 + min(max(kl / target - 1, -0.2), 0.2) / horizon
        out.append(w.detach().clone())
        ratio_stats.append((np.mean(means), np.var(means, ddof=1)))
    return torch.stack(out) - w0, np.array(ratio_stats)


@pytest.mark.parametrize("hyper", [
    dict(baseline="mean", rollout_size=0, ppo_epochs=3, num_minibatches=1, clip=0.1),
    dict(baseline="value", rollout_size=30, ppo_epochs=4, num_minibatches=3, clip=0.05,
         vf_coef=0.5),
    dict(baseline="mean", rollout_size=20, ppo_epochs=2, num_minibatches=2, clip=0.2,
         kl_target=0.02, kl_horizon=3.0),
])
def test_ppo_equals_a_naive_autograd_loop_on_its_clipped_surrogate(hyper):
    data = sample_batch(problem(), 50, [3], dtype=torch.float64)
    sim = simulate_sample(data, seeds=[3], beta=0.9, lr=0.8, steps=6, reference=W0,
                          objective=rl(estimator="ppo", **hyper), reward_head=HEAD3,
                          delta0=START, keep_deltas=True)
    want, ratios = naive_ppo(data, 3, beta=0.9, lr=0.8, steps=6, hyper=hyper)
    assert_close(sim.deltas[:, 0, 0], want, CLOSED_FORM)
    # TRL's val/ratio (mean over the updates of each one's mean ratio) and val/ratio_var
    assert_close(sim.per_run["val/ratio"][1:, 0, 0], ratios[1:, 0], CLOSED_FORM)
    assert_close(sim.per_run["val/ratio_var"][1:, 0, 0], ratios[1:, 1], CLOSED_FORM)
    assert np.nanmax(sim.per_run["policy/clipfrac"]) > 0  # the clipping was exercised


def test_reinforce_and_clip_losses_have_the_engine_gradients():
    """``−A(e_y − π)`` and ``−Aρ(e_y − π)·1[unclipped]`` per answer, by autograd."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (7,), generator=gen)
    adv = torch.randn(7, generator=gen, dtype=torch.float64)
    old = torch.log_softmax(logits.detach() + 0.3 * torch.randn(7, 4, generator=gen,
                                                                dtype=torch.float64), -1)
    old_y = old[torch.arange(7), y]
    logp = torch.log_softmax(logits, -1)
    logp_y = logp[torch.arange(7), y]
    onehot = torch.nn.functional.one_hot(y, 4).double()
    probs = logp.detach().exp()
    (auto,) = torch.autograd.grad(reinforce_loss(logp_y, adv).sum(), logits, retain_graph=True)
    assert_close(auto, -adv[:, None] * (onehot - probs), CLOSED_FORM)
    (auto,) = torch.autograd.grad(ppo_clip_loss(logp_y, old_y, adv, 0.1).sum(), logits)
    ratio = torch.exp(logp_y.detach() - old_y)
    active = ~(-adv * ratio.clamp(0.9, 1.1) > -adv * ratio)
    assert 0 < int(active.sum()) < 7  # both branches exercised
    assert_close(auto, (-adv * ratio * active)[:, None] * (onehot - probs), CLOSED_FORM)


# ============================================================================ bad input

@pytest.mark.parametrize("hyper,key,rule", [
    (dict(estimator="ppo", clip=0.0), "objective.clip", "> 0"),
    (dict(estimator="ppo", ppo_epochs=0), "objective.ppo_epochs", ">= 1"),
    (dict(estimator="ppo", num_minibatches=1.5), "objective.num_minibatches", "integer"),
    (dict(estimator="sarsa"), "objective.estimator", "one of exact, reinforce, ppo"),
    (dict(clip=0.2), "objective.clip", "applies only with estimator = 'ppo'"),
    (dict(estimator="reinforce", vf_coef=0.5), "objective.vf_coef", "applies only with baseline"),
])
def test_bad_hyperparameters_name_the_key_the_value_and_the_rule(hyper, key, rule):
    data = sample_batch(problem(), 20, [0], dtype=torch.float64)
    with pytest.raises(ParameterError) as info:
        simulate_sample(data, seeds=[0], beta=1.0, lr=0.1, steps=1, reference=W0,
                        objective=rl(**hyper), reward_head=HEAD3)
    assert key in str(info.value) and rule in str(info.value)


def test_bad_reward_heads_and_rollouts():
    data = sample_batch(problem(), 20, [0], dtype=torch.float64)
    common = dict(seeds=[0], beta=1.0, lr=0.1, steps=1, reference=W0)
    with pytest.raises(ParameterError, match="reward_head = None is required by 'rlhf'"):
        simulate_sample(data, objective="rlhf", **common)
    with pytest.raises(ParameterError, match=r"reward_head = \(2, 3\) must have shape \(3, 3\)"):
        simulate_sample(data, objective="rlhf", reward_head=HEAD2, **common)
    with pytest.raises(ParameterError, match="rollout_size = 21 must be <= the 20 prompts"):
        simulate_sample(data, objective=rl(estimator="ppo", rollout_size=21), reward_head=HEAD3,
                        **common)
    with pytest.raises(ParameterError, match="batch_size = 4 applies to the exact estimator"):
        simulate_sample(data, objective=rl(estimator="reinforce"), reward_head=HEAD3,
                        batch_size=4, **common)
    with pytest.raises(ParameterError, match="reward_head = None is required by 'rlhf'"):
        PopulationFlow(population_mixture(problem()), beta=1.0, reference=W0, objective="rlhf")


# ============================================================================ PPO-ptx

def pretraining():
    from synthetic.pretrain import Pretraining

    return Pretraining(np.array([[1.0, 0.0, 0.5], [-0.5, 1.0, 0.0]]), np.array([0.7, 1.2]),
                       np.array([2, 0]), np.array([1.0, 3.0]))


def test_the_pretraining_sample_has_its_distribution():
    pre = pretraining()
    x, tokens = pre.sample(40_000, [0, 1], dtype=torch.float64)
    held, same = pre.sample(40_000, [0, 1], heldout=True, dtype=torch.float64)
    assert torch.equal(tokens, same) and not torch.equal(x, held)  # a fresh draw, same layout
    assert (tokens == 2).sum() == 10_000 and (tokens == 0).sum() == 30_000  # weights 1 : 3
    for token, mean, sigma in zip(pre.tokens, pre.means, pre.sigmas):
        part = x[0][tokens == token].numpy()
        assert_close(part.mean(0), mean, 1.0, scale=mc_tolerance(np.full(3, sigma), len(part)))
        assert_close(part.std(0), np.full(3, sigma), 0.03)


def test_ptx_coef_zero_is_plain_rlhf_bit_for_bit():
    data = sample_batch(problem(), 40, [0, 1], dtype=torch.float64)
    common = dict(seeds=[0, 1], beta=0.8, lr=0.4, steps=4, reference=W0, reward_head=HEAD3,
                  delta0=START, keep_deltas=True)
    for hyper in (dict(), dict(estimator="ppo", num_minibatches=2)):
        plain = simulate_sample(data, objective=rl(**hyper), **common)
        zero = simulate_sample(data, objective=rl(ptx_coef=0.0, **hyper), pretrain=pretraining(),
                               **common)
        assert torch.equal(plain.deltas, zero.deltas)
        assert np.all(np.isfinite(zero.per_run["pretrain/loss"]))  # the tax is still measured
        assert "pretrain/loss" not in plain.per_run


def test_ptx_equals_a_naive_autograd_loop():
    """Exact RL plus ``γ·mean(−log π(y|g))`` on the pretraining draw, gradient descent
    with autograd on the full matrix; the tax on the held-out draw at every step."""
    data = sample_batch(problem(), 50, [4], dtype=torch.float64)
    gamma, beta, lr, steps = 0.7, 0.9, 0.5, 5
    sim = simulate_sample(data, seeds=[4], beta=beta, lr=lr, steps=steps, reference=W0,
                          objective=rl(ptx_coef=gamma), reward_head=HEAD3, delta0=START,
                          keep_deltas=True, pretrain=pretraining(), pretrain_n=30)
    x_pre, y_pre = pretraining().sample(30, [4], dtype=torch.float64)
    x_held, _ = pretraining().sample(30, [4], heldout=True, dtype=torch.float64)
    g, w0, head = data.features[0], torch.as_tensor(W0), torch.as_tensor(HEAD3)
    w = (w0 + torch.as_tensor(START)).requires_grad_()
    nll = lambda w, x: -torch.log_softmax(x @ w.T, -1)[torch.arange(len(y_pre)), y_pre]  # noqa: E731
    for k in range(steps + 1):
        assert_close(sim.deltas[k, 0, 0], w.detach() - w0, CLOSED_FORM)
        assert_close(sim.per_run["pretrain/loss"][k, 0, 0], nll(w.detach(), x_held[0]).mean(),
                     CLOSED_FORM)
        logp, logp0 = torch.log_softmax(g @ w.T, -1), torch.log_softmax(g @ w0.T, -1)
        ret = (logp.exp() * (g @ head.T - beta * (logp - logp0))).sum(-1)
        loss = -ret.mean() + gamma * nll(w, x_pre[0]).mean()
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= lr * grad


@pytest.mark.agreement
def test_ptx_flow_agrees_with_simulation():
    """The flow's pretraining term and tax (QMC) against 24 seeds' simulations."""
    mixture = population_mixture(problem())
    common = dict(beta=0.8, lr=0.3, steps=30, reference=W0, objective=rl(ptx_coef=1.0),
                  reward_head=HEAD3, eval_every=10)
    theory = population_descent(mixture, pretrain=pretraining(), qmc_points=2**14, **common)
    seeds = list(range(24))
    sim = simulate_sample(sample_batch(problem(), 3000, seeds, dtype=torch.float64), seeds=seeds,
                          pretrain=pretraining(), pretrain_n=3000, **common)
    for name, got, want in (
            ("pretrain/loss", sim.per_run["pretrain/loss"][:, :, 0],
             theory.per_run["pretrain/loss"][:, None]),
            ("objective/rlhf_reward", sim.per_behavior["objective/rlhf_reward"][:, :, 0],
             theory.per_behavior["objective/rlhf_reward"][:, None])):
        errs = got - want
        assert_close(errs.mean(1), 0.0, 1.0, scale=mc_tolerance(errs.std(1, ddof=1), len(seeds))
                     + QMC, err_msg=name)
    # the pretraining term holds the tax down: without it the same run pays more
    plain = population_descent(mixture, pretrain=pretraining(), qmc_points=2**14,
                               **{**common, "objective": rl()})
    assert plain.per_run["pretrain/loss"][-1] > theory.per_run["pretrain/loss"][-1] + 0.05


@pytest.mark.parametrize("override,key,rule", [
    ("train.objective.ptx_coef=0.5", "train.objective.ptx_coef", "needs a pretraining"),
    ("pretrain.n=10", "pretrain.n", "needs [[pretrain.components]]"),
])
def test_bad_pretraining_config(override, key, rule):
    from dynamics.config import load_config

    text = ("[problem]\ndim = 3\n[[problem.behaviors]]\nname = \"a\"\ndistinguishability = 1.0\n"
            "[model]\nreward_head = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]\n"
            "[train]\nobjective = \"rlhf\"\n")
    with pytest.raises(ParameterError) as info:
        load_config(None, [override], text=text)
    assert key in str(info.value) and rule in str(info.value)


@pytest.mark.parametrize("component,key,rule", [
    ("mean = [1.0, 2.0]\ntoken = 0", "pretrain.components.0.mean", "(3,)"),
    ("mean = [1.0, 2.0, 0.0]\ntoken = 2", "pretrain.components.0.token", "< model.vocab_size = 2"),
    ("mean = [1.0, 2.0, 0.0]\ntoken = 0\nsigma = -1.0", "pretrain.components.0.sigma", ">= 0"),
    ("mean = [1.0, 2.0, 0.0]", "pretrain.components.0.token", "required"),
])
def test_bad_pretraining_components(component, key, rule):
    from dynamics.config import load_config

    text = ("[problem]\ndim = 3\n[[problem.behaviors]]\nname = \"a\"\ndistinguishability = 1.0\n"
            f"[[pretrain.components]]\n{component}\n")
    with pytest.raises(ParameterError) as info:
        load_config(None, [], text=text)
    assert key in str(info.value) and rule in str(info.value)


# ======================================================== reward scales and the advantage model

def scaled_sample(seeds, n=60):
    return sample_batch(problem(), n, seeds, dtype=torch.float64)


def test_reward_scales_multiply_each_behaviors_reward_against_a_naive_loop():
    """Exact RL with behavior ``a``'s reward ×4: autograd on the full matrix."""
    data = scaled_sample([2])
    scales = np.array([4.0, 1.0])
    beta, lr, steps = 0.8, 0.3, 4
    sim = simulate_sample(data, seeds=[2], beta=beta, lr=lr, steps=steps, reference=W0,
                          objective=rl(), reward_head=HEAD3, delta0=START, keep_deltas=True,
                          reward_scales=scales)
    g, w0 = data.features[0], torch.as_tensor(W0)
    task = (g @ torch.as_tensor(HEAD3).T) * torch.as_tensor(scales)[data.behavior][:, None]
    w = (w0 + torch.as_tensor(START)).requires_grad_()
    for k in range(steps + 1):
        assert_close(sim.deltas[k, 0, 0], w.detach() - w0, CLOSED_FORM)
        logp, logp0 = torch.log_softmax(g @ w.T, -1), torch.log_softmax(g @ w0.T, -1)
        scores = (logp.exp() * task).sum(-1)
        for i in range(2):
            assert_close(sim.per_behavior["objective/scores"][k, 0, 0, i],
                         scores[data.behavior == i].mean(), CLOSED_FORM)
        loss = -(scores - beta * (logp.exp() * (logp - logp0)).sum(-1)).mean()
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= lr * grad


def test_the_advantage_model_regulates_each_behaviors_scores():
    """At the start, the score ``(s_k r − b(g))/σ_k`` has mean 0 per prompt and unit
    variance per behavior under the starting policy; the exact flow with it equals the
    one on ``s_k r/σ_k`` (a per-prompt baseline does not move the exact gradient)."""
    data = scaled_sample([0, 1], n=400)
    scales = np.array([10.0, 1.0])
    sim = simulate_sample(data, seeds=[0, 1], beta=0.7, lr=0.2, steps=3, reference=W0,
                          objective=rl(score="advantage"), reward_head=HEAD3, delta0=START,
                          keep_deltas=True, reward_scales=scales)
    # recompute σ_k naively and check the run equals raw RL on the rescaled head
    g, w0 = data.features, torch.as_tensor(W0)
    probs = torch.softmax(g @ (w0 + torch.as_tensor(START)).T, -1)  # (S, n, V)
    task = (g @ torch.as_tensor(HEAD3).T) * torch.as_tensor(scales)[data.behavior][:, None]
    var = (probs * task**2).sum(-1) - (probs * task).sum(-1) ** 2  # (S, n)
    sigma = torch.stack([var[:, data.behavior == i].mean(1) for i in range(2)], 1).sqrt()
    assert sigma[0, 0] > 5 * sigma[0, 1]  # the scales differ, then are regulated away
    for seed in range(2):
        rescaled = simulate_sample(
            dataclass_seed(data, seed), seeds=[seed], beta=0.7, lr=0.2, steps=3, reference=W0,
            objective=rl(), reward_head=HEAD3, delta0=START, keep_deltas=True,
            reward_scales=(torch.as_tensor(scales) / sigma[seed]).numpy())
        assert_close(sim.deltas[:, seed], rescaled.deltas[:, 0], CLOSED_FORM)
    # theory: the same identity, and the flow's σ_k against the sample's (QMC vs MC)
    mixture = population_mixture(problem())
    common = dict(beta=0.7, lr=0.2, steps=20, reference=W0, reward_head=HEAD3, delta0=START,
                  reward_scales=scales, eval_every=10, qmc_points=2**14)
    adv = population_descent(mixture, objective=rl(score="advantage"), **common)
    f = PopulationFlow(mixture, beta=0.7, reference=W0, objective=rl(score="advantage"),
                       reward_head=HEAD3, reward_scales=scales, qmc_points=2**14)
    f.fix_start(START)
    per_k = (f.task_scale / f.score_scale).numpy()[[list(mixture.behavior).index(i)
                                                     for i in range(2)]]
    assert_close(per_k, sigma.mean(0).numpy(), 0.1)  # the population σ_k, within sampling
    raw = population_descent(mixture, objective=rl(), **{**common, "reward_scales": scales / per_k})
    assert_close(adv.deltas, raw.deltas, QMC)


def dataclass_seed(data, seed):
    return PreferenceSample(data.features[seed:seed + 1], data.signs[seed:seed + 1],
                            data.true_signs[seed:seed + 1], data.behavior, data.names)


def test_reward_scale_is_a_behavior_key_and_reaches_the_run():
    from dynamics.config import load_config, reward_scales_of

    text = ("[problem]\ndim = 3\n[[problem.behaviors]]\nname = \"a\"\ndistinguishability = 1.0\n"
            "reward_scale = 5.0\n[[problem.behaviors]]\nname = \"b\"\ndistinguishability = 2.0\n"
            "[model]\nreward_head = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]\n"
            "[train]\nobjective = { name = \"rlhf\", score = \"advantage\" }\n")
    assert list(reward_scales_of(load_config(None, [], text=text))) == [5.0, 1.0]
    with pytest.raises(ParameterError, match="problem.behaviors.0.reward_scale = 0"):
        load_config(None, ["problem.behaviors.0.reward_scale=0"], text=text)


# ============================================================================ selective rehearsal

def test_selective_rehearsal_equals_a_naive_autograd_loop():
    """RL on the prompts whose expected reward under the starting policy is below the
    threshold, ``γ_r·(−log π(y_w))`` on the others: autograd on the full matrix."""
    data = scaled_sample([5], n=80)
    beta, lr, steps, gamma, tau = 0.8, 0.4, 5, 0.6, 0.1
    sim = simulate_sample(data, seeds=[5], beta=beta, lr=lr, steps=steps, reference=W0,
                          objective=rl(rehearsal="selective", select_below=tau,
                                       rehearsal_coef=gamma),
                          reward_head=HEAD3, delta0=START, keep_deltas=True)
    g, s, w0 = data.features[0], data.signs[0], torch.as_tensor(W0)
    task = g @ torch.as_tensor(HEAD3).T
    chosen = torch.where(s > 0, YES, NO)
    start = w0 + torch.as_tensor(START)
    rl_prompt = ((torch.softmax(g @ start.T, -1) * task).sum(-1) < tau).double()
    assert 0.2 < float(rl_prompt.mean()) < 0.8  # both kinds of prompt present
    w = start.clone().requires_grad_()
    for k in range(steps + 1):
        logp, logp0 = torch.log_softmax(g @ w.T, -1), torch.log_softmax(g @ w0.T, -1)
        ret = (logp.exp() * (task - beta * (logp - logp0))).sum(-1)
        per = rl_prompt * -ret + (1 - rl_prompt) * gamma * -logp[torch.arange(len(s)), chosen]
        assert_close(sim.deltas[k, 0, 0], w.detach() - w0, CLOSED_FORM)
        for i in range(2):
            assert_close(sim.per_behavior["loss"][k, 0, 0, i], per[data.behavior == i].mean(),
                         CLOSED_FORM)
        (grad,) = torch.autograd.grad(per.mean(), w)
        with torch.no_grad():
            w -= lr * grad


@pytest.mark.parametrize("estimator", ["exact", "ppo"])
def test_rehearsal_limits(estimator):
    """A threshold above every prompt's expected reward is plain RL; below every one,
    imitation of the demonstrations (SFT) at ``lr·γ_r``."""
    data = scaled_sample([0, 1], n=50)
    common = dict(seeds=[0, 1], beta=0.8, steps=4, reference=W0, delta0=START,
                  keep_deltas=True)
    hyper = dict(estimator=estimator) if estimator == "exact" else dict(
        estimator="ppo", num_minibatches=2)
    plain = simulate_sample(data, objective=rl(**hyper), reward_head=HEAD3, lr=0.3, **common)
    all_rl = simulate_sample(data, objective=rl(rehearsal="selective", select_below=1e9, **hyper),
                             reward_head=HEAD3, lr=0.3, **common)
    assert_close(all_rl.deltas, plain.deltas, CLOSED_FORM)
    if estimator == "exact":
        none_rl = simulate_sample(data, objective=rl(rehearsal="selective", select_below=-1e9,
                                                     rehearsal_coef=0.5),
                                  reward_head=HEAD3, lr=0.3, **common)
        sft = simulate_sample(data, objective="sft", lr=0.15, **common)
        assert_close(none_rl.deltas, sft.deltas, CLOSED_FORM)


@pytest.mark.agreement
def test_rehearsal_flow_agrees_with_simulation():
    mixture = population_mixture(problem())
    hyper = dict(rehearsal="selective", select_below=0.1, rehearsal_coef=0.6)
    common = dict(beta=0.8, lr=0.3, steps=30, reference=W0, objective=rl(**hyper),
                  reward_head=HEAD3, delta0=START, eval_every=10)
    theory = population_descent(mixture, qmc_points=2**14, **common)
    seeds = list(range(24))
    sim = simulate_sample(sample_batch(problem(), 3000, seeds, dtype=torch.float64), seeds=seeds,
                          **common)
    for name in ("loss", "accuracy", "objective/rlhf_reward"):
        errs = sim.per_behavior[name][:, :, 0] - theory.per_behavior[name][:, None]
        assert_close(errs.mean(1), 0.0, 1.0, scale=mc_tolerance(errs.std(1, ddof=1), len(seeds))
                     + QMC, err_msg=name)


@pytest.mark.agreement
def test_ppo_agrees_with_the_flow_taking_its_updates_per_step():
    """PPO's theory is the exact flow making ``ppo_epochs × num_minibatches`` steps of lr
    per rollout; full-rollout PPO on 16 seeds stays within Z·sd/√S of it."""
    mixture = population_mixture(problem())
    common = dict(beta=0.8, lr=0.2, steps=40, reference=W0, reward_head=HEAD3, delta0=START,
                  eval_every=10, objective=rl(estimator="ppo", baseline="value", ppo_epochs=2,
                                              num_minibatches=2))
    theory = population_descent(mixture, qmc_points=2**14, **common)
    seeds = list(range(16))
    sim = simulate_sample(sample_batch(problem(), 4000, seeds, dtype=torch.float64), seeds=seeds,
                          **common)
    for name in ("objective/rlhf_reward", "accuracy"):
        errs = sim.per_behavior[name][:, :, 0] - theory.per_behavior[name][:, None]
        assert_close(errs.mean(1), 0.0, 1.0, scale=mc_tolerance(errs.std(1, ddof=1), len(seeds))
                     + QMC, err_msg=name)
    one = population_descent(mixture, qmc_points=2**14, **{**common, "objective": rl()})
    # four updates a step run ahead of one
    gain = lambda t: t.per_behavior["objective/rlhf_reward"][1] - t.per_behavior[  # noqa: E731
        "objective/rlhf_reward"][0]
    assert np.all(gain(theory) > 1.5 * gain(one))


@pytest.mark.cli
def test_the_instructgpt_config_runs_every_phase(tmp_path):
    """The shipped pipeline (shrunk): SFT → reward model → PPO-ptx, every phase recorded,
    the RL statistics where they belong, and the tax held down by the pretraining term."""
    import pandas as pd

    from dynamics.cli import main

    config = __import__("pathlib").Path(__file__).resolve().parents[1] / (
        "dynamics/configs/instructgpt.toml")
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--set", "train.n=300",
                 "--set", "train.seeds=2", "--set", "train.phases.0.steps=10",
                 "--set", "train.phases.1.steps=20", "--set", "train.phases.2.steps=10",
                 "--set", "train.phases.2.objective.rollout_size=100"]) == 0
    frame = pd.read_parquet(out / "metrics.parquet")
    assert list(frame.groupby("phase")["objective"].first()) == ["sft", "reward_model", "rlhf"]
    rl_rows = frame[(frame["phase"] == 2) & (frame["source"] == "simulation")]
    start = rl_rows["step"].min()  # the phase's first row is its starting state: no update
    assert rl_rows[rl_rows["step"] > start]["policy/clipfrac"].notna().all()
    assert rl_rows[rl_rows["step"] == start]["policy/clipfrac"].isna().all()
    assert frame[frame["phase"] != 2]["policy/clipfrac"].isna().all()
    tax = frame.groupby(["phase", "source"])["pretrain/loss"].last()
    assert tax[(2, "theory")] < tax[(1, "theory")]
    assert tax[(2, "simulation")] < tax[(1, "simulation")]
    # a rollout larger than a seed's sample is refused when the config is read
    assert main(["run", str(config), "--out", str(tmp_path / "bad"), "--quiet",
                 "--set", "train.n=300"]) == 2
    assert not (tmp_path / "bad").exists()


def test_the_adaptive_kl_coefficient_saturates_at_its_clip():
    """A target far above every sampled KL lowers the coefficient by the clipped 20% per
    horizon every rollout, ``β_t = β (1 − 0.2/H)^t``, in both solvers (a target below
    it is not the mirror image: a rollout's sampled KL can be negative)."""
    data = sample_batch(problem(), 40, [0, 1], dtype=torch.float64)
    hyper = dict(estimator="reinforce", kl_target=1e9, kl_horizon=4.0)
    sim = simulate_sample(data, seeds=[0, 1], beta=[0.5, 2.0], lr=0.2, steps=6, reference=W0,
                          objective=rl(**hyper), reward_head=HEAD3, delta0=START)
    want = np.array([0.5, 2.0]) * 0.95 ** np.arange(6)[:, None]  # used by updates 1..6
    assert_close(sim.per_run["objective/kl_coef"][1:], np.broadcast_to(want[:, None], (6, 2, 2)),
                 CLOSED_FORM)
    theory = population_descent(population_mixture(problem()), beta=0.5, lr=0.2, steps=6,
                                reference=W0, objective=rl(**hyper), reward_head=HEAD3,
                                delta0=START)
    assert np.isnan(theory.per_run["objective/kl_coef"][0])
    assert_close(theory.per_run["objective/kl_coef"][1:], 0.5 * 0.95 ** np.arange(6), CLOSED_FORM)


@pytest.mark.agreement
def test_adaptive_kl_flow_agrees_with_simulation():
    """The controller on the population KL (flow) against the sampled one (16 seeds)."""
    mixture = population_mixture(problem())
    common = dict(beta=0.8, lr=0.2, steps=30, reference=W0, reward_head=HEAD3, delta0=START,
                  eval_every=10, objective=rl(estimator="reinforce", baseline="value",
                                              kl_target=0.05, kl_horizon=5.0))
    theory = population_descent(mixture, qmc_points=2**14, **common)
    seeds = list(range(16))
    sim = simulate_sample(sample_batch(problem(), 4000, seeds, dtype=torch.float64), seeds=seeds,
                          **common)
    errs = sim.per_run["objective/kl_coef"][1:, :, 0] - theory.per_run["objective/kl_coef"][
        1:, None]
    assert_close(errs.mean(1), 0.0, 1.0, scale=mc_tolerance(errs.std(1, ddof=1), len(seeds))
                 + QMC)
    assert abs(theory.per_run["objective/kl_coef"][-1] - 0.8) > 0.05  # it did adapt


RL_CONFIG = """
[problem]
dim = 3
[[problem.behaviors]]
name = "a"
distinguishability = 1.0
[train]
n = 40
steps = 2
seeds = 1
"""


@pytest.mark.cli
@pytest.mark.parametrize("overrides,message", [
    (["train.objective=rlhf"], "train.objective = 'rlhf' needs a reward head"),
    (["train.objective=rlhf", "model.reward_head=[[1.0, 0.0], [0.0, 1.0]]"],
     "model.reward_head"),
    (['train.objective={name="rlhf", estimator="ppo", clip=-0.1}'],
     "train.objective.clip = -0.1 must be > 0"),
    (['train.objective={name="rlhf", estimator="ppo", ppo_epochs=0}'],
     "train.objective.ppo_epochs = 0 must be >= 1"),
    (['train.objective={name="rlhf", ptx_coef=-1.0}'], "train.objective.ptx_coef = -1"),
    (['train.objective={name="rlhf", estimator="reinforce", kl_target=-0.1}'],
     "train.objective.kl_target = -0.1 must be >= 0"),
    (['train.objective={name="rlhf", estimator="a2c"}'], "must be one of exact, reinforce, ppo"),
])
def test_bad_rl_configs_exit_2_with_one_line(tmp_path, capsys, overrides, message):
    from dynamics.cli import main

    path = tmp_path / "c.toml"
    path.write_text(RL_CONFIG)
    args = ["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_the_advantage_model_with_one_task_is_reinforce_with_the_expected_baseline():
    """One behavior: the advantage model's score ``(r − E_{π_start} r)/σ`` with no further
    baseline is REINFORCE on ``r/σ`` with the policy-expected baseline, answer for answer,
    on the first rollout (afterwards the model's baseline stays at the start's policy)."""
    one = Problem((problem().behaviors[0],))
    data = sample_batch(one, 64, [3], dtype=torch.float64)
    g = data.features[0]
    probs = torch.softmax(g @ torch.as_tensor(W0 + START).T, -1)
    task = g @ torch.as_tensor(HEAD3).T
    sigma = float((((probs * task**2).sum(-1) - (probs * task).sum(-1) ** 2)).mean().sqrt())
    common = dict(seeds=[3], beta=0.6, lr=0.3, steps=2, reference=W0, reward_head=HEAD3,
                  delta0=START, keep_deltas=True)
    adv = simulate_sample(data, objective=rl(estimator="reinforce", score="advantage",
                                             baseline="none", kl_in="loss"), **common)
    ref = simulate_sample(data, objective=rl(estimator="reinforce", baseline="expected",
                                             kl_in="loss"), reward_scales=[1 / sigma], **common)
    assert_close(adv.deltas[1], ref.deltas[1], CLOSED_FORM)
    assert not torch.allclose(adv.deltas[2], ref.deltas[2])  # the baselines part afterwards


# ============================================================================ held-out pairs

@pytest.mark.parametrize("objective", ["dpo", "rlhf", "sft"])
def test_heldout_metrics_are_the_definitions_on_the_heldout_sample(objective):
    """Train on one sample, report on another: each ``heldout/`` metric equals the
    naive per-example value on the held-out statements at the trained policy."""
    data = sample_batch(problem(), 60, [0], dtype=torch.float64)
    held = sample_batch(problem(), 40, [np.random.default_rng([0, 1])], dtype=torch.float64)
    head = {"reward_head": HEAD3} if objective == "rlhf" else {}
    sim = simulate_sample(data, seeds=[0], beta=0.8, lr=0.3, steps=3, reference=W0,
                          objective=objective, heldout=held, keep_deltas=True, **head)
    g, s, w0 = held.features[0], held.signs[0], torch.as_tensor(W0)
    for k in range(4):
        theta = sim.deltas[k, 0, 0]
        w = w0 + (theta if objective != "dpo" else torch.stack(
            [theta / 2, -theta / 2, torch.zeros_like(theta)]))
        logp, logp0 = torch.log_softmax(g @ w.T, -1), torch.log_softmax(g @ w0.T, -1)
        pos = s > 0
        ranking = torch.where(pos, 1.0, -1.0) * (logp[:, YES] - logp[:, NO])
        per = {"accuracy": (ranking > 0).double() + 0.5 * (ranking == 0).double(),
               "objective/kl": (logp.exp() * (logp - logp0)).sum(-1)}
        if objective == "rlhf":
            per["objective/rlhf_reward"] = (logp.exp() * (g @ torch.as_tensor(HEAD3).T
                                                          - 0.8 * (logp - logp0))).sum(-1)
        for name, values in per.items():
            want = [values[held.behavior == i].mean() for i in range(2)]
            assert_close(sim.per_behavior[f"heldout/{name}"][k, 0, 0], torch.stack(want),
                         CLOSED_FORM, err_msg=name)
    assert not np.allclose(sim.per_behavior["heldout/accuracy"][-1],
                           sim.per_behavior["accuracy"][-1])  # another sample


@pytest.mark.cli
def test_heldout_n_adds_columns_and_the_theory_fills_them_with_the_population(tmp_path):
    import pandas as pd

    from dynamics.cli import main

    path = tmp_path / "c.toml"
    path.write_text(RL_CONFIG + "heldout_n = 50\n")
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    frame = pd.read_parquet(tmp_path / "o" / "metrics.parquet")
    theory, sim = frame[frame["source"] == "theory"], frame[frame["source"] == "simulation"]
    assert (theory["heldout/accuracy"] == theory["accuracy"]).all()
    assert sim["heldout/accuracy"].notna().all() and sim["heldout/loss"].notna().all()
    assert not (sim["heldout/accuracy"] == sim["accuracy"]).all()
