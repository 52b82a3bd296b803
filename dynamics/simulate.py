"""Finite-sample training of the last-layer model, many runs in one tensor program.

A batch is ``S`` seeds (independent samples) × ``P`` configurations (``beta``
and ``lr`` per configuration, zipped). Runs of one seed share its sample, so
the per-step forward and backward are matrix products with one row per
configuration (``(S, P, d) @ (S, d, n)`` and back): no Python loop over runs.

Gradient descent on ``W`` with step ``lr`` is carried out on ``Δ = u − u0``
(THEORY §1, exact): for an objective ``ℓ(h)`` with ``h = s Δᵀg``,

    Δ ← Δ − 2·lr · mean_j[ ℓ'(h_j) s_j g_j ]        (over the batch),

full batch by default, or minibatch SGD: each seed draws its own permutation
per epoch from a :class:`torch.Generator` seeded by the seed, batches of
``batch_size`` in order, the incomplete last batch dropped.

Letters: ``S`` seeds, ``P`` configurations, ``n`` samples, ``d`` dimension,
``K`` behaviors, ``E`` recorded steps, ``B`` batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from dynamics.metrics import BEHAVIOR_METRICS, tidy_frame
from dynamics.model import NO, YES
from dynamics.objectives import get_objective
from synthetic.problem import Problem
from synthetic.sampling import PreferenceSample, sample_batch
from synthetic.validation import ParameterError, check_integer, check_number

__all__ = ["SimulationResult", "simulate", "simulate_sample"]


@dataclass
class SimulationResult:
    """Metrics of every run at the recorded steps.

    steps (E,) · per_behavior[metric] (E, S, P, K) · weight_change (E, S, P)
    final ``Δ`` (S, P, d); deltas (E, S, P, d) if kept.
    """

    steps: np.ndarray
    seeds: list[int]
    beta: np.ndarray
    lr: np.ndarray
    names: tuple[str, ...]
    per_behavior: dict[str, np.ndarray]
    weight_change: np.ndarray
    final: torch.Tensor
    deltas: torch.Tensor | None = None

    def frame(self) -> pd.DataFrame:
        return tidy_frame(source="simulation", steps=self.steps, lr=self.lr, beta=self.beta,
                          seeds=list(self.seeds), names=self.names,
                          per_behavior=self.per_behavior, weight_change=self.weight_change)


def _as_configs(beta, lr) -> tuple[np.ndarray, np.ndarray]:
    beta = np.atleast_1d(np.asarray(beta, dtype=np.float64))
    lr = np.atleast_1d(np.asarray(lr, dtype=np.float64))
    if beta.ndim != 1 or lr.ndim != 1:
        raise ParameterError("beta", beta.tolist(), "must be a number or a list of numbers")
    if len(beta) != len(lr) and 1 not in (len(beta), len(lr)):
        raise ParameterError("lr", lr.tolist(), f"must have 1 or {len(beta)} entries like beta")
    beta, lr = np.broadcast_arrays(beta, lr)
    for b in beta:
        check_number("beta", float(b), gt=0)
    for r in lr:
        check_number("lr", float(r), gt=0)
    return beta.copy(), lr.copy()


def simulate(
    problem: Problem,
    *,
    n: int,
    seeds: Sequence[int],
    beta,
    lr,
    steps: int,
    reference: np.ndarray,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **options,
) -> SimulationResult:
    """Draw one sample per seed from ``problem`` and train every run on it.

    ``beta`` and ``lr`` are numbers or equal-length lists (one configuration
    each); ``options`` are those of :func:`simulate_sample`.
    """
    data = sample_batch(problem, n, list(seeds), dtype=dtype, device=device)
    return simulate_sample(data, seeds=list(seeds), beta=beta, lr=lr, steps=steps,
                           reference=reference, **options)


def simulate_sample(
    data: PreferenceSample,
    *,
    seeds: Sequence[int],
    beta,
    lr,
    steps: int,
    reference: np.ndarray,
    objective: str = "dpo",
    batch_size: int | None = None,
    delta0: np.ndarray | None = None,
    eval_every: int = 1,
    keep_deltas: bool = False,
    progress: Callable[[int], None] | None = None,
) -> SimulationResult:
    """Train on a batched sample (``data.features`` of shape ``(S, n, d)``).

    ``reference`` is ``W0`` ``(V, d)``; ``delta0`` the starting ``Δ``: ``(d,)``
    for every run or ``(S, P, d)`` per run (e.g. a previous result's ``final``; default 0);
    metrics are recorded at steps ``0, eval_every, …, steps``;
    ``progress(k)`` is called after each step with the number of steps done.
    """
    x, s = data.features, data.signs  # (S, n, d), (S, n)
    if x.dim() != 3:
        raise ParameterError("data.features", tuple(x.shape), "must have shape (S, n, d)")
    num_seeds, n, dim = x.shape
    if len(seeds) != num_seeds:
        raise ParameterError("seeds", list(seeds), f"must have {num_seeds} entries, one per sample")
    steps = check_integer("steps", steps, ge=1)
    eval_every = check_integer("eval_every", eval_every, ge=1)
    if batch_size is not None:
        batch_size = check_integer("batch_size", batch_size, ge=1, le=n)
    obj = get_objective(objective)
    beta_np, lr_np = _as_configs(beta, lr)
    dtype, device = x.dtype, x.device
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)  # noqa: E731
    beta_t, lr_t = t(beta_np), t(lr_np)  # (P,)
    num_configs = len(beta_np)

    w0 = t(reference)
    if w0.shape[1] != dim:
        raise ParameterError("reference", tuple(w0.shape), f"must have {dim} columns")
    # Signed features s·g, once: the margin is h = Δᵀ(s g) and the gradient of
    # the mean loss is mean_j ℓ'(h_j) s_j g_j, so no step touches the signs.
    xs = x * s[..., None]  # (S, n, d)
    xs_t = xs.transpose(1, 2)  # (S, d, n), a view
    evaluate = _Evaluator(x, s, xs, w0, data.behavior, len(data.names), obj, beta_t[:, None],
                          num_configs)

    # Runs as rows: Δ is (S, P, d) and margins are (S, P, n), so the forward
    # Δ (s g)ᵀ and the backward r (s g) are matrix products with row-major
    # outputs, fast both for many configurations of one sample and for many
    # seeds with one configuration each.
    delta = torch.zeros(num_seeds, num_configs, dim, dtype=dtype, device=device)
    if delta0 is not None:
        start = torch.as_tensor(delta0, dtype=dtype, device=device)
        if start.shape not in ((dim,), tuple(delta.shape)):
            raise ParameterError("delta0", tuple(start.shape),
                                 f"must have shape ({dim},) or {tuple(delta.shape)}")
        delta += start
    record = np.unique(np.r_[np.arange(0, steps + 1, eval_every), steps])
    wanted = set(record.tolist())
    store = {name: [] for name in BEHAVIOR_METRICS}
    norms, kept = [], []
    beta_col = beta_t[:, None]  # (P, 1) broadcasts against (S, P, n)

    # The step Δ += r xs with r = −2·lr·ℓ'(h)/B is gradient descent with step lr
    # on W. With the objective's logit form ℓ'(h) = outer(β)·inner_(b·h), b =
    # inner_scale(β), the loop carries Φ = bΔ instead: Φ xsᵀ is inner_'s
    # argument, and Φ += b·(−2 lr/B)·outer(β)·inner_(Φ xsᵀ) xs (two passes).
    scale = (-2.0 / (batch_size or n)) * lr_t[:, None]  # (P, 1)
    if obj.inner_ is not None:
        to_param = obj.inner_scale(beta_col)  # (P, 1): Φ = to_param · Δ
        coef = to_param * scale * obj.outer(beta_col)
        step_r = obj.inner_
    else:
        to_param = torch.ones_like(beta_col)
        coef = scale
        step_r = lambda h: obj.grad(h, beta_col)  # noqa: E731
    param = delta * to_param  # updated in place from here on

    # The step's (S, P, B) margins land in one buffer allocated once (a fresh
    # tensor per step measured ~5% slower at n = 500, d = 16).
    margins = torch.empty(num_seeds, num_configs, batch_size or n, dtype=dtype, device=device)
    batches = _BatchStream(seeds, n, batch_size, device) if batch_size else None
    for k in range(steps + 1):
        w_full = None
        if k in wanted:  # full-batch margins, reused by the step when it is full batch
            w_full = torch.bmm(param, xs_t, out=margins if batches is None else None)
            delta = param / to_param
            for name, value in evaluate(w_full, to_param).items():
                store[name].append(value)  # (S, P, K)
            norms.append(delta.norm(dim=-1) / np.sqrt(2))
            if keep_deltas:
                kept.append(delta)
        if k == steps:
            break
        if batches is None:
            xb = xs
            if w_full is None:
                torch.bmm(param, xs_t, out=margins)
        else:
            idx = batches.next()  # (S, B)
            xb = xs[torch.arange(num_seeds, device=device)[:, None], idx]  # (S, B, d)
            torch.bmm(param, xb.transpose(1, 2), out=margins)  # (S, P, B)
        param.baddbmm_(step_r(margins).mul_(coef), xb)  # the margins are consumed
        if progress is not None:
            progress(k + 1)

    per_behavior = {name: torch.stack(v).cpu().double().numpy()
                    for name, v in store.items()}  # (E, S, P, K)
    deltas = torch.stack(kept) if keep_deltas else None
    return SimulationResult(
        steps=record, seeds=list(seeds), beta=beta_np, lr=lr_np, names=tuple(data.names),
        per_behavior=per_behavior, weight_change=torch.stack(norms).cpu().double().numpy(),
        final=param / to_param, deltas=deltas,
    )


class _Evaluator:
    """Per-behavior metrics ``(S, P, K)`` of every run from its margins.

    Built once per call from the sample ``x`` ``(S, n, d)``, signs ``s``
    ``(S, n)``, signed features ``xs``, reference ``w0`` ``(V, d)`` and each
    sample's behavior ``(n,)``; ``beta`` is ``(P, 1)``. Called with the margin
    product ``w = Φ xsᵀ`` ``(S, P, n)`` and ``to_param`` (``h = w / to_param``).

    Per-behavior means are linear, so only the per-sample quantities that are
    not linear in ``h`` are formed (loss, two signs, the log-partition shift),
    written into one buffer ``(5, S, P, n)`` with ``h``, samples in behavior
    order, and averaged by one sum per behavior over its contiguous block (a
    product with an ``(n, K)`` share matrix is ~10× slower at small ``K``):

    * accuracies from signs: ``1[x>0] + ½·1[x=0] = (sign x + 1)/2``;
    * rewards: ``β(±h/2 − shift)`` and ``βh`` from the means of ``h`` and
      ``shift = log Z − log Z0 = log(π0(Yes) e^{sh/2} + π0(No) e^{−sh/2} + π0(rest))``
      (``Δᵀg = s h`` moves the Yes and No logits by ``±Δᵀg/2``).
    """

    def __init__(self, x, s, xs, w0, behavior, num_behaviors, obj, beta, num_configs):
        num_seeds, n, _ = x.shape
        self.obj, self.beta = obj, beta
        # Samples in behavior order (sample_batch's already are: then no copy).
        order = torch.argsort(behavior, stable=True)
        self.order = None if bool((order == torch.arange(n, device=x.device)).all()) else order
        if self.order is not None:
            x, s, xs = x[:, order], s[:, order], xs[:, order]
        counts = torch.bincount(behavior, minlength=num_behaviors)
        self.counts = counts.tolist()
        self.inverse_counts = 1 / counts.to(x.dtype)  # (K,): an empty behavior gives NaN means
        log_pi0 = torch.log_softmax(x @ w0.T, -1)  # (S, n, V): the reference policy, once
        self.log_yes = log_pi0[:, None, :, YES]  # (S, 1, n)
        self.log_no = log_pi0[:, None, :, NO]
        others = torch.ones(w0.shape[0], dtype=torch.bool, device=x.device)
        others[[YES, NO]] = False
        self.log_rest = (torch.logsumexp(log_pi0[..., others], -1)[:, None]
                         if others.any() else None)
        self.half_s = (s / 2)[:, None]  # (S, 1, n)
        self.rank0 = (xs @ (w0[YES] - w0[NO]))[:, None]  # (S, 1, n): s u0ᵀg
        self.buffer = torch.empty(5, num_seeds, num_configs, n, dtype=x.dtype, device=x.device)
        self.scratch = torch.empty(num_seeds, num_configs, n, dtype=x.dtype, device=x.device)

    def __call__(self, w: torch.Tensor, to_param: torch.Tensor) -> dict[str, torch.Tensor]:
        h, loss, acc, racc, shift = self.buffer
        if self.order is not None:
            w = w.index_select(-1, self.order)
        torch.div(w, to_param, out=h)
        loss.copy_(self.obj.loss(h, self.beta))
        torch.sign(torch.add(h, self.rank0, out=acc), out=acc)
        torch.sign(h, out=racc)
        torch.addcmul(self.log_yes, h, self.half_s, out=shift)
        torch.addcmul(self.log_no, h, self.half_s, value=-1, out=self.scratch)
        torch.logaddexp(shift, self.scratch, out=shift)
        if self.log_rest is not None:
            torch.logaddexp(shift, self.log_rest, out=shift)
        sums = [block.sum(-1) for block in self.buffer.split(self.counts, -1)]
        means = torch.stack(sums, -1) * self.inverse_counts  # (5, S, P, K)
        h_mean, loss_mean, acc_mean, racc_mean, shift_mean = means
        beta = self.beta  # (P, 1) against (S, P, K)
        return {
            "loss": loss_mean,
            "accuracy": (acc_mean + 1) / 2,
            "reward_accuracy": (racc_mean + 1) / 2,
            "rewards/chosen": beta * (h_mean / 2 - shift_mean),
            "rewards/rejected": beta * (-h_mean / 2 - shift_mean),
            "rewards/margins": beta * h_mean,
        }


class _BatchStream:
    """Minibatch indices ``(S, B)``: per seed, a fresh permutation each epoch."""

    def __init__(self, seeds, n: int, batch_size: int, device):
        self.n, self.size, self.device = n, batch_size, device
        self.gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.per_epoch = n // batch_size
        self.position = self.per_epoch  # forces a shuffle first
        self.perms = None

    def next(self) -> torch.Tensor:
        if self.position == self.per_epoch:
            self.perms = torch.stack([torch.randperm(self.n, generator=g) for g in self.gens])
            self.position = 0
        start = self.position * self.size
        self.position += 1
        return self.perms[:, start:start + self.size].to(self.device)
