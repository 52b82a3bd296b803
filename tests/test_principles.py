"""Principle-driven labels (Self-Align; :mod:`synthetic.principles`).

Checked against independent references: the builder's cosines; the labels' quality
against a one-dimensional integral (the principles' errors share the noise along
``d_i`` and are independent given it); one principle along ``d_i`` on a behavior with
no spread along ``d_i`` gives the true labels exactly, and then the flow is the
label-free flow; the flow's drift under a judge's labels equals a Monte Carlo gradient;
flow and simulation agree; bad principle sets are refused with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import CLOSED_FORM, QUADRATURE, Z_SCORE, assert_close
from dynamics import population_descent, reference_weights, simulate
from dynamics.analytic import PopulationFlow
from dynamics.cli import main
from dynamics.config import build_problem, load_config
from synthetic import Behavior, ParameterError, Problem, population_mixture, sample
from synthetic.principles import (
    label_quality,
    principles_with_cosine,
    shared_principles,
    summed_cosine,
)
from synthetic.problem import isotropic

W0 = reference_weights(4, vocab_size=2, seed=2)


def judged(rho: float, count: int, combine="vote", delta=2.0, dim=4) -> Problem:
    base = Problem((isotropic("a", dim, delta), isotropic("b", dim, 1.0, direction=np.eye(dim)[1])))
    return base.replace(principles=principles_with_cosine(
        base.directions, base.centers, rho, count, seed=3, combine=combine))


def test_the_builder_gives_the_cosines_asked_for():
    problem = judged(0.6, 3, dim=6)
    p = problem.principles.directions  # (K, k, d)
    unit = problem.directions / np.linalg.norm(problem.directions, axis=1, keepdims=True)
    np.testing.assert_allclose(np.einsum("ikd,id->ik", p, unit), 0.6, atol=1e-14)
    np.testing.assert_allclose(np.linalg.norm(p, axis=-1), 1.0, atol=1e-14)
    gram = np.einsum("ikd,ild->ikl", p, p)
    off = gram[:, ~np.eye(3, dtype=bool)]
    np.testing.assert_allclose(off, 0.36, atol=1e-14)  # ρ² between two principles


@pytest.mark.parametrize("rho, count", [(0.3, 1), (0.5, 3), (0.8, 5)])
def test_label_quality_equals_the_one_dimensional_integral(rho, count):
    problem = judged(rho, count, dim=8)
    data = sample(problem, 40_000, seed=1, dtype=torch.float64)
    a = data.behavior == 0
    agree = float((data.signs[a] == data.true_signs[a]).double().mean())
    want = label_quality(rho, count, 2.0)
    n = int(a.sum())
    assert abs(agree - want) < Z_SCORE * np.sqrt(want * (1 - want) / n)


@pytest.mark.parametrize("combine", ["vote", "sum"])
def test_label_quality_against_sampled_agreement_and_its_limits(combine):
    """Behavior b (δ = 1) of a 3-principle judge, σ = 1: the measured agreement within
    the binomial error; ρ = 1 and k → ∞ give the Bayes rule Φ(δ/2σ), ρ = 0 a coin, and a
    negative cosine the mirror 1 − P."""
    problem = judged(0.6, 3, combine=combine, dim=8)
    data = sample(problem, 40_000, seed=5, dtype=torch.float64)
    b = data.behavior == 1
    agree = float((data.signs[b] == data.true_signs[b]).double().mean())
    want = label_quality(0.6, 3, 1.0, combine=combine)
    assert abs(agree - want) < Z_SCORE * np.sqrt(want * (1 - want) / int(b.sum()))
    bayes = stats.norm.cdf(1.0)
    assert_close(label_quality(1.0, 3, 2.0, combine=combine), bayes, QUADRATURE)
    assert_close(label_quality(0.0, 5, 2.0, combine=combine), 0.5, QUADRATURE)
    assert_close(label_quality(-0.6, 3, 2.0, combine=combine),
                 1 - label_quality(0.6, 3, 2.0, combine=combine), QUADRATURE)
    many = [label_quality(0.5, k, 2.0, combine=combine) for k in (1, 3, 9, 101, 1001)]
    assert np.all(np.diff(many) > 0) and bayes - many[-1] < 3e-3
    assert_close(summed_cosine(0.5, 4), 1.0 / np.sqrt(1.75), CLOSED_FORM)


def test_label_quality_refuses_what_it_does_not_follow():
    with pytest.raises(ParameterError, match="count = 2 must be odd"):
        label_quality(0.5, 2, 2.0)
    with pytest.raises(ParameterError, match="cosine"):
        label_quality(1.5, 3, 2.0)


def test_sum_of_scores_is_one_principle_along_their_sum():
    problem = judged(0.5, 3, combine="sum", dim=6)
    data = sample(problem, 2_000, seed=4, dtype=torch.float64)
    summed = problem.principles.directions.sum(1, keepdims=True)
    one = problem.replace(principles=problem.principles.__class__(
        summed, problem.centers, "sum"))
    same = sample(one, 2_000, seed=4, dtype=torch.float64)
    assert torch.equal(data.signs, same.signs)


def no_spread_along_d() -> Problem:
    """Two behaviors whose classes differ only along a direction with no variance."""
    cov = np.diag([0.0, 1.0, 0.5, 0.8])
    cov_b = np.diag([1.0, 0.0, 0.7, 0.6])
    return Problem((Behavior("a", [0.8, 0.1, 0, 0], [-0.6, 0.1, 0, 0], cov, cov),
                    Behavior("b", [0.2, 0.5, 0, 0.1], [0.2, -0.7, 0, 0.1], cov_b, cov_b)))


def test_one_principle_along_d_gives_the_true_labels_and_the_label_free_flow():
    plain = no_spread_along_d()
    truth = plain.replace(principles=principles_with_cosine(plain.directions, plain.centers,
                                                            1.0, 1))
    data = sample(truth, 500, seed=2, dtype=torch.float64)
    assert torch.equal(data.signs, data.true_signs)
    common = dict(beta=1.0, lr=0.5, steps=40, reference=W0, eval_every=10, qmc_points=2**12)
    with_judge = population_descent(population_mixture(truth), **common)
    without = population_descent(population_mixture(plain), **common)
    # QMC (the judge forces it) against the exact flow: the same path to QMC accuracy
    np.testing.assert_allclose(with_judge.deltas, without.deltas, atol=2e-3)
    for name in ("accuracy", "clean_accuracy", "loss"):
        np.testing.assert_allclose(with_judge.per_behavior[name], without.per_behavior[name],
                                   atol=5e-3, err_msg=name)


@pytest.mark.parametrize("objective", ["dpo", "reward_model", "sft"])
def test_the_drift_under_a_judge_is_the_monte_carlo_gradient(objective):
    """Naive reference: the average gradient of the per-example loss over 400k draws,
    each labelled by the judge, by autograd."""
    problem = judged(0.5, 3)
    flow = PopulationFlow(population_mixture(problem), beta=1.0, reference=W0,
                          objective=objective, qmc_points=2**15)
    rng = np.random.default_rng(0)
    theta = rng.normal(0, 0.4, flow.shape)
    drift = flow.drift(theta).numpy()
    data = sample(problem, 400_000, seed=9, dtype=torch.float64)
    x, s = data.features, data.signs
    t = torch.tensor(theta, requires_grad=True)
    w0 = torch.as_tensor(W0)
    if objective in ("dpo", "reward_model"):  # −log σ(s θᵀg) on the Yes − No difference
        loss = torch.nn.functional.softplus(-s * (x @ t)).mean()
    else:  # every row of the policy: −log softmax((W0 + D) g)_{y_w}
        logits = x @ (w0 + t).T
        chosen = torch.where(s > 0, 0, 1)
        loss = torch.nn.functional.cross_entropy(logits, chosen)
    loss.backward()
    gain = flow.objective.gain
    # the per-draw gradients' spread sets the tolerance (the judge's labels are the
    # sample's; the QMC cloud has its own small error)
    np.testing.assert_allclose(drift, -gain * t.grad.numpy(), atol=6e-3)


@pytest.mark.parametrize("objective", ["dpo", "reward_model", "sft"])
def test_flow_and_simulation_agree_under_a_judge(objective):
    problem = judged(0.6, 3)
    common = dict(beta=1.0, lr=1.0, steps=60, reference=W0, objective=objective)
    path = population_descent(population_mixture(problem), eval_every=60, qmc_points=2**14,
                              **common)
    sim = simulate(problem, n=20_000, seeds=[0, 1, 2], dtype=torch.float64, eval_every=60,
                   **common)
    for name in ("clean_accuracy", "accuracy", "loss"):
        theory = path.per_behavior[name][-1]
        runs = sim.per_behavior[name][-1, :, 0]  # (S, K)
        spread = runs.std(0, ddof=1) / np.sqrt(len(runs))
        assert np.all(np.abs(runs.mean(0) - theory) < 5 * spread + 4e-3), (name, theory, runs)


BASE = """
[problem]
dim = 4
[[problem.behaviors]]
name = "a"
distinguishability = 2.0
[train]
n = 40
steps = 3
seeds = 1
"""


@pytest.mark.parametrize("table, key, rule", [
    ("count = 0\ncosine = 0.5", "problem.principles.count", "is an empty principle set"),
    ("directions = []", "problem.principles.directions", "is an empty principle set"),
    ("cosine = 0.5\ndirections = [[1, 0, 0, 0]]", "problem.principles", "exactly one of"),
    ("cosine = 1.5", "problem.principles.cosine", "<= 1"),
    ("cosine = 0.5\ncount = 4", "problem.principles.count", "<= problem.dim - 1 = 3"),
    ("directions = [[0, 0, 0, 0]]", "problem.principles.directions.0", "must not be zero"),
    ("directions = [[1, 0]]", "problem.principles.directions.0", "(4,)"),
])
def test_bad_principle_sets_are_refused(table, key, rule):
    with pytest.raises(ParameterError) as err:
        load_config(None, text=BASE.replace("[[problem", f"[problem.principles]\n{table}\n"
                                            "[[problem", 1))
    assert err.value.name == key and rule in str(err.value), str(err.value)


def test_a_judge_and_label_noise_do_not_combine(tmp_path, capsys):
    text = BASE.replace("dim = 4", "dim = 4\nlabel_noise = 0.1").replace(
        "[[problem", "[problem.principles]\ncosine = 0.5\n[[problem", 1)
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "problem.label_noise" in err[0] and "principles" in err[0]
    assert not (tmp_path / "o").exists()


def test_explicit_principles_are_shared_by_every_behavior():
    config = load_config(None, text=BASE.replace(
        "[[problem", "[problem.principles]\ndirections = [[1, 0, 0, 0], [0.5, 1, 0, 0]]\n"
        "combine = \"sum\"\n[[problem", 1))
    problem = build_problem(config)
    want = shared_principles([[1, 0, 0, 0], [0.5, 1, 0, 0]], 1, problem.centers, combine="sum")
    np.testing.assert_array_equal(problem.principles.directions, want.directions)
    assert problem.principles.combine == "sum"


def test_an_empty_principle_set_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(BASE.replace("[[problem", "[problem.principles]\ndirections = []\n[[problem",
                                 1))
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "problem.principles.directions" in err[0], err
    assert "empty principle set" in err[0] and not (tmp_path / "o").exists()
