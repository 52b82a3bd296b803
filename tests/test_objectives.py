"""The DPO objective against naive references, its derivatives, invariances and limits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from conftest import CLOSED_FORM, FLOAT32, assert_close

from dynamics import OBJECTIVES, dpo_loss, dpo_margin_loss, get_objective
from strategies import bounded
from synthetic import ParameterError

BETAS = bounded(0.01, 10.0)
LOGPS = bounded(-40.0, 0.0)  # log-probabilities of single tokens
MARGINS = bounded(-30.0, 30.0)
SHIFTS = bounded(-20.0, 20.0)


def naive_dpo(h: float, beta: float) -> float:
    """``−log σ(βh)`` straight from the definition, in float64 via ``math``."""
    return -math.log(1.0 / (1.0 + math.exp(-beta * h)))


def trl_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, beta):
    """TRL ``DPOTrainer`` with ``loss_type="sigmoid"`` and no label smoothing."""
    logits = (chosen - ref_chosen) - (rejected - ref_rejected)
    return -F.logsigmoid(beta * logits)


def as64(*values):
    return [torch.tensor(v, dtype=torch.float64) for v in values]


# --------------------------------------------------------------------------- references


@settings(max_examples=200, deadline=None)
@given(LOGPS, LOGPS, LOGPS, LOGPS, BETAS)
def test_dpo_loss_matches_naive_and_trl(chosen, rejected, ref_chosen, ref_rejected, beta):
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    assume(abs(beta * h) < 600)  # naive math.exp would overflow; see the limit tests
    args = as64(chosen, rejected, ref_chosen, ref_rejected)
    loss = dpo_loss(*args, beta=beta)
    assert loss.dtype == torch.float64
    assert_close(loss, naive_dpo(h, beta), CLOSED_FORM)
    assert_close(loss, trl_sigmoid_loss(*args, beta), CLOSED_FORM)


@settings(max_examples=100, deadline=None)
@given(st.lists(MARGINS, min_size=1, max_size=8), BETAS)
def test_margin_loss_and_registry_match_naive(margins, beta):
    h = torch.tensor(margins, dtype=torch.float64)
    expected = torch.tensor([naive_dpo(x, beta) for x in margins], dtype=torch.float64)
    assert dpo_margin_loss(h, beta=beta).shape == h.shape  # unreduced
    assert_close(dpo_margin_loss(h, beta=beta), expected, CLOSED_FORM)
    assert_close(OBJECTIVES["dpo"].loss(h, beta), expected, CLOSED_FORM)


def test_float32_agrees_with_float64():
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 256, generator=gen, dtype=torch.float64) * 30
    loss64 = dpo_loss(*logps, beta=0.3)
    loss32 = dpo_loss(*logps.float(), beta=0.3)
    assert loss32.dtype == torch.float32
    # the margin of four float32 log-probs of size ~30 carries ~4·30·eps32 of rounding
    assert_close(loss32, loss64, FLOAT32 * 30)


# --------------------------------------------------------------------------- derivatives


@settings(max_examples=60, deadline=None)
@given(st.lists(MARGINS, min_size=1, max_size=8), BETAS)
def test_registry_derivatives_match_autograd(margins, beta):
    obj = OBJECTIVES["dpo"]
    h = torch.tensor(margins, dtype=torch.float64, requires_grad=True)
    (first,) = torch.autograd.grad(obj.loss(h, beta).sum(), h, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), h)
    assert_close(obj.grad(h.detach(), beta), first, CLOSED_FORM, scale=beta)
    assert_close(obj.hess(h.detach(), beta), second, CLOSED_FORM, scale=beta**2)
    # the registry's closed forms written out: ℓ' = −β σ(−βh), ℓ'' = β² σ(βh) σ(−βh)
    sig = [1 / (1 + math.exp(-beta * x)) for x in margins]
    assert_close(obj.grad(h.detach(), beta), [-beta * (1 - p) for p in sig], CLOSED_FORM,
                 scale=beta)
    assert_close(obj.hess(h.detach(), beta), [beta**2 * p * (1 - p) for p in sig], CLOSED_FORM,
                 scale=beta**2)


def test_loss_derivative_is_exact_just_beyond_twenty():
    beta = 3.0
    h = torch.tensor([-7.0], dtype=torch.float64, requires_grad=True)  # -βh = 21
    loss = dpo_margin_loss(h, beta=beta)
    (grad,) = torch.autograd.grad(loss.sum(), h)
    assert_close(loss, 21 + math.log1p(math.exp(-21)), CLOSED_FORM, scale=1.0)
    assert_close(grad, -beta / (1 + math.exp(-21)), CLOSED_FORM, scale=beta)


def test_registry_accepts_one_beta_per_run():
    obj = OBJECTIVES["dpo"]
    h = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]  # (n, 1)
    beta = torch.tensor([0.1, 1.0, 5.0], dtype=torch.float64)  # (P,)
    for fn, name in ((obj.loss, "loss"), (obj.grad, "grad"), (obj.hess, "hess")):
        batched = fn(h, beta)
        assert batched.shape == (7, 3)
        for p, b in enumerate(beta.tolist()):
            assert_close(batched[:, p], fn(h[:, 0], b), CLOSED_FORM, err_msg=name)


def test_gradcheck_wrt_all_four_logps():
    gen = torch.Generator().manual_seed(1)
    inputs = tuple((-5 * torch.rand(6, generator=gen, dtype=torch.float64)).requires_grad_()
                   for _ in range(4))
    assert torch.autograd.gradcheck(lambda *a: dpo_loss(*a, beta=0.7), inputs)
    assert torch.autograd.gradgradcheck(lambda *a: dpo_loss(*a, beta=0.7), inputs)


# --------------------------------------------------------------------------- invariances


@settings(max_examples=100, deadline=None)
@given(LOGPS, LOGPS, LOGPS, LOGPS, BETAS)
def test_swapping_chosen_and_rejected_negates_the_margin(c, r, rc, rr, beta):
    args = as64(c, r, rc, rr)
    h = (c - rc) - (r - rr)
    forward = dpo_loss(args[0], args[1], args[2], args[3], beta=beta)
    swapped = dpo_loss(args[1], args[0], args[3], args[2], beta=beta)
    # softplus(−x) − softplus(x) = −x
    assert_close(forward - swapped, -beta * h, CLOSED_FORM, scale=1 + abs(beta * h))


@settings(max_examples=100, deadline=None)
@given(LOGPS, LOGPS, LOGPS, LOGPS, BETAS, SHIFTS)
def test_shifts_that_cancel_in_the_margin_change_nothing(c, r, rc, rr, beta, shift):
    base = dpo_loss(*as64(c, r, rc, rr), beta=beta)
    scale = 1 + beta * (abs(c) + abs(r) + abs(rc) + abs(rr) + 4 * abs(shift))
    all_four = dpo_loss(*as64(c + shift, r + shift, rc + shift, rr + shift), beta=beta)
    chosen_pair = dpo_loss(*as64(c + shift, r, rc + shift, rr), beta=beta)
    rejected_pair = dpo_loss(*as64(c, r + shift, rc, rr + shift), beta=beta)
    for shifted in (all_four, chosen_pair, rejected_pair):
        assert_close(shifted, base, CLOSED_FORM, scale=scale)


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_margin_gives_log_two(dtype):
    zero = torch.zeros(3, dtype=dtype)
    loss = dpo_loss(zero - 2, zero - 5, zero - 2, zero - 5, beta=0.4)
    expected = torch.full((3,), math.log(2), dtype=dtype)
    assert torch.equal(loss, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.1, 1.0, 10.0])
def test_extreme_margins_stay_finite(dtype, beta):
    h = torch.tensor([1e4, -1e4, 1e6, -1e6], dtype=dtype, requires_grad=True)
    loss = dpo_margin_loss(h, beta=beta)
    (grad,) = torch.autograd.grad(loss.sum(), h)
    assert torch.all(torch.isfinite(loss)) and torch.all(torch.isfinite(grad))
    # βh ≫ 0: loss → 0 and ℓ' → 0; βh ≪ 0: loss → −βh and ℓ' → −β (e^{−βh} terms < 1e-400)
    assert loss[0].item() == 0.0 and loss[2].item() == 0.0
    tol = CLOSED_FORM if dtype == torch.float64 else FLOAT32
    negative = h.detach()[[1, 3]]
    assert_close(loss[[1, 3]], -beta * negative, tol, scale=beta * negative.abs())
    assert_close(grad, [0.0, -beta, 0.0, -beta], tol, scale=beta)


def test_loss_is_decreasing_and_positive():
    h = torch.linspace(-50, 50, 2001, dtype=torch.float64)
    loss = dpo_margin_loss(h, beta=1.3)
    assert torch.all(loss >= 0)
    assert torch.all(loss[1:] < loss[:-1])


# --------------------------------------------------------------------------- registry


def test_unknown_objective_suggests_the_closest():
    with pytest.raises(ParameterError) as info:
        get_objective("dpp")
    message = str(info.value)
    assert "did you mean 'dpo'" in message
    assert message.startswith("objective = 'dpp'") and "\n" not in message


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), float("inf")])
def test_nonpositive_or_nonfinite_beta_is_refused(beta):
    zero = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ParameterError, match="beta"):
        dpo_loss(zero, zero, zero, zero, beta=beta)
