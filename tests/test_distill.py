"""Context distillation (``distill``; Askell et al. 2021): a prompt adds an offset ``c``
to the embedding, and the unprompted policy learns to match the prompted starting
policy by ``KL(π_start(·|g + c) ‖ π(·|g))``.

Limits against closed forms: a zero offset changes nothing; when every prompt shares a
constant feature (``g_0 ≡ 1``) the prompt's effect ``W0 c`` is a linear function of
``g`` and the flow drives the gap to zero at ``D* = (W0 c) e_0ᵀ``; otherwise the gap
stays positive, and the simulation agrees with the flow (the registry's tests). The
minimiser is unique up to a vector added to every row (softmax's invariance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import assert_close
from dynamics import population_descent, reference_weights, simulate
from dynamics.analytic import PopulationFlow
from synthetic import Behavior, ParameterError, Problem, population_mixture

W0 = reference_weights(3, vocab_size=3, seed=5)
C = np.array([0.0, 0.7, -0.4])


def problem(constant: bool) -> Problem:
    """Two behaviors in d = 3; with ``constant`` the first feature is 1 for every prompt."""
    first = 0.0 if constant else 0.5
    mean0 = 1.0 if constant else 0.2
    cov = np.diag([first, 0.6, 0.4])
    return Problem((Behavior("a", [mean0, 0.5, -0.2], [mean0, -0.3, 0.1], cov, cov),
                    Behavior("b", [mean0, 0.1, 0.6], [mean0, 0.2, -0.5], cov, cov)))


def test_a_zero_offset_changes_nothing():
    mixture = population_mixture(problem(False))
    flow = PopulationFlow(mixture, beta=1.0, reference=W0, objective="distill",
                          prompt_offset=np.zeros(3))
    assert float(flow.drift(np.zeros((3, 3))).abs().max()) < 1e-15
    sim = simulate(problem(False), n=200, seeds=[0, 1], beta=1.0, lr=0.5, steps=4, reference=W0,
                   objective="distill", prompt_offset=np.zeros(3), dtype=torch.float64,
                   keep_deltas=True)
    assert float(sim.deltas.abs().max()) == 0.0
    # the loss is zero up to rounding: the teacher's logits and the evaluator's come from
    # matrix products of different shapes, whose kernels may sum in different orders
    assert np.abs(sim.per_behavior["loss"]).max() <= 1e-15


def test_a_constant_feature_lets_the_student_absorb_the_prompt():
    """``g_0 ≡ 1``: ``W0(g + c) = (W0 + (W0 c) e_0ᵀ) g``, so the gap closes at
    ``D* = (W0 c) e_0ᵀ``, unique up to a vector added to every row (the rest of ``E[ggᵀ]``
    is full rank)."""
    mixture = population_mixture(problem(True))
    c = np.array([0.0, 0.7, -0.4])
    path = population_descent(mixture, beta=1.0, lr=2.0, steps=3000, reference=W0,
                              objective="distill", prompt_offset=c, eval_every=3000,
                              qmc_points=2**12)
    want = np.outer(W0 @ c, [1.0, 0.0, 0.0])
    end = path.deltas[-1]  # softmax ignores a vector added to every row: compare centred rows
    assert_close(end - end.mean(0), want - want.mean(0), 1e-6)
    assert np.all(path.per_behavior["loss"][-1] < 1e-10)
    assert np.all(path.per_behavior["loss"][0] > 1e-3)


def test_without_a_constant_feature_a_gap_remains():
    """The prompt's shift ``W0 c`` is constant in ``g``; a linear student can only
    approximate it through the features' means: the population gap plateaus above 0."""
    mixture = population_mixture(problem(False))
    path = population_descent(mixture, beta=1.0, lr=2.0, steps=2000, reference=W0,
                              objective="distill", prompt_offset=C * 3, eval_every=1000)
    start, mid, end = path.per_behavior["loss"].sum(1)
    assert end < start and abs(end - mid) < 1e-6 * (1 + mid)  # converged
    assert end > 1e-3  # and not to zero


@pytest.mark.parametrize("offset,rule", [(None, "is required by 'distill'"),
                                         ([1.0, 2.0], "must have shape (3,)")])
def test_bad_offsets(offset, rule):
    with pytest.raises(ParameterError, match=rule.replace("(", r"\(").replace(")", r"\)")):
        simulate(problem(False), n=20, seeds=[0], beta=1.0, lr=0.1, steps=1, reference=W0,
                 objective="distill", prompt_offset=offset)


@pytest.mark.cli
def test_distill_needs_a_prompt_offset_in_the_config(tmp_path, capsys):
    from dynamics.cli import main

    path = tmp_path / "c.toml"
    path.write_text('[problem]\ndim = 3\n[[problem.behaviors]]\nname = "a"\n'
                    'distinguishability = 1.0\n[train]\nobjective = "distill"\nn = 20\n'
                    'steps = 2\nseeds = 1\n')
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "train.objective = 'distill' needs model.prompt_offset" in capsys.readouterr().err
    assert main(["run", str(path), "--out", str(tmp_path / "o"), "--quiet",
                 "--set", "model.prompt_offset=[0.5, 0.0, -0.5]"]) == 0
    import pandas as pd

    frame = pd.read_parquet(tmp_path / "o" / "metrics.parquet")
    sim = frame[frame["source"] == "simulation"]
    assert (sim[sim["step"] == 0]["loss"] > 0).all()  # the prompt moves the answers
    assert (sim.groupby("step")["loss"].mean().diff().dropna() < 0).all()  # and the gap falls
