"""Every registered objective, tested the moment it is registered.

Each test below is parametrized over :data:`dynamics.objectives.OBJECTIVES`:

* the batched simulation against a naive float64 reference written here from each
  objective's definition: autograd gradient descent on the full ``V × d`` policy
  ``W`` or reward head ``Φ``, and every metric from log-probabilities or rewards
  (a new objective without a naive reference here fails, naming what is missing);
* the registry's derivatives against autograd, and ``gradcheck``;
* the first step (exact: at ``θ = 0`` every margin is 0, so ``F(0) = −G ℓ'(0) E[s g]``
  per row) for the population and for a sample, and the initial loss slope
  ``dL/dt = −‖F(0)‖²/G`` by central differences of the population loss;
* the population flow against the batched simulation (marked ``agreement``): the
  mean error over seeds within ``Z·sd/√S``, and its spread shrinking like ``1/√n``.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (
    CLOSED_FORM,
    EXACT_CONSTRUCTION,
    FINITE_DIFFERENCE,
    QMC,
    assert_close,
    mc_tolerance,
)
from dynamics import population_descent, reference_weights, simulate, simulate_sample
from dynamics.analytic import _GRADED_LEVEL, PopulationFlow, _logistic_offset
from dynamics.metrics import RL_METRICS
from dynamics.model import NO, YES
from dynamics.objectives import OBJECTIVES
from dynamics.phases import read_view
from strategies import bounded
from synthetic import Behavior, Problem, population_mixture, sample_batch

NAMES = sorted(OBJECTIVES)
HYPER = {"cdpo": {"epsilon": 0.2}, "robust_dpo": {"epsilon": 0.15}}
"""Non-default hyperparameters, so that a term scaled by them is exercised."""


def spec(name: str):
    return {"name": name, **HYPER.get(name, {})}


def head_for(vocab: int, dim: int) -> np.ndarray:
    """The frozen reward head ``Φ`` an RL objective maximises in these tests."""
    return np.random.default_rng(11).normal(size=(vocab, dim))


OFFSET = np.array([0.8, -0.5, 0.3])
"""The prompt's offset ``c`` of context distillation in these tests (d = 3)."""


def extra(name: str, vocab: int, dim: int) -> dict:
    """Keyword arguments an objective needs besides the data: a reward head for RL, a
    prompt's offset for context distillation."""
    data = OBJECTIVES[name].data
    if data == "prompts":
        return {"reward_head": head_for(vocab, dim)}
    return {"prompt_offset": OFFSET[:dim]} if data == "context" else {}


def hyper(name: str) -> dict:
    return {**OBJECTIVES[name].defaults(), **HYPER.get(name, {})}


# ============================================================================ naive references

def _logsig(x):
    return torch.log(torch.sigmoid(x))  # straight from the definition (moderate margins)


def _policy_terms(w, w0, g, s, beta):
    """Chosen/rejected log-probabilities of the policy and of the reference."""
    logp, logp0 = torch.log_softmax(g @ w.T, -1), torch.log_softmax(g @ w0.T, -1)
    pos = s > 0
    pick = lambda lp, a, b: torch.where(pos, lp[:, a], lp[:, b])  # noqa: E731
    c, r = pick(logp, YES, NO), pick(logp, NO, YES)
    c0, r0 = pick(logp0, YES, NO), pick(logp0, NO, YES)
    return c, r, c0, r0


def _margin(w, w0, g, s, beta):
    c, r, c0, r0 = _policy_terms(w, w0, g, s, beta)
    return (c - c0) - (r - r0)


def _rewards(phi, g, s):
    r = g @ phi.T
    pos = s > 0
    return torch.where(pos, r[:, YES], r[:, NO]), torch.where(pos, r[:, NO], r[:, YES])


NAIVE = {
    "dpo": lambda w, w0, g, s, beta: -_logsig(beta * _margin(w, w0, g, s, beta)),
    "cdpo": lambda w, w0, g, s, beta, epsilon: (
        -(1 - epsilon) * _logsig(beta * _margin(w, w0, g, s, beta))
        - epsilon * _logsig(-beta * _margin(w, w0, g, s, beta))),
    "robust_dpo": lambda w, w0, g, s, beta, epsilon: (
        (-(1 - epsilon) * _logsig(beta * _margin(w, w0, g, s, beta))
         + epsilon * _logsig(-beta * _margin(w, w0, g, s, beta))) / (1 - 2 * epsilon)),
    "ipo": lambda w, w0, g, s, beta: (_margin(w, w0, g, s, beta) - 1 / (2 * beta)) ** 2,
    "hinge": lambda w, w0, g, s, beta: torch.relu(1 - beta * _margin(w, w0, g, s, beta)),
    "reward_model": lambda phi, w0, g, s, beta: -_logsig(
        _rewards(phi, g, s)[0] - _rewards(phi, g, s)[1]),
    "binary": lambda phi, w0, g, s, beta: (-_logsig(_rewards(phi, g, s)[0])
                                           - _logsig(-_rewards(phi, g, s)[1])),
    "sft": lambda w, w0, g, s, beta: -_policy_terms(w, w0, g, s, beta)[0],
    "rlhf": lambda w, w0, g, s, beta: -_rl_return(w, w0, g, beta),
    # from the reference (every test starts there): the teacher is W0 seeing g + c
    "distill": lambda w, w0, g, s, beta: (
        torch.softmax((g + torch.as_tensor(OFFSET)) @ w0.T, -1)
        * (torch.log_softmax((g + torch.as_tensor(OFFSET)) @ w0.T, -1)
           - torch.log_softmax(g @ w.T, -1))).sum(-1),
}


def _rl_return(w, w0, g, beta):
    """``Σ_y π(y) r(y) − β KL(π ‖ π0)`` per prompt, the head :func:`head_for`'s."""
    pi, logp, logp0 = torch.softmax(g @ w.T, -1), torch.log_softmax(g @ w.T, -1), (
        torch.log_softmax(g @ w0.T, -1))
    r = g @ torch.as_tensor(head_for(*w.shape)).T
    return (pi * r).sum(-1) - beta * (pi * (logp - logp0)).sum(-1)


def naive_metrics(name, trained, w0, g, s, beta, behavior, k, true):
    """Every metric of :mod:`dynamics.metrics` per behavior, from the definitions."""
    obj = OBJECTIVES[name]
    policy = trained if obj.block == "policy" else w0
    c, r, c0, r0 = _policy_terms(policy, w0, g, s, beta)
    half = lambda x: (x > 0).double() + 0.5 * (x == 0).double()  # noqa: E731
    if obj.block == "policy":
        chosen, rejected = beta * (c - c0), beta * (r - r0)
    else:
        chosen, rejected = _rewards(trained, g, s)
    rows = {
        "loss": NAIVE[name](trained, w0, g, s, beta, **HYPER.get(name, {})),
        "accuracy": half(c - r),
        "reward_accuracy": half(chosen - rejected),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "clean_accuracy": half((c - r) * s * true),  # the ranking against the true label
    }
    if obj.block == "policy":  # TRL's PPO statistics, over the answers
        logp, logp0 = torch.log_softmax(g @ policy.T, -1), torch.log_softmax(g @ w0.T, -1)
        rows["objective/kl"] = (logp.exp() * (logp - logp0)).sum(-1)
        if obj.data == "prompts":
            rows["objective/scores"] = (logp.exp() * (g @ torch.as_tensor(
                head_for(*policy.shape)).T)).sum(-1)
            rows["objective/rlhf_reward"] = _rl_return(policy, w0, g, beta)
    return {m: np.array([v[behavior == i].mean().item() for i in range(k)])
            for m, v in rows.items()}


def small_problem(dim=3, label_noise=0.2) -> Problem:
    return Problem((
        Behavior("a", [0.9, 0.2, 0.0], [-0.5, 0.1, 0.3], 0.6 * np.eye(dim), 0.4 * np.eye(dim),
                 pos_fraction=0.4),
        Behavior("b", [0.0, 0.4, 0.7], [0.1, -0.6, -0.2], np.diag([0.5, 0.3, 0.8]),
                 np.diag([0.5, 0.3, 0.8]), weight=0.5),
    ), label_noise=label_noise)


def test_every_objective_has_a_naive_reference():
    missing = sorted(set(OBJECTIVES) - set(NAIVE))
    assert not missing, f"write a naive reference in tests/test_registry.py for {missing}"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch_size", [None, 16])
def test_simulation_equals_naive_autograd_on_the_full_matrix(name, batch_size):
    """float64 SGD on ``W`` (or ``Φ``) with autograd, every metric at every step."""
    if name not in NAIVE:
        pytest.fail(f"no naive reference for {name!r}")
    obj = OBJECTIVES[name]
    problem, beta, lr, steps, seed = small_problem(), 0.7, 0.4, 6, 3
    w0 = torch.as_tensor(reference_weights(3, vocab_size=4, seed=1))
    data = sample_batch(problem, 48, [seed], dtype=torch.float64)
    g, s, behavior = data.features[0], data.signs[0], data.behavior
    sim = simulate_sample(data, seeds=[seed], beta=beta, lr=lr, steps=steps,
                          reference=w0.numpy(), objective=spec(name), batch_size=batch_size,
                          keep_deltas=True, **extra(name, 4, 3))
    param = (w0.clone() if obj.block == "policy" else torch.zeros_like(w0)).requires_grad_()
    perms = None
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps + 1):
        got = {m: sim.per_behavior[m][k, 0, 0] for m in sim.per_behavior}
        want = naive_metrics(name, param.detach(), w0, g, s, beta, behavior, 2,
                             data.true_signs[0])
        assert set(got) == set(want), (name, sorted(set(got) ^ set(want)))
        for m in want:
            assert_close(got[m], want[m], CLOSED_FORM, err_msg=f"{name} {m} step {k}")
        start = param.detach() - (w0 if obj.block == "policy" else 0)
        theta = sim.deltas[k, 0, 0]
        assert_close(theta, read_view(obj, start), CLOSED_FORM, err_msg=f"{name} θ step {k}")
        if k == steps:
            break
        if batch_size is None:
            idx = torch.arange(len(s))
        else:  # the simulation's stream: a fresh permutation per epoch, in order
            per_epoch = len(s) // batch_size
            if k % per_epoch == 0:
                perms = torch.randperm(len(s), generator=gen)
            idx = perms[(k % per_epoch) * batch_size:(k % per_epoch + 1) * batch_size]
        loss = NAIVE[name](param, w0, g[idx], s[idx], beta, **HYPER.get(name, {})).mean()
        (grad,) = torch.autograd.grad(loss, param)
        with torch.no_grad():
            param -= lr * grad


# ============================================================================ derivatives

MARGIN_NAMES = [n for n in NAMES if OBJECTIVES[n].view != "all"]
LOGIT_NAMES = [n for n in NAMES if OBJECTIVES[n].view == "all"]


@pytest.mark.parametrize("name", MARGIN_NAMES)
@settings(max_examples=40, deadline=None)
@given(st.lists(bounded(-20.0, 20.0), min_size=1, max_size=8), bounded(0.05, 5.0))
def test_registry_derivatives_match_autograd(name, margins, beta):
    obj, hp = OBJECTIVES[name], hyper(name)
    h = torch.tensor(margins, dtype=torch.float64, requires_grad=True)
    (first,) = torch.autograd.grad(obj.loss(h, beta, **hp).sum(), h, create_graph=True)
    away = (beta * h.detach() - 1).abs() > 1e-9  # a kink (hinge at βh = 1) has no derivative
    assert_close(obj.grad(h.detach(), beta, **hp)[away], first.detach()[away], CLOSED_FORM,
                 scale=1 + beta)
    # NumPy in, NumPy out: the population flow calls the same functions on arrays
    assert_close(obj.grad(h.detach().numpy(), beta, **hp), obj.grad(h.detach(), beta, **hp),
                 CLOSED_FORM, scale=1 + beta)
    if obj.hess is not None:
        (second,) = torch.autograd.grad(first.sum(), h)
        assert_close(obj.hess(h.detach(), beta, **hp), second, CLOSED_FORM, scale=1 + beta**2)
        # the flow's shared-work path gives the same pair
        both = obj.derivatives(h.detach().numpy(), beta, **hp)
        assert_close(both[0], obj.grad(h.detach(), beta, **hp), CLOSED_FORM, scale=1 + beta)
        assert_close(both[1], second, CLOSED_FORM, scale=1 + beta**2)


@pytest.mark.parametrize("name", MARGIN_NAMES)
def test_logit_form_equals_the_derivative(name):
    """``ℓ'(h) = outer(β)·inner_(inner_scale(β)·h)``, the simulation's hot path."""
    obj, hp = OBJECTIVES[name], hyper(name)
    if obj.inner_ is None:
        pytest.skip(f"{name} has no logit form (the simulation calls grad)")
    h = torch.linspace(-6, 6, 97, dtype=torch.float64)[:, None]
    beta = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
    fast = obj.outer(beta) * obj.inner_(obj.inner_scale(beta) * h, **hp)
    assert_close(fast, obj.grad(h, beta, **hp), CLOSED_FORM)


@pytest.mark.parametrize("name", MARGIN_NAMES)
def test_gradcheck(name):
    obj, hp = OBJECTIVES[name], hyper(name)
    gen = torch.Generator().manual_seed(4)
    h = (torch.randn(9, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: obj.loss(x, 0.8, **hp), (h,))


@pytest.mark.parametrize("name", LOGIT_NAMES)
def test_logit_gradient_matches_autograd(name):
    obj = OBJECTIVES[name]
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    chosen = torch.randint(0, 5, (11,), generator=gen)
    context = {}
    if obj.data == "prompts":  # reference logits, rewards, and one β per leading row
        context = {"reference": torch.randn(1, 5, 11, generator=gen, dtype=torch.float64),
                   "rewards": torch.randn(3, 5, 11, generator=gen, dtype=torch.float64),
                   "beta": torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)[:, None, None]}
    if obj.data == "context":
        context = {"teacher": torch.randn(3, 5, 11, generator=gen, dtype=torch.float64)}
    (auto,) = torch.autograd.grad(obj.logit_loss(logits, chosen, **context).sum(), logits)
    assert_close(obj.logit_grad(logits.detach(), chosen, **context), auto, CLOSED_FORM)
    assert torch.autograd.gradcheck(lambda x: obj.logit_loss(x, chosen, **context), (logits,))


# ============================================================================ first step


def first_drift(name, mixture, vocab):
    """``F(0)`` from the definition: ``−G ℓ'(0) σ_r E[s g]`` per margin row; for
    the all-row view with ``W0 = 0`` (uniform policy) ``−Σ_c π_c (𝟙/V − e_{y_w}) μ_cᵀ``."""
    obj = OBJECTIVES[name]
    m = mixture.signed_mean()
    if obj.data == "context":
        # at W0 = 0 the prompted reference is uniform too: the student already matches it
        return np.zeros((vocab, mixture.dim))
    if obj.data == "prompts":
        # RL at the uniform policy (π = π0 = 𝟙/V): ∂J/∂logits = (r − r̄𝟙)/V with r = Φg,
        # so F(0) = (1/V)(I − 𝟙𝟙ᵀ/V) Φ E[ggᵀ], E[ggᵀ] = Σ_c π_c (Σ_c + μ_c μ_cᵀ)
        second = sum(pi * (cov + np.outer(mu, mu))
                     for pi, mu, cov in zip(mixture.weights, mixture.means, mixture.covs))
        centre = np.eye(vocab) - 1 / vocab
        return centre @ head_for(vocab, mixture.dim) @ second / vocab
    if obj.view == "all":
        out = np.zeros((vocab, mixture.dim))
        for pi, s, mu in zip(mixture.weights, mixture.signs, mixture.means):
            target = np.full(vocab, 1 / vocab)
            target[YES if s > 0 else NO] -= 1
            out -= pi * np.outer(target, mu)
        return out
    slope = float(obj.grad(np.zeros(1), 0.7, **hyper(name))[0])
    rows = np.array([sign * -obj.gain * slope * m for sign in obj.row_signs])
    return rows[0] if obj.view == "difference" else rows


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family", ["gaussian", "laplace", "uniform"])
def test_first_step_and_initial_slope(name, family):
    obj = OBJECTIVES[name]
    problem = small_problem().replace(family=family)
    mixture = population_mixture(problem)
    w0 = np.zeros((3, 3)) if obj.view == "all" else reference_weights(3, vocab_size=3, seed=2)
    # RL's integrand at 0 is quadratic in g (reward times g): under Laplace tails QMC
    # needs more points than for the other objectives' bounded ones to reach 1e-4
    points = 2**15 if obj.data == "prompts" else 8192
    flow = PopulationFlow(mixture, beta=0.7, reference=w0, objective=spec(name),
                          qmc_points=points, **extra(name, 3, 3))
    drift = flow.drift(np.zeros(flow.shape)).numpy()
    # the all-row view's expectations are QMC over the cloud (its mean is μ to ~1e-4)
    tol = QMC if obj.view == "all" or family == "uniform" else CLOSED_FORM
    assert_close(drift, first_drift(name, mixture, 3), tol)
    # the initial slope of the population loss along F(0) is −‖F(0)‖²/G
    eps, k = 1e-3, mixture.behavior_weights()
    losses = [flow.metrics(sign * eps * drift)[0]["loss"].numpy() @ k for sign in (1, -1)]
    slope = (losses[0] - losses[1]) / (2 * eps)
    assert_close(slope, -np.sum(drift**2) / obj.gain,
                 FINITE_DIFFERENCE if tol == CLOSED_FORM else QMC * 10,
                 scale=1 + np.sum(drift**2))
    # a sample's first step is the same formula with its own means, exactly
    data = sample_batch(problem, 64, [7], dtype=torch.float64)
    sim = simulate_sample(data, seeds=[7], beta=0.7, lr=0.3, steps=1, reference=w0,
                          objective=spec(name), keep_deltas=True, **extra(name, 3, 3))
    from synthetic.mixture import empirical_mixture

    empirical = empirical_mixture(data.features[0], data.signs[0], data.behavior, data.names)
    assert_close(sim.deltas[1, 0, 0].numpy(), 0.3 * first_drift(name, empirical, 3), CLOSED_FORM)


# ============================================================================ agreement

AGREE_SEEDS, AGREE_N = list(range(24)), 1500
AGREE = dict(beta=1.0, lr=0.15, steps=40, eval_every=20)


def errors(problem, name, n, theory, w0):
    sim = simulate(problem, n=n, seeds=AGREE_SEEDS, reference=w0, objective=spec(name),
                   dtype=torch.float64, **AGREE, **extra(name, *w0.shape))
    out = {m: sim.per_behavior[m][:, :, 0] - theory.per_behavior[m][:, None]
           for m in ("loss", "accuracy", "reward_accuracy", "rewards/margins",
                     "clean_accuracy") + tuple(k for k in RL_METRICS if k in sim.per_behavior)}
    if OBJECTIVES[name].block == "policy":
        out["weight_change"] = (sim.weight_change[:, :, 0] - theory.weight_change[:, None])[
            ..., None]
    return out


@pytest.mark.agreement
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family", ["gaussian", "laplace", "uniform"])
def test_flow_agrees_with_simulation(name, family):
    """Mean error over seeds within Z·sd/√S at n and 16n; its spread shrinks ~1/√n."""
    problem = small_problem().replace(family=family, label_noise=0.1)
    w0 = reference_weights(3, vocab_size=3, seed=0)
    theory = population_descent(population_mixture(problem), reference=w0,
                                objective=spec(name), **AGREE, **extra(name, *w0.shape))
    # QMC where the flow uses it: the all-row view, and any family that is no scale mixture
    rule = QMC if OBJECTIVES[name].view == "all" or family == "uniform" else 0.0
    small = errors(problem, name, AGREE_N, theory, w0)
    large = errors(problem, name, 16 * AGREE_N, theory, w0)
    for metric in small:
        for errs in (small[metric], large[metric]):
            mean, sd = errs[1:].mean(1), errs[1:].std(1, ddof=1)  # step 0 is exact
            assert_close(mean, 0.0, 1.0, scale=mc_tolerance(sd, len(AGREE_SEEDS)) + rule,
                         err_msg=f"{name} {metric}")
        ratio = small[metric][1:].std(1, ddof=1) / large[metric][1:].std(1, ddof=1)
        assert np.all((ratio > 2.0) & (ratio < 8.0)), (name, metric, ratio)


# ============================================================================ the flow's fast path

FAST_DESCENT = [n for n in NAMES if OBJECTIVES[n].view == "difference"
                and _logistic_offset(OBJECTIVES[n], hyper(n)) is not None]
"""Objectives whose population descent runs on :class:`dynamics.analytic._LogisticDrift`'s
buffers (recognised by their derivatives, not their names)."""


def test_the_logistic_family_takes_the_fast_descent():
    assert {"dpo", "cdpo", "robust_dpo"} <= set(FAST_DESCENT)


def _fast_against_generic(name: str, delta0, lr: float, beta: float = 60.0) -> set:
    """``population_descent``'s fast loop (coefficients folded with ``lr``, rows
    ``[q²; q]``) against ``θ ← θ + lr·F(θ)`` with ``F`` the generic drift (the
    objective's own derivatives at the rule's nodes), 40 steps; the rule levels the
    run visited."""
    cov = np.array([[0.3, 0.05], [0.05, 0.2]])
    problem = Problem((Behavior("a", [1.5, -0.2], [-1.0, 0.5], cov, 0.5 * cov,
                                pos_fraction=0.4),))
    mix = population_mixture(problem)
    w0 = np.array([[0.3, -0.1], [0.0, 0.2]])
    steps = 40
    flow = PopulationFlow(mix, beta=beta, reference=w0, objective=spec(name))
    delta0 = np.asarray(delta0, dtype=np.float64)
    got = population_descent(mix, beta=beta, lr=lr, steps=steps, reference=w0,
                             objective=spec(name), delta0=delta0, eval_every=3)
    theta, want, kept = delta0.copy(), [], set(got.steps.tolist())
    levels = set()
    for k in range(steps + 1):
        levels.add(flow._level(float(np.sqrt(max(theta @ c @ theta for c in mix.covs)))))
        if k in kept:
            want.append(theta.copy())
        theta = theta + lr * flow._drift_np_generic(theta)
    assert_close(got.deltas, np.array(want), EXACT_CONSTRUCTION, scale=1 + np.abs(want).max())
    return levels


@pytest.mark.parametrize("name", FAST_DESCENT)
def test_fast_descent_equals_a_loop_of_the_generic_drift(name):
    """From ``Δ = 0``, and from a start whose logit spread (~200) needs graded rules:
    the fast path hands those steps to the generic one."""
    _fast_against_generic(name, [0.0, 0.0], 1e-3)
    scale = PopulationFlow(population_mixture(Problem((Behavior(
        "a", [1.0, 0.0], [-1.0, 0.0], np.eye(2), np.eye(2)),))), beta=60.0,
        reference=np.zeros((2, 2)), objective=spec(name)).scale
    assert max(_fast_against_generic(name, np.array([4.0, -3.0]) * 60 / scale, 5e-4)) > (
        _GRADED_LEVEL)


def test_fast_descent_hands_over_between_rule_levels():
    """Robust DPO from ``Δ = 0`` at β = 60 climbs from level 0 into graded rules in one
    run: the fast and the generic steps alternate within it and agree."""
    levels = _fast_against_generic("robust_dpo", [0.0, 0.0], 1e-3)
    assert {0, 1, 2, 3, _GRADED_LEVEL, _GRADED_LEVEL + 1} <= levels
