"""Issue 13, experiment 1: the two capacity axes of the head.

* ``model.features = k``: the head sees the first ``k`` coordinates of ``g``. ``k = d``
  is the unrestricted run bit for bit; ``k < d`` is the marginal problem declared
  directly in ``k`` dimensions (theory to EXACT_CONSTRUCTION, simulation identical on
  the same draws).
* ``model.hidden_units = H``: an MLP head ``f(g) = U relu(A g + a)``. The batched trainer
  against a naive per-seed, per-example autograd loop; a finite-difference gradient
  check; its step 0 is the linear head's step 0; it beats the linear head on classes
  that differ only in covariance (a quadratic Bayes boundary).
* docs/theory.md §12: imitation, ranked preference and binary discrimination in the
  two-answer model, checked as identities of the linear head.
* Bad input: one line naming the key and the rule, exit code 2.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import CLOSED_FORM, EXACT_CONSTRUCTION, FINITE_DIFFERENCE, assert_close
from dynamics import reference_weights, simulate_sample
from dynamics.cli import main
from dynamics.config import build_problem, load_config
from dynamics.experiment import run_experiment
from dynamics.mlp_head import MLP_TAG, mlp_forward, mlp_losses
from dynamics.model import NO, YES
from dynamics.objectives import OBJECTIVES
from dynamics.phases import run_simulation
from dynamics.config import phases_of
from synthetic import Behavior, ParameterError, Problem, sample_batch

# A correlated problem in d = 4 whose first two coordinates are not independent of the
# last two: the marginal is not a block of independent coordinates.
MU_POS = [0.8, -0.3, 0.5, 0.2]
MU_NEG = [-0.4, 0.5, -0.1, 0.0]
COV = [[1.0, 0.3, 0.2, 0.1], [0.3, 0.8, -0.2, 0.0], [0.2, -0.2, 1.2, 0.4],
       [0.1, 0.0, 0.4, 0.9]]
COV_NEG = [[0.7, -0.1, 0.0, 0.2], [-0.1, 1.1, 0.3, 0.0], [0.0, 0.3, 0.9, 0.1],
           [0.2, 0.0, 0.1, 1.0]]


def full_config(extra: str = "") -> str:
    return f"""
[problem]
dim = 4
family = "laplace"
label_noise = 0.1
[[problem.behaviors]]
name = "a"
mu_pos = {MU_POS}
mu_neg = {MU_NEG}
cov_pos = {COV}
cov_neg = {COV_NEG}
[[problem.behaviors]]
name = "b"
distinguishability = 1.5
direction = [0.0, 1.0, 1.0, 0.0]
[model]
vocab_size = 3
[train]
steps = 6
n = 60
seeds = 2
heldout_n = 40
dtype = "float64"
[theory]
qmc_points = 512
{extra}"""


# ============================================================================ model.features


def test_features_equal_to_dim_is_the_unrestricted_run_bit_for_bit():
    base = run_experiment(load_config(None, text=full_config()), progress=False)
    same = run_experiment(load_config(None, text=full_config(), overrides=["model.features=4"]),
                          progress=False)
    pd.testing.assert_frame_equal(base, same, check_exact=True)


def marginal_config(k: int, w0: np.ndarray) -> str:
    """The problem of :func:`full_config` declared directly in ``k`` dimensions with the
    marginal means and covariances typed out, and the reference ``W0[:, :k]`` given."""
    cut = lambda v: np.asarray(v)[:k].tolist()  # noqa: E731
    block = lambda c: np.asarray(c)[:k, :k].tolist()  # noqa: E731
    direction = np.array([0.0, 1.0, 1.0, 0.0]) / np.sqrt(2) * 1.5  # builder b's μ⁺ − μ⁻
    return f"""
[problem]
dim = {k}
family = "laplace"
label_noise = 0.1
[[problem.behaviors]]
name = "a"
mu_pos = {cut(MU_POS)}
mu_neg = {cut(MU_NEG)}
cov_pos = {block(COV)}
cov_neg = {block(COV_NEG)}
[[problem.behaviors]]
name = "b"
mu_pos = {cut(direction / 2)}
mu_neg = {cut(-direction / 2)}
cov_pos = 1.0
[model]
vocab_size = 3
reference = {w0[:, :k].tolist()}
[train]
steps = 6
n = 60
seeds = 2
heldout_n = 40
dtype = "float64"
[theory]
qmc_points = 512
"""


@pytest.mark.parametrize("objective", ["dpo", "binary", "sft"])
def test_features_k_is_the_marginal_problem_declared_in_k_dimensions(objective):
    k = 2
    config = load_config(None, text=full_config(), overrides=["model.features=2",
                                                              f"train.objective={objective}"])
    w0 = reference_weights(4, vocab_size=3, seed=0)
    direct = load_config(None, text=marginal_config(k, w0),
                         overrides=[f"train.objective={objective}"])
    restricted = run_experiment(config, progress=False)
    declared = run_experiment(direct, progress=False)
    theory = lambda f: f[f["source"] == "theory"].reset_index(drop=True)  # noqa: E731
    numeric = [c for c in restricted.columns if restricted[c].dtype.kind == "f"]
    np.testing.assert_allclose(theory(restricted)[numeric].to_numpy(),  # NaN where NaN
                               theory(declared)[numeric].to_numpy(), rtol=EXACT_CONSTRUCTION,
                               atol=EXACT_CONSTRUCTION)
    # the simulation on the same draws: the full-dimensional sample, truncated
    full = build_problem(config)
    data = sample_batch(full, 60, [0, 1], dtype=torch.float64).restrict(k)
    assert torch.equal(data.features, sample_batch(full, 60, [0, 1],
                                                   dtype=torch.float64).features[..., :k])
    frames, _ = run_simulation(data, phases_of(direct), seeds=[0, 1], beta=1.0,
                               reference=w0[:, :k], eval_every=1)
    sim = restricted[restricted["source"] == "simulation"].reset_index(drop=True)
    mine = frames[0].reset_index(drop=True)
    columns = [c for c in mine.columns if mine[c].dtype.kind == "f"
               and not c.startswith("heldout/") and c not in (
                   "weight_change_bound", "loss_lower", "loss_upper", "accuracy_lower",
                   "reward_accuracy_lower")]
    pd.testing.assert_frame_equal(sim[columns], mine[columns], check_exact=True)


def test_problem_restrict_takes_the_marginal_and_refuses_a_non_uniform_marginal():
    problem = build_problem(load_config(None, text=full_config()))
    two = problem.restrict(2)
    assert two.dim == 2 and problem.restrict(4) is problem
    np.testing.assert_array_equal(two.behaviors[0].cov_neg, np.asarray(COV_NEG)[:2, :2])
    with pytest.raises(ParameterError, match=r"^features = 5 must be <= 4"):
        problem.restrict(5)
    uniform = problem.replace(family="uniform")
    with pytest.raises(ParameterError, match="marginal is not uniform"):
        uniform.restrict(2)
    diag = Problem((Behavior("d", [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], np.diag([1.0, 2.0, 3.0]),
                             np.eye(3)),), family="uniform")
    assert diag.restrict(2).dim == 2  # diagonal covariances: the marginal is uniform


# ============================================================================ the MLP head

MLP_OBJECTIVES = ["reward_model", "binary", "sft", "dpo"]


def naive_mlp(x, s, w0, name, beta, lr, steps, A0, hyper=None):
    """Per-example Python loop, plain autograd: the head's parameters after ``steps`` of
    gradient descent on the mean loss, and the mean loss at every step (0..steps)."""
    hyper = hyper or {}
    vocab, (hidden, _) = w0.shape[0], A0.shape
    A = torch.tensor(A0, requires_grad=True)
    a = torch.zeros(hidden, dtype=torch.float64, requires_grad=True)
    U = torch.zeros(vocab, hidden, dtype=torch.float64, requires_grad=True)
    losses = []
    for step in range(steps + 1):
        total = 0.0
        for g, sign in zip(x, s):
            f = U @ torch.relu(A @ g + a)
            yw, yl = (YES, NO) if sign > 0 else (NO, YES)
            if name == "reward_model":  # −log σ(r(y_w) − r(y_l))
                loss = -F.logsigmoid(f[yw] - f[yl])
            elif name == "binary":  # −log σ(r(y_w)) − log σ(−r(y_l))
                loss = -F.logsigmoid(f[yw]) - F.logsigmoid(-f[yl])
            else:
                logp = torch.log_softmax(w0 @ g + f, 0)
                logp0 = torch.log_softmax(w0 @ g, 0)
                if name == "sft":
                    loss = -logp[yw]
                else:  # dpo
                    h = (logp[yw] - logp0[yw]) - (logp[yl] - logp0[yl])
                    loss = -F.logsigmoid(beta * h)
            total = total + loss
        mean = total / len(x)
        losses.append(float(mean.detach()))
        if step == steps:
            break
        grads = torch.autograd.grad(mean, (A, a, U))
        with torch.no_grad():
            for p, grad in zip((A, a, U), grads):
                p -= lr * grad
    return A.detach(), a.detach(), U.detach(), np.array(losses)


@pytest.mark.parametrize("name", MLP_OBJECTIVES)
def test_mlp_head_equals_a_naive_per_example_loop(name):
    dim, vocab, hidden, n, steps, head_seed = 3, 3, 4, 10, 4, 5
    problem = Problem((Behavior("a", [1.0, 0.2, -0.5], [-0.3, 0.4, 0.5], np.eye(dim),
                                0.5 * np.eye(dim)),))
    seeds = [3, 8]
    data = sample_batch(problem, n, seeds, dtype=torch.float64)
    w0 = reference_weights(dim, vocab_size=vocab, seed=2)
    beta, lr = np.array([0.5, 2.0]), np.array([0.7, 0.3])
    result = simulate_sample(data, seeds=seeds, beta=beta, lr=lr, steps=steps, reference=w0,
                             objective=name, hidden_units=hidden, head_seed=head_seed)
    assert result.final is None
    for i, seed in enumerate(seeds):
        # the documented start: A ~ N(0, 1/d) from default_rng([head_seed, seed, MLP_TAG])
        A0 = np.random.default_rng([head_seed, seed, MLP_TAG]).standard_normal(
            (hidden, dim)) / np.sqrt(dim)
        for p in range(2):
            A, a, U, losses = naive_mlp(data.features[i], data.signs[i],
                                        torch.as_tensor(w0), name, beta[p], lr[p], steps, A0)
            assert_close(result.head["A"][i, p], A, CLOSED_FORM)
            assert_close(result.head["a"][i, p, :, 0], a, CLOSED_FORM)
            assert_close(result.head["U"][i, p], U, CLOSED_FORM)
            assert_close(result.per_behavior["loss"][:, i, p, 0], losses, CLOSED_FORM)
            assert np.abs(U.numpy()).max() > 0.01  # it trained
    if name in ("binary", "reward_model"):  # docs/theory.md §12: the head stays antisymmetric
        U = result.head["U"]
        assert_close(U[:, :, NO], -U[:, :, YES], CLOSED_FORM)


@pytest.mark.parametrize("name", MLP_OBJECTIVES + ["hinge", "ipo", "cdpo"])
def test_mlp_loss_gradient_against_finite_differences(name):
    gen = torch.Generator().manual_seed(0)
    S, P, H, V, n, d = 2, 2, 3, 3, 7, 4
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa
    x, s = randn(S, n, d), torch.where(randn(S, n) > 0, 1.0, -1.0).double()
    logits0 = randn(S, 1, V, n)
    beta = torch.tensor([0.5, 1.5], dtype=torch.float64).view(1, -1, 1)
    obj = OBJECTIVES[name]
    hyper = obj.defaults() if name != "cdpo" else {"epsilon": 0.2}
    params = tuple(p.requires_grad_(True) for p in (randn(S, P, H, d), 0.3 * randn(S, P, H, 1),
                                                    randn(S, P, V, H)))
    loss = lambda *ps: mlp_losses(obj, hyper, mlp_forward(x, *ps), logits0, s,  # noqa: E731
                                  beta).mean(-1)
    assert torch.autograd.gradcheck(loss, params, eps=1e-6, atol=FINITE_DIFFERENCE)


@pytest.mark.parametrize("name", ["reward_model", "binary", "sft", "dpo", "ipo", "hinge"])
def test_mlp_step_zero_is_the_linear_head_step_zero(name):
    problem = Problem((Behavior("a", [1.0, 0.2, -0.5], [-0.3, 0.4, 0.5], np.eye(3),
                                0.5 * np.eye(3)),
                       Behavior("b", [0.0, 1.0, 0.0], [0.0, -1.0, 0.0], np.eye(3), np.eye(3))),
                      label_noise=0.2)
    data = sample_batch(problem, 80, [0, 1], dtype=torch.float64)
    held = sample_batch(problem, 50, [5, 6], dtype=torch.float64)
    w0 = reference_weights(3, vocab_size=4, seed=1)
    common = dict(seeds=[0, 1], beta=[0.5, 1.0], lr=0.3, steps=2, reference=w0, objective=name,
                  heldout=held)
    linear = simulate_sample(data, **common)
    mlp = simulate_sample(data, hidden_units=5, **common)
    assert set(mlp.per_behavior) == set(linear.per_behavior)
    for metric, values in linear.per_behavior.items():
        assert_close(mlp.per_behavior[metric][0], values[0], CLOSED_FORM, err_msg=metric)
    assert np.all(mlp.weight_change[0] == 0) and np.all(mlp.weight_change[-1] > 0)


def test_mlp_head_learns_a_quadratic_boundary_the_linear_head_cannot():
    """Equal means, Σ⁺ = diag(2.5, 2.5, 1, 1) against Σ⁻ = diag(0.4, 0.4, 1, 1): the Bayes
    boundary is quadratic (‖g_{1:2}‖² against a threshold, Bayes accuracy 0.796) and
    every linear ranking is at chance. Measured (4 seeds, n = 400, 150 steps, lr 0.5,
    held-out 2,000): the linear head's held-out ranking accuracy 0.486–0.505, the MLP's
    (H = 16) 0.765–0.790 for ranked preference, binary and imitation alike, the smallest
    per-seed gain 0.273; asserted: the MLP beats the linear head by > 0.15 on every seed."""
    cp, cn = np.diag([2.5, 2.5, 1.0, 1.0]), np.diag([0.4, 0.4, 1.0, 1.0])
    problem = Problem((Behavior("quad", np.zeros(4), np.zeros(4), cp, cn),))
    seeds = [0, 1, 2, 3]
    data = sample_batch(problem, 400, seeds, dtype=torch.float64)
    held = sample_batch(problem, 2000, [np.random.default_rng([s, 7]) for s in seeds],
                        dtype=torch.float64)
    w0 = reference_weights(4, seed=0)
    for name, key in (("reward_model", "heldout/reward_accuracy"),
                      ("binary", "heldout/reward_accuracy"), ("sft", "heldout/accuracy")):
        common = dict(seeds=seeds, beta=1.0, lr=0.5, steps=150, reference=w0, objective=name,
                      eval_every=150, heldout=held)
        linear = simulate_sample(data, **common).per_behavior[key][-1, :, 0, 0]
        mlp = simulate_sample(data, hidden_units=16, **common).per_behavior[key][-1, :, 0, 0]
        assert np.all(mlp > linear + 0.15), (name, linear, mlp)


# ============================================================================ docs/theory.md §12


def two_answer_setup(seeds=(0, 1)):
    problem = Problem((Behavior("a", [1.0, 0.2, -0.5], [-0.3, 0.4, 0.5], np.eye(3),
                                0.5 * np.eye(3)),
                       Behavior("b", [0.0, 1.0, 0.0], [0.0, -1.0, 0.0], np.eye(3), np.eye(3))))
    data = sample_batch(problem, 120, list(seeds), dtype=torch.float64)
    return data, reference_weights(3, vocab_size=2, scale=2.0, seed=4)


def test_imitation_is_ranked_preference_started_at_the_reference():
    """V = 2: SFT's u = w_Yes − w_No follows the Bradley–Terry head's ψ started at u0."""
    data, w0 = two_answer_setup()
    u0 = w0[YES] - w0[NO]
    common = dict(seeds=[0, 1], beta=1.0, lr=[0.2, 0.6], steps=40, reference=w0)
    sft = simulate_sample(data, objective="sft", keep_deltas=True, **common)
    ranked = simulate_sample(data, objective="reward_model", delta0=u0, keep_deltas=True,
                             **common)
    u_change = sft.deltas[:, :, :, YES] - sft.deltas[:, :, :, NO]  # (E, S, P, d)
    assert_close(u_change, ranked.deltas - torch.as_tensor(u0), CLOSED_FORM)
    assert_close(sft.per_behavior["loss"], ranked.per_behavior["loss"], CLOSED_FORM)
    # the policy's ranking is the head's: sign(s uᵀg) = sign(s ψᵀg)
    assert_close(sft.per_behavior["accuracy"], ranked.per_behavior["reward_accuracy"],
                 CLOSED_FORM)


def test_binary_discrimination_is_ranked_preference_at_half_the_logit():
    """From zero, φ_No = −φ_Yes and ψ = 2φ_Yes moves by 2η σ(−sψᵀg/2) s g: a NumPy
    reference; and ψ/2 is the ranked head run at η/2."""
    data, w0 = two_answer_setup()
    lr, steps = 0.4, 30
    binary = simulate_sample(data, seeds=[0, 1], beta=1.0, lr=lr, steps=steps, reference=w0,
                             objective="binary", keep_deltas=True)
    rows = binary.deltas.numpy()  # (E, S, 1, 2, d): φ_Yes, φ_No
    assert_close(rows[..., NO, :], -rows[..., YES, :], CLOSED_FORM)
    psi = rows[..., YES, :] - rows[..., NO, :]  # (E, S, 1, d)
    for i in range(2):
        x, s = data.features[i].numpy(), data.signs[i].numpy()
        ref, losses = np.zeros(3), []
        for k in range(steps + 1):
            z = s * (x @ ref)
            losses.append(2 * np.logaddexp(0, -z / 2))  # per example, 2 softplus(−sψᵀg/2)
            assert_close(psi[k, i, 0], ref, CLOSED_FORM)
            ref = ref + 2 * lr * np.mean((1 / (1 + np.exp(z / 2)) * s)[:, None] * x, 0)
        per_behavior = np.stack([np.array(losses)[:, data.behavior.numpy() == b].mean(1)
                                 for b in range(2)], -1)
        assert_close(binary.per_behavior["loss"][:, i, 0], per_behavior, CLOSED_FORM)
    half = simulate_sample(data, seeds=[0, 1], beta=1.0, lr=lr / 2, steps=steps, reference=w0,
                           objective="reward_model", keep_deltas=True)
    assert_close(psi[:, :, 0] / 2, half.deltas[:, :, 0], CLOSED_FORM)
    assert_close(binary.per_behavior["reward_accuracy"], half.per_behavior["reward_accuracy"],
                 CLOSED_FORM)


# ============================================================================ bad input

SMALL = """
[problem]
dim = 3
[[problem.behaviors]]
name = "a"
distinguishability = 1.5
[train]
steps = 3
n = 30
seeds = 1
[theory]
population = false
"""


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_units=0"], "model.hidden_units = 0 must be an integer >= 1: an MLP head "
     "needs at least one hidden unit"),
    (["model.hidden_units=-2"], "model.hidden_units = -2 must be an integer >= 1"),
    (["model.hidden_units=1.5"], "model.hidden_units = 1.5 must be an integer >= 1"),
    (["model.hidden_units=4", "theory.population=true"], "theory.population = True must be "
     "false with model.hidden_units (an MLP head): there is no population flow for it; set "
     "theory.population = false"),
    (["model.hidden_units=4", "train.objective=rlhf"], "train.objective = 'rlhf' cannot train "
     "an MLP head (model.hidden_units): its loss reads prompts"),
    (["model.hidden_units=4", "train.objective=distill", "model.prompt_offset=[1.0, 0.0, 0.0]"],
     "train.objective = 'distill' cannot train an MLP head (model.hidden_units): its loss "
     "reads context"),
    (["model.hidden_units=4", "train.start=aligned"], "train.start = 'aligned' must be one "
     "phase from the reference with model.hidden_units"),
    (["model.hidden_units=4", "model.reward_head=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]"],
     "model.reward_head = 'given' cannot be combined with model.hidden_units"),
    (["model.features=0"], "model.features = 0 must be >= 1"),
    (["model.features=4"], "model.features = 4 must be <= problem.dim = 3"),
    (["model.features=2.5"], "model.features = 2.5 must be an integer"),
    (["model.features=2", "problem.family=uniform", "problem.behaviors.0.direction=[1.0, 1.0, 0.0]",
      "problem.behaviors.0.sigma=1.0"], None),  # isotropic: diagonal, so allowed
])
def test_capacity_keys_bad_input_is_one_line_exit_2(overrides, message, tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(SMALL)
    argv = ["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]
    for item in overrides:
        argv += ["--set", item]
    if message is None:
        assert main(argv) == 0
        return
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefdyn: error: "), err
    assert message in err[0], err
    assert not (tmp_path / "o").exists()


def test_uniform_marginal_of_a_correlated_covariance_is_refused(tmp_path, capsys):
    text = full_config().replace('"laplace"', '"uniform"')
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet",
                 "--set", "model.features=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.features = 2 must equal dim = 4 for the uniform" in err


def test_mlp_from_python_refuses_bad_hidden_units_and_prompt_objectives():
    data, w0 = two_answer_setup()
    common = dict(seeds=[0, 1], beta=1.0, lr=0.1, steps=1, reference=w0)
    with pytest.raises(ParameterError, match=r"^hidden_units = 0 must be an integer >= 1"):
        simulate_sample(data, hidden_units=0, **common)
    with pytest.raises(ParameterError, match=r"^objective = 'rlhf' cannot train an MLP head"):
        simulate_sample(data, hidden_units=2, objective="rlhf", reward_head=np.ones((2, 3)),
                        **common)


def test_mlp_run_through_the_cli_writes_simulation_rows_only(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(SMALL)
    out = tmp_path / "o"
    assert main(["run", str(path), "--out", str(out), "--quiet", "--set", "model.hidden_units=3",
                 "--set", "train.heldout_n=20", "--set", "train.objective=binary"]) == 0
    frame = pd.read_parquet(out / "metrics.parquet")
    assert set(frame["source"]) == {"simulation"}
    assert frame["heldout/reward_accuracy"].notna().all()
    assert frame["objective/kl"].isna().all()  # a reward head: the policy does not move
    assert frame["accuracy_lower"].isna().all()  # no bound for an MLP head


@pytest.mark.parametrize("text, message", [
    (SMALL.replace("steps = 3\n", "") + "[model]\nhidden_units = 4\n[[train.phases]]\n"
     "objective = \"reward_model\"\nsteps = 3\nn = 10\n",
     "train.phases.0.n = 10 cannot be given with model.hidden_units"),
    (SMALL.replace("[[problem.behaviors]]", "[problem.principles]\ncosine = 0.5\n"
                   "[[problem.behaviors]]") + "[model]\nfeatures = 2\n",
     "model.features = 2 must equal dim = 3 with principles"),
])
def test_capacity_keys_refuse_what_they_cannot_honour(text, message, tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()
