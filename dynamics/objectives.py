"""Objectives of the last-layer model as pure, unreduced functions, and their registry.

The model (THEORY §1) has two ``V × d`` matrices an objective may train: the
policy ``W = W0 + D`` (``π(y|g) = softmax(W g)_y``) and a reward head ``Φ``
(``r(g, y) = φ_yᵀ g``, from zero). An :class:`Objective` declares

* ``block``: which matrix it trains (``"policy"`` or ``"reward"``);
* ``view``: which rows of it the loss reads, hence the parameter the engines carry,

  ==============  ===============================  =================================
  view            parameter θ, shape ``(R, d)``     what a sample with sign ``s`` reads
  ==============  ===============================  =================================
  ``difference``  ``θ = B_Yes − B_No − (same at     the margin ``h = s θᵀg`` (R = 1);
                  the start)``, R = 1               a step moves the two rows equal and
                                                    opposite, so ``θ`` moves twice as
                                                    fast as either (gain 2)
  ``rows``        ``θ_r`` = rows Yes and No, R = 2  margins ``h_r = σ_r s θ_rᵀg`` with
                                                    row signs ``σ = (+1, −1)`` (gain 1)
  ``all``         ``θ = D``, all V rows             the logits ``(W0 + D) g`` (gain 1)
  ==============  ===============================  =================================

* ``data``: what it consumes: ``pairs`` (chosen and rejected answer), ``labels``
  (each answer alone with a good/bad label), ``demonstrations`` (the chosen
  answer only), ``prompts`` (the policy answers; a frozen reward head scores
  it: RL) or ``context`` (prompts with a teacher: the starting policy seeing the
  embedding shifted by a prompt's offset ``c``; context distillation);
* its own hyperparameters (:class:`Hyper`: default, rule, doc), beside the shared
  ``beta`` when ``uses_beta``;
* the per-sample loss and its derivatives: for the margin views ``ℓ(h)``, ``ℓ'(h)``
  and, where smooth, ``ℓ''(h)`` (the population flow's Stein term; an objective
  with a kink gives its population moments in closed form instead); for the
  ``all`` view the loss of the logits and its gradient.

The batched simulation and the population flow read nothing else, so a new
objective is one registry entry; the tests iterate over :data:`OBJECTIVES`.
Every function takes NumPy arrays or torch tensors (``beta`` may be a tensor
broadcasting against ``h``: one value per run).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special

from synthetic.validation import (ParameterError, check_choice, check_integer, check_number,
                                  did_you_mean)

__all__ = ["Hyper", "Objective", "OBJECTIVES", "get_objective", "resolve_objective",
           "dpo_loss", "dpo_margin_loss", "cdpo_margin_loss", "robust_dpo_margin_loss",
           "ipo_margin_loss", "hinge_margin_loss", "reward_model_loss", "binary_loss",
           "sft_loss", "rlhf_loss", "distill_loss", "kl_to_reference", "reinforce_loss",
           "ppo_clip_loss", "adapt_kl",
           "VIEWS", "GAIN", "objectives_reference"]

VIEWS = ("difference", "rows", "all")
GAIN = {"difference": 2.0, "rows": 1.0, "all": 1.0}
"""How fast the carried parameter moves per unit of gradient on the matrix rows."""


# ============================================================================ pure losses


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """DPO loss per example (Rafailov et al. 2023, eq. 7), unreduced.

    .. math::
        ℓ = −\\log σ\\big(β\\,[(\\log π(y_w) − \\log π_0(y_w))
                           − (\\log π(y_l) − \\log π_0(y_l))]\\big)

    All four arguments have the same shape ``(B,)`` (or any broadcastable
    shape); the result has that shape. ``beta > 0``.
    """
    check_number("beta", beta, gt=0)
    h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)
    return dpo_margin_loss(h, beta=beta)


def dpo_margin_loss(h, *, beta):
    """``−log σ(βh)`` of the margin ``h``, any shape.

    Computed as ``softplus(−βh)`` through ``logsigmoid``, i.e. ``−log σ(x) =
    log(1 + e^{−x})`` evaluated stably: finite for large ``|x|`` where
    ``log(sigmoid(x))`` underflows to ``−inf``, and exact there (``F.softplus``
    would switch to ``x`` past its threshold and drop up to ``e^{−20}``).
    """
    return _softplus(-beta * h)


def cdpo_margin_loss(h, *, beta, epsilon):
    """Conservative DPO (Mitchell 2023): labels trusted with probability ``1 − ε``,

    ``ℓ = (1−ε)·(−log σ(βh)) + ε·(−log σ(−βh))``; ``ε = 0`` is DPO."""
    return (1 - epsilon) * _softplus(-beta * h) + epsilon * _softplus(beta * h)


def robust_dpo_margin_loss(h, *, beta, epsilon):
    """Robust DPO (Chowdhury et al. 2024, eq. 7): the unbiased loss under labels
    flipped with probability ``ε < ½``,

    ``ℓ = [(1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))] / (1 − 2ε)``;

    its expectation over the flip of an observed label equals DPO's loss on the
    clean label (so it can be negative)."""
    return ((1 - epsilon) * _softplus(-beta * h) - epsilon * _softplus(beta * h)) / (
        1 - 2 * epsilon)


def ipo_margin_loss(h, *, beta):
    """IPO (Azar et al. 2023, eq. 17): ``(h − 1/(2β))²``, a regression of the
    margin onto ``τ = 1/(2β)``."""
    return (h - 0.5 / beta) ** 2


def hinge_margin_loss(h, *, beta):
    """SLiC's hinge (Zhao et al. 2023, eq. 3 with margin 1): ``max(0, 1 − βh)``."""
    return _relu(1 - beta * h)


def reward_model_loss(chosen_rewards, rejected_rewards):
    """Bradley–Terry reward-model loss (InstructGPT eq. 1; HHH's ranked preference
    model): ``−log σ(r(x, y_w) − r(x, y_l))``, unreduced."""
    return _softplus(rejected_rewards - chosen_rewards)


def binary_loss(chosen_rewards, rejected_rewards):
    """HHH's binary discrimination (Askell et al. 2021): each answer scored alone,
    ``−log σ(r(x, y_w)) − log σ(−r(x, y_l))``, unreduced."""
    return _softplus(-chosen_rewards) + _softplus(rejected_rewards)


def sft_loss(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Imitation of the chosen answer: ``−log softmax(logits)_{y_w}``.

    logits (..., V, n) · chosen (n,) integer answers → loss (..., n).
    """
    logp = torch.log_softmax(logits, dim=-2)
    index = chosen.expand(*logits.shape[:-2], 1, chosen.shape[-1])
    return -logp.gather(-2, index).squeeze(-2)


def rlhf_loss(logits: torch.Tensor, chosen=None, *, reference: torch.Tensor,
              rewards: torch.Tensor, beta) -> torch.Tensor:
    """Minus the KL-regularised return of each prompt (InstructGPT's RL objective
    for one-token answers, summed over the answers exactly):

    ``ℓ = −(Σ_y π(y) r(y) − β KL(π ‖ π0)) = −Σ_y π(y) [r(y) − β log(π(y)/π0(y))]``.

    logits, reference (the reference policy's logits) and rewards (``r(g, y) =
    φ_yᵀg``) are ``(..., V, n)``; ``beta`` broadcasts; ``chosen`` (a preference
    label) is not read: RL scores the policy's own answers. → ``(..., n)``.
    """
    logp = torch.log_softmax(logits, dim=-2)
    gain = rewards - beta * (logp - torch.log_softmax(reference, dim=-2))
    return -(logp.exp() * gain).sum(-2)


def distill_loss(logits: torch.Tensor, chosen=None, *, teacher: torch.Tensor) -> torch.Tensor:
    """Context distillation (Askell et al. 2021): ``KL(π_T ‖ π) = Σ_y π_T(y)(log π_T(y) −
    log π(y))`` per prompt, with ``π_T = softmax(teacher)`` the prompted policy's
    answers; logits and teacher ``(..., V, n)`` → ``(..., n)``. ``chosen`` is not read."""
    log_t = torch.log_softmax(teacher, dim=-2)
    return (log_t.exp() * (log_t - torch.log_softmax(logits, dim=-2))).sum(-2)


def _distill_grad(logits, chosen=None, *, teacher):
    """``∂KL(π_T ‖ π)/∂logits = π − π_T``."""
    return torch.softmax(logits, dim=-2) - torch.softmax(teacher, dim=-2)


def kl_to_reference(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``KL(π ‖ π0) = Σ_y π(y) log(π(y)/π0(y))`` per prompt: ``(..., V, n)`` → ``(..., n)``."""
    logp = torch.log_softmax(logits, dim=-2)
    return (logp.exp() * (logp - torch.log_softmax(reference, dim=-2))).sum(-2)


def reinforce_loss(logp: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE (Williams 1992) per sampled answer: ``−A · log π(y)``, with the
    advantage ``A`` held constant (no gradient), unreduced."""
    return -advantages * logp


def ppo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                  clip: float) -> torch.Tensor:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7) per sampled answer, to
    minimise: ``max(−A ρ, −A clip(ρ, 1−ε, 1+ε))``, ``ρ = π(y)/π_old(y)``, unreduced."""
    ratio = torch.exp(logp - logp_old)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))


def adapt_kl(kl, target: float, horizon: float):
    """The adaptive KL controller's factor (Ziegler et al. 2019): ``1 + clip(KL/target −
    1, −0.2, 0.2)/horizon`` per rollout (TRL's ``n_steps/horizon`` with ``horizon``
    counted in rollouts). Works on tensors and floats."""
    error = kl / target - 1
    error = error.clamp(-0.2, 0.2) if isinstance(error, torch.Tensor) else min(max(error, -0.2),
                                                                              0.2)
    return 1 + error / horizon


# ============================================================================ helpers


def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def _sigmoid(x):
    """σ for torch tensors and NumPy arrays alike (the population flow runs in
    NumPy, the simulation in torch; each derivative is written once)."""
    return torch.sigmoid(x) if _is_torch(x) else special.expit(x)


def _softplus(x):
    """``log(1 + e^x)``, stable for any ``x`` (torch: ``−logsigmoid(−x)``)."""
    return -F.logsigmoid(-x) if _is_torch(x) else np.logaddexp(0.0, x)


def _relu(x):
    return torch.clamp_min(x, 0) if _is_torch(x) else np.maximum(x, 0.0)


def _step_below(x, at):
    """``1[x < at]`` in the floating dtype of ``x``."""
    return (x < at).to(x.dtype) if _is_torch(x) else (x < at).astype(np.float64)


# ============================================================================ registry types


@dataclass(frozen=True)
class Hyper:
    """An objective's own hyperparameter: default, rule (bounds or choices as data), doc.

    ``integer``: a whole number; ``choices``: one of these strings; ``only``: the
    key applies only when another hyperparameter has one of the given values (e.g.
    ``{"estimator": ("ppo",)}``), and giving it otherwise is an error."""

    default: float | str
    doc: str
    bounds: Mapping[str, float] = field(default_factory=dict)  # gt / ge / lt / le
    choices: tuple[str, ...] | None = None
    integer: bool = False
    only: Mapping[str, tuple[str, ...]] | None = None

    def check(self, name: str, value):
        if self.choices is not None:
            return check_choice(name, value, self.choices)
        if self.integer:
            return check_integer(name, value, **self.bounds)
        return check_number(name, value, **self.bounds)

    def rule(self) -> str:
        if self.choices is not None:
            return "one of " + " / ".join(self.choices)
        words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        kind = "integer " if self.integer else ""
        if not self.bounds:
            return "an integer" if self.integer else "a number"
        return kind + " and ".join(f"{words[k]} {v}" for k, v in self.bounds.items())


@dataclass(frozen=True)
class Objective:
    """One objective of the last-layer model; see the module docstring.

    Margin views (``difference``, ``rows``): ``loss``, ``grad`` and ``hess`` are
    ``ℓ(h, beta, **hyper)``, ``ℓ'`` and ``ℓ''`` elementwise (``hess`` is None
    where ``ℓ`` has a kink; ``moments`` then gives the population moments in
    closed form). The optional *logit form* ``ℓ'(h) = outer(β)·inner_(inner_scale(β)·h)``
    (``inner_`` in place, taking the hyperparameters) lets the simulation make a
    step in two elementwise passes.

    ``all`` view: ``logit_loss(logits, chosen)`` and ``logit_grad(logits,
    chosen)`` of the ``(…, V, n)`` logits; an objective on ``prompts`` also takes
    the keywords ``reference`` (the reference logits), ``rewards`` (the reward
    head's ``r(g, y)``) and ``beta``, all broadcasting against the logits.
    """

    name: str
    formula: str
    source: str
    block: str  # "policy" | "reward"
    view: str  # one of VIEWS
    data: str  # "pairs" | "labels" | "demonstrations"
    uses_beta: bool = True
    hyper: Mapping[str, Hyper] = field(default_factory=dict)
    loss: Callable | None = None
    grad: Callable | None = None
    hess: Callable | None = None
    moments: Callable | None = None  # (mean, sd, beta, family, **hyper) -> (Eℓ, Eℓ', E[wℓ''])
    kinks: Callable | None = None  # (beta, **hyper) -> margins where ℓ' jumps
    inner_scale: Callable | None = None
    inner_: Callable | None = None
    outer: Callable | None = None
    row_signs: tuple[float, ...] = (1.0,)
    logit_loss: Callable | None = None
    logit_grad: Callable | None = None
    both: Callable | None = None  # (h, beta, **hyper) -> (ℓ', ℓ'') with shared work

    @property
    def rows(self) -> int | None:
        """``R`` for the margin views; ``None`` (= V) for the ``all`` view."""
        return None if self.view == "all" else len(self.row_signs)

    @property
    def gain(self) -> float:
        return GAIN[self.view]

    def derivatives(self, h, beta, **hyper):
        """``(ℓ'(h), ℓ''(h))`` of a smooth margin objective (sharing the work where
        ``both`` says how: the population flow's step evaluates them at every node)."""
        if self.both is not None:
            return self.both(h, beta, **hyper)
        return self.grad(h, beta, **hyper), self.hess(h, beta, **hyper)

    def defaults(self) -> dict[str, float | str]:
        """The default hyperparameters (those that apply with the defaults)."""
        return self.check_hyper({})

    def check_hyper(self, hyper: Mapping | None, *, path: str = "objective") -> dict[str, float]:
        """Hyperparameters with defaults filled in, each checked by its rule; an
        unknown key is an error naming the closest valid one."""
        hyper = dict(hyper or {})
        out = {}
        for key, value in hyper.items():
            if key not in self.hyper:
                valid = list(self.hyper) or ["(none)"]
                raise ParameterError(f"{path}.{key}", value,
                                     f"is not a hyperparameter of {self.name!r}; its keys: "
                                     f"{', '.join(valid)}{did_you_mean(key, self.hyper)}")
            out[key] = self.hyper[key].check(f"{path}.{key}", value)
        for key, spec in self.hyper.items():
            out.setdefault(key, spec.default)
        # a key that does not apply (``only``) is an error when given, and is left out
        # when defaulted: the resolved table names exactly what the run uses
        for key in list(out):
            for other, values in (self.hyper[key].only or {}).items():
                if out.get(other) in values:
                    continue
                if key in hyper:
                    raise ParameterError(f"{path}.{key}", hyper[key],
                                         f"applies only with {other} = "
                                         f"{' or '.join(map(repr, values))} "
                                         f"(here {other} = {out.get(other)!r})")
                out.pop(key)
        return out


# ============================================================================ derivatives

# DPO family: with z = βh and q = σ(−z), ℓ' = −β(q + c) for a constant c, and
# ℓ'' = β² σ(z)σ(−z) for all three (the constant shifts of ℓ' have no slope).


def _dpo_grad(h, beta):
    return -beta * _sigmoid(-beta * h)  # dℓ/dh = −β σ(−βh)


def _logistic_hess(h, beta):
    z = beta * h
    return beta**2 * _sigmoid(z) * _sigmoid(-z)  # d²ℓ/dh² = β² σ(βh) σ(−βh)


def _cdpo_grad(h, beta, epsilon):
    # (1−ε)(−βσ(−z)) + ε(βσ(z)) = −β(σ(−z) − ε)
    return -beta * (_sigmoid(-beta * h) - epsilon)


def _robust_offset(epsilon):
    return epsilon / (1 - 2 * epsilon)


def _robust_grad(h, beta, epsilon):
    # [(1−ε)(−βσ(−z)) − ε(βσ(z))]/(1−2ε) = −β(σ(−z) + ε/(1−2ε))
    return -beta * (_sigmoid(-beta * h) + _robust_offset(epsilon))


def _logistic_both(offset, scale=True):
    """``(ℓ', ℓ'')`` of the logistic family from one sigmoid: with ``q = σ(−βh)``,
    ``ℓ' = −β(q + c)`` and ``ℓ'' = β² q (1 − q)`` (``β = 1`` for a reward head)."""
    def both(h, beta, **hyper):
        b = beta if scale else 1.0
        q = _sigmoid(-b * h)
        c = offset(**hyper)
        return -b * (q + c) if c else -b * q, (b * b) * q * (1 - q)
    return both


def _ipo_grad(h, beta):
    return 2 * (h - 0.5 / beta)


def _ipo_hess(h, beta):
    return 2 + 0 * h  # a constant, broadcast to h's shape and type


def _hinge_grad(h, beta):
    # ℓ' = −β·1[βh < 1]; at the kink the left derivative (a subgradient)
    return -beta * _step_below(beta * h, 1.0)


def _hinge_moments(mean, sd, beta, family):
    """Population moments of the hinge for ``h = mean + sd·Y`` in closed form:

    with ``k = (1/β − mean)/sd``, ``E[ℓ] = β·sd·E[(k − Y)₊]``, ``E[ℓ'] = −β·P(Y < k)``
    and, since ``ℓ'' = β·δ(h − 1/β)``, ``E[w ℓ''] = β·f_Y(k)·E[w | Y = k]/sd``: the
    kink enters exactly through the density at it. ``sd = 0``: a point mass at
    ``mean`` (the Stein term then multiplies ``ΣΔ = 0``).
    """
    mean, sd = np.asarray(mean, dtype=np.float64), np.asarray(sd, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    positive = sd > 0
    safe = np.where(positive, sd, 1.0)
    k = (1 / beta - mean) / safe
    loss = np.where(positive, beta * safe * family.partial_expectation(k),
                    np.maximum(0.0, 1 - beta * mean))
    first = np.where(positive, -beta * family.projection_cdf(k), -beta * (beta * mean < 1))
    second = np.where(positive, beta * family.projection_pdf(k) * family.stein_weight(k) / safe,
                      0.0)
    return loss, first, second


def _bt_loss(h, beta):
    return _softplus(-h)  # β = 1: the reward head has its own scale


def _bt_grad(h, beta):
    return -_sigmoid(-h)


def _bt_hess(h, beta):
    return _sigmoid(h) * _sigmoid(-h)


def _sft_grad(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``∂ℓ/∂logits = softmax(logits) − e_{y_w}``: (…, V, n) → (…, V, n)."""
    probs = torch.softmax(logits, dim=-2)
    index = chosen.expand(*logits.shape[:-2], 1, chosen.shape[-1])
    return probs.scatter_add(-2, index, torch.full_like(probs[..., :1, :], -1.0))


def _rlhf_grad(logits, chosen=None, *, reference, rewards, beta):
    """``∂ℓ/∂logits = −π ⊙ (A − Σ_y π(y) A(y))`` with ``A = r − β log(π/π0)``
    (the entropy's and the return's policy gradient; THEORY §3.1 for two answers)."""
    logp = torch.log_softmax(logits, dim=-2)
    p = logp.exp()
    gain = rewards - beta * (logp - torch.log_softmax(reference, dim=-2))
    return -p * (gain - (p * gain).sum(-2, keepdim=True))


def _sigmoid_shift_(shift):
    """In place ``x ↦ σ(x) + shift`` (the DPO family's logit form)."""
    def inner(x, **hyper):
        x.sigmoid_()
        c = shift(**hyper)
        return x.add_(c) if c else x
    return inner


_EPSILON = Hyper(0.0, "ε: probability that an observed preference is flipped", {"ge": 0, "lt": 0.5})

_SAMPLED = {"estimator": ("reinforce", "ppo")}
_PPO = {"estimator": ("ppo",)}
_RLHF_HYPER = {
    "estimator": Hyper("exact", "the policy gradient: summed over the answers (exact), or "
                       "from sampled answers (reinforce, ppo)",
                       choices=("exact", "reinforce", "ppo")),
    "baseline": Hyper("mean", "subtracted from the sampled return: none, the rollout's mean, "
                      "the return's expectation under the rollout's policy (exact over the "
                      "answers), or a linear value head trained alongside",
                      choices=("none", "mean", "expected", "value"), only=_SAMPLED),
    "kl_in": Hyper("reward", "where β·KL enters a sampled estimator: as the penalty "
                   "−β log(π/π0) of the sampled answer in its return (TRL's k1), or as the "
                   "exact per-prompt KL in the loss", choices=("reward", "loss"), only=_SAMPLED),
    "rollout_size": Hyper(0, "prompts per rollout, drawn anew from the sample every step "
                          "(0: every prompt)", {"ge": 0}, integer=True, only=_SAMPLED),
    "kl_target": Hyper(0.0, "adaptive KL control (Ziegler et al. 2019): the target KL the "
                       "coefficient (from β) is steered to after every rollout; 0 keeps β fixed",
                       {"ge": 0}, only=_SAMPLED),
    "kl_horizon": Hyper(50.0, "the controller's horizon, in rollouts (TRL's horizon / batch "
                        "size)", {"gt": 0}, only=_SAMPLED),
    "clip": Hyper(0.2, "ε of the clipped ratio", {"gt": 0}, only=_PPO),
    "ppo_epochs": Hyper(4, "passes over each rollout", {"ge": 1}, integer=True, only=_PPO),
    "num_minibatches": Hyper(1, "minibatches per pass (each one update)", {"ge": 1},
                             integer=True, only=_PPO),
    "vf_coef": Hyper(0.1, "the value head's step size as a multiple of lr", {"ge": 0},
                     only={"baseline": ("value",)}),
    "score": Hyper("reward", "what RL maximises: the reward (times each behavior's "
                   "reward_scale), or the advantage model's score: the reward minus its "
                   "expectation under the phase's starting policy, each behavior scaled to "
                   "unit variance", choices=("reward", "advantage")),
    "rehearsal": Hyper("none", "selective rehearsal: RL only on the prompts the phase's "
                       "starting policy does not answer well (expected reward < select_below), "
                       "imitation of the chosen answer on the others", choices=("none",
                                                                                "selective")),
    "select_below": Hyper(0.0, "the expected-reward threshold of selective rehearsal",
                          only={"rehearsal": ("selective",)}),
    "rehearsal_coef": Hyper(1.0, "weight of the rehearsed prompts' imitation loss", {"ge": 0},
                            only={"rehearsal": ("selective",)}),
    "ptx_coef": Hyper(0.0, "γ of PPO-ptx: + γ·E_pretrain[−log π(y|g)] in the loss, on the "
                      "[pretrain] distribution", {"ge": 0}),
}

OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective(
        "dpo", "−log σ(βh)", "Rafailov et al. 2023, eq. 7", "policy", "difference", "pairs",
        loss=lambda h, beta: dpo_margin_loss(h, beta=beta), grad=_dpo_grad,
        hess=_logistic_hess, both=_logistic_both(lambda: 0.0),
        inner_scale=lambda beta: -beta, inner_=_sigmoid_shift_(lambda: 0.0),
        outer=lambda beta: -beta,  # ℓ'(h) = −β · σ(−βh)
    ),
    Objective(
        "cdpo", "(1−ε)·(−log σ(βh)) + ε·(−log σ(−βh))", "Mitchell 2023 (conservative DPO)",
        "policy", "difference", "pairs", hyper={"epsilon": _EPSILON},
        loss=lambda h, beta, epsilon: cdpo_margin_loss(h, beta=beta, epsilon=epsilon),
        grad=_cdpo_grad, hess=lambda h, beta, epsilon: _logistic_hess(h, beta),
        both=_logistic_both(lambda epsilon: -epsilon),
        inner_scale=lambda beta: -beta, inner_=_sigmoid_shift_(lambda epsilon: -epsilon),
        outer=lambda beta: -beta,
    ),
    Objective(
        "robust_dpo", "[(1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))]/(1−2ε)",
        "Chowdhury et al. 2024, eq. 7 (robust DPO)", "policy", "difference", "pairs",
        hyper={"epsilon": _EPSILON},
        loss=lambda h, beta, epsilon: robust_dpo_margin_loss(h, beta=beta, epsilon=epsilon),
        grad=_robust_grad, hess=lambda h, beta, epsilon: _logistic_hess(h, beta),
        both=_logistic_both(_robust_offset),
        inner_scale=lambda beta: -beta, inner_=_sigmoid_shift_(_robust_offset),
        outer=lambda beta: -beta,
    ),
    Objective(
        "ipo", "(h − 1/(2β))²", "Azar et al. 2023, eq. 17", "policy", "difference", "pairs",
        loss=lambda h, beta: ipo_margin_loss(h, beta=beta), grad=_ipo_grad, hess=_ipo_hess,
        # ℓ'(h) = 2h − 1/β = (1/β)·(2βh − 1)
        inner_scale=lambda beta: 2 * beta, inner_=lambda x, **_: x.sub_(1.0),
        outer=lambda beta: 1 / beta,
    ),
    Objective(
        "hinge", "max(0, 1 − βh)", "Zhao et al. 2023 (SLiC), eq. 3", "policy", "difference",
        "pairs", loss=lambda h, beta: hinge_margin_loss(h, beta=beta), grad=_hinge_grad,
        moments=_hinge_moments, kinks=lambda beta: (1.0 / beta,),
        inner_scale=lambda beta: beta, inner_=lambda x, **_: x.lt_(1.0),  # ℓ' = −β·1[βh < 1]
        outer=lambda beta: -beta,
    ),
    Objective(
        "reward_model", "−log σ(r(y_w) − r(y_l)), r = φ_yᵀg",
        "Ouyang et al. 2022 (InstructGPT), eq. 1; Askell et al. 2021 (ranked preference)",
        "reward", "difference", "pairs", uses_beta=False,
        loss=_bt_loss, grad=_bt_grad, hess=_bt_hess, both=_logistic_both(lambda: 0.0, False),
        inner_scale=lambda beta: -1.0 + 0 * beta, inner_=_sigmoid_shift_(lambda: 0.0),
        outer=lambda beta: -1.0 + 0 * beta,
    ),
    Objective(
        "binary", "−log σ(r(y_w)) − log σ(−r(y_l)), r = φ_yᵀg",
        "Askell et al. 2021 (binary discrimination)", "reward", "rows", "labels",
        uses_beta=False, row_signs=(1.0, -1.0),
        # per row: h_Yes = s φ_Yesᵀg and h_No = −s φ_Noᵀg, each −log σ(h_r)
        loss=_bt_loss, grad=_bt_grad, hess=_bt_hess, both=_logistic_both(lambda: 0.0, False),
        inner_scale=lambda beta: -1.0 + 0 * beta, inner_=_sigmoid_shift_(lambda: 0.0),
        outer=lambda beta: -1.0 + 0 * beta,
    ),
    Objective(
        "rlhf", "−(Σ_y π(y) r(y) − β KL(π ‖ π0)), r = φ_yᵀg a frozen reward head",
        "Ouyang et al. 2022 (InstructGPT); Stiennon et al. 2020; Schulman et al. 2017 (PPO)",
        "policy", "all", "prompts", hyper=_RLHF_HYPER,
        logit_loss=rlhf_loss, logit_grad=_rlhf_grad,
    ),
    Objective(
        "distill", "KL(π_start(·|g + c) ‖ π(·|g)): the prompted starting policy's answers, "
        "without the prompt", "Askell et al. 2021 (context distillation); Sun et al. 2023 "
        "(principle engraving)", "policy", "all", "context", uses_beta=False,
        logit_loss=distill_loss, logit_grad=_distill_grad,
    ),
    Objective(
        "sft", "−log π(y_w) = −log softmax(W g)_{y_w}",
        "Askell et al. 2021 (imitation); Ouyang et al. 2022 (SFT)", "policy", "all",
        "demonstrations", uses_beta=False, logit_loss=sft_loss, logit_grad=_sft_grad,
    ),
)}


def get_objective(name: str, *, param: str = "objective") -> Objective:
    """The registered objective called ``name`` (unknown: ParameterError with the
    closest registered name)."""
    return OBJECTIVES[check_choice(param, name, OBJECTIVES)]


def resolve_objective(spec, *, path: str = "objective") -> tuple[Objective, dict[str, float]]:
    """An objective and its checked hyperparameters from a name or a table
    ``{"name": ..., **hyperparameters}`` (the config's ``train.objective``)."""
    if isinstance(spec, Objective):
        return spec, spec.defaults()
    if isinstance(spec, str):
        return get_objective(spec, param=path), get_objective(spec, param=path).defaults()
    if not isinstance(spec, Mapping):
        raise ParameterError(path, spec, "must be an objective name or a table "
                             "{ name = \"...\", <hyperparameters> }")
    if "name" not in spec:
        raise ParameterError(f"{path}.name", None, "is required: one of " + ", ".join(OBJECTIVES))
    obj = get_objective(spec["name"], param=f"{path}.name")
    return obj, obj.check_hyper({k: v for k, v in spec.items() if k != "name"}, path=path)


def show_default(value) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else f'"{value}"'


def objectives_reference() -> str:
    """The registry as a Markdown table (the README's, kept current by a test)."""
    lines = ["| name | per-example loss | trains | reads | data | keys | source |",
             "|---|---|---|---|---|---|---|"]
    reads = {"difference": "Yes − No difference", "rows": "Yes and No rows",
             "all": "every row"}
    for obj in OBJECTIVES.values():
        keys = ", ".join(f"`{k}` ({spec.rule()}, default {show_default(spec.default)})"
                         for k, spec in obj.hyper.items())
        uses = "" if obj.uses_beta else " (no β)"
        block = "policy W" if obj.block == "policy" else "reward head Φ"
        lines.append(f"| `{obj.name}` | {obj.formula}{uses} | {block} | {reads[obj.view]} | "
                     f"{obj.data} | {keys or '—'} | {obj.source} |")
    return "\n".join(lines)
