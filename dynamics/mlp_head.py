"""A one-hidden-layer MLP head on the frozen features: issue 13's second capacity axis.

With ``model.hidden_units = H`` the head is ``f(g) = U·relu(A g + a)`` ``∈ R^V`` in place
of a matrix row space:

* objectives whose ``block`` is ``"reward"`` (``reward_model``, ``binary``) read the
  rewards ``r(g, ·) = f(g)``; the policy stays the reference ``W0``;
* policy objectives on pairs or demonstrations (the DPO family, ``sft``) read the
  logits ``W0 g + f(g)``, so the start is the reference;
* objectives on prompts or context (``rlhf``, ``distill``) are refused.

Start: ``A ~ N(0, 1/d)`` entrywise, drawn per seed in float64 from
``numpy.random.default_rng([head_seed, seed, MLP_TAG])`` (``head_seed`` is
``model.init_seed``; every configuration of a seed shares its ``A``), ``a = 0``,
``U = 0``. ``A``, ``a`` and ``U`` are trained together by gradient descent at ``lr`` on
the mean loss over the batch (full batch, or the minibatches of the linear engines'
:class:`~dynamics.simulate._BatchStream`), every seed × configuration at once, the
gradient by torch autograd of the registry's per-example loss: ``obj.loss(h)`` of the
margins for the margin views (``h = s(f_Yes − f_No)`` for the ``difference`` view;
``h_Yes = s f_Yes``, ``h_No = −s f_No`` summed for ``rows``) and ``obj.logit_loss(W0 g +
f, chosen)`` for the ``all`` view. There is no population flow for this head.

Metrics have the linear head's names and definitions (:func:`dynamics.metrics.pair_metrics`):
``accuracy`` ranks with the trained policy (the reference for a reward head),
``reward_accuracy`` with the implicit reward ``β log π/π0`` (a policy) or ``f`` (a
reward head); ``objective/kl`` for policy objectives; ``weight_change`` is the
Euclidean norm of the head's parameter change ``(A − A0, a, U)``, not ``‖W − W0‖_F``.

Letters: ``S`` seeds, ``P`` configurations, ``H`` hidden units, ``V`` answers, ``n``
samples, ``d`` features, ``K`` behaviors, ``B`` batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dynamics.metrics import HELDOUT_METRICS, pair_metrics
from dynamics.model import NO, YES
from synthetic.sampling import PreferenceSample
from synthetic.validation import ParameterError, check_integer

__all__ = ["MLP_TAG", "mlp_init", "mlp_forward", "mlp_losses", "simulate_mlp"]

MLP_TAG = 0x6d6c70  # "mlp": the head's stream, apart from the samples' and the reference's


def mlp_init(seed: int, head_seed: int, hidden: int, dim: int) -> np.ndarray:
    """The starting ``A`` ``(H, d)`` of one seed: entries ``N(0, 1/d)``, float64."""
    rng = np.random.default_rng([int(head_seed), int(seed), MLP_TAG])
    return rng.standard_normal((hidden, dim)) / np.sqrt(dim)


def mlp_forward(x: torch.Tensor, A: torch.Tensor, a: torch.Tensor,
                U: torch.Tensor) -> torch.Tensor:
    """``f(g) = U relu(A g + a)``: x (S, n, d), A (S, P, H, d), a (S, P, H, 1), U (S, P, V, H)
    → (S, P, V, n)."""
    S, P, H, _ = A.shape
    pre = torch.bmm(A.reshape(S, P * H, -1), x.transpose(1, 2))  # (S, P·H, n): one GEMM a seed
    hidden = torch.relu(pre.view(S, P, H, -1) + a)  # (S, P, H, n)
    return torch.matmul(U, hidden)


def _chosen_index(s: torch.Tensor) -> torch.Tensor:
    """The chosen answer ``y_w`` (Yes if ``s > 0``) as ``(S, 1, 1, n)`` indices."""
    return torch.where(s > 0, YES, NO)[:, None, None]


def mlp_losses(obj, hyper: dict, f: torch.Tensor, logits0: torch.Tensor, s: torch.Tensor,
               beta: torch.Tensor) -> torch.Tensor:
    """Per-example loss ``(S, P, n)`` of the head's output ``f`` ``(S, P, V, n)``;
    ``logits0`` the reference logits ``(S, 1, V, n)``, ``s`` the signs ``(S, n)``,
    ``beta`` ``(1, P, 1)``."""
    if obj.view == "all":
        return obj.logit_loss(logits0 + f, _chosen_index(s))
    signed = s[:, None]  # (S, 1, n)
    if obj.view == "difference":  # h = s(f_Yes − f_No): the reference cancels in the margin
        return obj.loss(signed * (f[:, :, YES] - f[:, :, NO]), beta, **hyper)
    h = torch.stack([signed * f[:, :, YES], -signed * f[:, :, NO]], 2)  # rows (σ = +1, −1)
    return obj.loss(h, beta[..., None], **hyper).sum(2)


def _per_sample_metrics(obj, hyper, f, logits0, s, true_s, beta) -> dict[str, torch.Tensor]:
    """Every metric per example ``(S, P, n)``, the linear head's definitions."""
    loss = mlp_losses(obj, hyper, f, logits0, s, beta)
    positive = (s > 0)[:, None]  # (S, 1, n)
    pick = lambda rows, y, other: torch.where(positive, rows[:, :, y], rows[:, :, other])  # noqa
    agree = (s * true_s)[:, None]
    if obj.block == "reward":  # the policy is the reference; the rewards are f
        logp0 = torch.log_softmax(logits0, dim=-2)
        return pair_metrics(loss=loss, chosen_logps=pick(logp0, YES, NO),
                            rejected_logps=pick(logp0, NO, YES),
                            chosen_rewards=pick(f, YES, NO), rejected_rewards=pick(f, NO, YES),
                            agree=agree)
    logits = logits0 + f
    logp = torch.log_softmax(logits, dim=-2)
    ratio = logp - torch.log_softmax(logits0, dim=-2)  # log π/π0 (S, P, V, n)
    out = pair_metrics(loss=loss, chosen_logps=pick(logp, YES, NO),
                       rejected_logps=pick(logp, NO, YES),
                       chosen_rewards=beta * pick(ratio, YES, NO),
                       rejected_rewards=beta * pick(ratio, NO, YES), agree=agree)
    out["objective/kl"] = (logp.exp() * ratio).sum(-2)
    return out


class _Head:
    """The parameters of every run and what a sample's evaluation needs."""

    def __init__(self, A0, P, vocab, dtype, device):
        S, H, d = A0.shape
        self.A0 = A0[:, None].expand(S, P, H, d).clone()
        self.A = self.A0.clone().requires_grad_(True)
        self.a = torch.zeros(S, P, H, 1, dtype=dtype, device=device, requires_grad=True)
        self.U = torch.zeros(S, P, vocab, H, dtype=dtype, device=device, requires_grad=True)

    @property
    def params(self):
        return (self.A, self.a, self.U)

    def change(self) -> torch.Tensor:
        """``‖(A − A0, a, U)‖`` per run ``(S, P)``."""
        with torch.no_grad():
            sq = ((self.A - self.A0) ** 2).sum((-2, -1)) + (self.a ** 2).sum((-2, -1))
            return (sq + (self.U ** 2).sum((-2, -1))).sqrt()


def _behavior_means(values: torch.Tensor, behavior: torch.Tensor, counts) -> torch.Tensor:
    """Per-behavior means ``(S, P, K)`` of ``(S, P, n)``."""
    sums = torch.zeros(*values.shape[:2], len(counts), dtype=values.dtype, device=values.device)
    sums.index_add_(2, behavior, values)
    return sums / counts


def simulate_mlp(data: PreferenceSample, *, seeds: Sequence[int], obj, hyper: dict,
                 beta: np.ndarray, lr: np.ndarray, steps: int, w0: torch.Tensor,
                 hidden_units: int, head_seed: int = 0, batch_size: int | None = None,
                 eval_every: int = 1, progress: Callable[[int], None] | None = None,
                 train_behaviors: Sequence[int] | None = None,
                 heldout: PreferenceSample | None = None, refused: dict | None = None):
    """Train the MLP head of every seed × configuration (called by
    :func:`dynamics.simulate.simulate_sample` with ``hidden_units``, its arguments
    already checked); returns a :class:`~dynamics.simulate.SimulationResult` whose
    ``final`` is None and ``head`` holds the final ``A``, ``a``, ``U``."""
    from dynamics.simulate import SimulationResult, _BatchStream

    if isinstance(hidden_units, bool) or not isinstance(hidden_units, (int, np.integer)) \
            or hidden_units < 1:
        raise ParameterError("hidden_units", hidden_units, "must be an integer >= 1: an MLP "
                             "head needs at least one hidden unit")
    head_seed = check_integer("head_seed", head_seed, ge=0)
    if obj.data in ("prompts", "context"):
        raise ParameterError("objective", obj.name, f"cannot train an MLP head (hidden_units): "
                             f"its loss reads {obj.data}; use a pairs, labels or "
                             "demonstrations objective")
    for key, value in (refused or {}).items():
        if value is not None:
            raise ParameterError(key, "given", "cannot be combined with an MLP head "
                                 "(hidden_units)")
    x, s, true_s = data.features, data.signs, data.true_signs  # (S, n, d), (S, n) ×2
    num_seeds, n, dim = x.shape
    dtype, device = x.dtype, x.device
    vocab = w0.shape[1]
    num_configs = len(beta)
    beta_t = torch.as_tensor(beta, dtype=dtype, device=device).view(1, -1, 1)  # (1, P, 1)
    lr_t = torch.as_tensor(lr, dtype=dtype, device=device).view(1, -1, 1, 1)
    logits = lambda feats: torch.matmul(w0, feats.transpose(1, 2))[:, None]  # noqa: E731
    A0 = torch.as_tensor(np.stack([mlp_init(seed, head_seed, int(hidden_units), dim)
                                   for seed in seeds]), dtype=dtype, device=device)
    head = _Head(A0, num_configs, vocab, dtype, device)

    keep = torch.arange(n, device=device)
    if train_behaviors is not None:
        wanted = torch.zeros(len(data.names), dtype=torch.bool, device=device)
        for i in train_behaviors:
            wanted[check_integer("train_behaviors", i, ge=0, le=len(data.names) - 1)] = True
        keep = torch.nonzero(wanted[data.behavior]).squeeze(1)
    if batch_size is not None and batch_size > len(keep):
        raise ParameterError("batch_size", batch_size,
                             f"must be <= the {len(keep)} statements trained on")
    train_x, train_s = x[:, keep], s[:, keep]
    train_logits0 = logits(train_x)  # (S, 1, V, m)
    batches = _BatchStream(seeds, len(keep), batch_size, device) if batch_size else None

    samples = {"": (x, s, true_s, logits(x), data.behavior)}
    if heldout is not None:
        hx = heldout.features
        if hx.shape[0] != num_seeds or hx.shape[2] != dim:
            raise ParameterError("heldout", tuple(hx.shape),
                                 f"must have shape ({num_seeds}, m, {dim})")
        samples["heldout/"] = (hx, heldout.signs, heldout.true_signs, logits(hx),
                               heldout.behavior)
    counts = {key: torch.bincount(b, minlength=len(data.names)).to(dtype)
              for key, (*_, b) in samples.items()}

    def evaluate() -> dict[str, torch.Tensor]:
        out = {}
        with torch.no_grad():
            for prefix, (xe, se, te, l0, behavior) in samples.items():
                f = mlp_forward(xe, *head.params)
                per = _per_sample_metrics(obj, hyper, f, l0, se, te, beta_t)
                for name, value in per.items():
                    if prefix and name not in HELDOUT_METRICS:
                        continue
                    out[prefix + name] = _behavior_means(value, behavior, counts[prefix])
        return out

    record = np.unique(np.r_[np.arange(0, steps + 1, eval_every), steps])
    wanted_steps = set(record.tolist())
    store: dict[str, list] = {}
    norms = []
    for k in range(steps + 1):
        if k in wanted_steps:
            for name, value in evaluate().items():
                store.setdefault(name, []).append(value)
            norms.append(head.change())
        if k == steps:
            break
        if batches is None:
            xb, sb, l0 = train_x, train_s, train_logits0
        else:
            idx = batches.next()  # (S, B)
            rows = torch.arange(num_seeds, device=device)[:, None]
            xb, sb = train_x[rows, idx], train_s[rows, idx]
            l0 = train_logits0.gather(-1, idx[:, None, None].expand(-1, 1, vocab, -1))
        f = mlp_forward(xb, *head.params)
        # the runs are independent: the gradient of the sum of their mean losses is each
        # run's own gradient
        total = mlp_losses(obj, hyper, f, l0, sb, beta_t).mean(-1).sum()
        grads = torch.autograd.grad(total, head.params)
        with torch.no_grad():
            for param, grad in zip(head.params, grads):
                param.sub_(lr_t * grad)
        if progress is not None:
            progress(k + 1)

    per_behavior = {name: torch.stack(v).cpu().double().numpy() for name, v in store.items()}
    return SimulationResult(
        steps=record, seeds=list(seeds), beta=np.asarray(beta), lr=np.asarray(lr),
        names=tuple(data.names), per_behavior=per_behavior,
        weight_change=torch.stack(norms).cpu().double().numpy(), final=None,
        head={name: p.detach() for name, p in zip(("A", "a", "U"), head.params)})
