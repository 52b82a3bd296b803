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
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from dynamics.metrics import HELDOUT_METRICS, tidy_frame
from dynamics.model import NO, YES
from dynamics.objectives import OBJECTIVES, resolve_objective
from synthetic.problem import Problem
from synthetic.sampling import PreferenceSample, allocate, sample_batch
from synthetic.validation import (ParameterError, check_finite_array, check_integer,
                                  check_number)

__all__ = ["SimulationResult", "simulate", "simulate_sample"]

_SFT = OBJECTIVES["sft"]  # the pretraining term is imitation of the pretraining tokens


@dataclass
class SimulationResult:
    """Metrics of every run at the recorded steps.

    steps (E,) · per_behavior[metric] (E, S, P, K) · weight_change (E, S, P)
    final ``Δ`` (S, P, d); deltas (E, S, P, d) if kept; per_run[statistic] (E, S, P):
    a sampled estimator's statistics of the update that led to each recorded step
    (``policy/clipfrac``, ``policy/approxkl``, ``loss/value``; NaN at step 0).
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
    per_run: dict[str, np.ndarray] = field(default_factory=dict)
    head: dict[str, torch.Tensor] | None = None  # an MLP head's final A, a, U (final: None)

    def frame(self) -> pd.DataFrame:
        return tidy_frame(source="simulation", steps=self.steps, lr=self.lr, beta=self.beta,
                          seeds=list(self.seeds), names=self.names,
                          per_behavior=self.per_behavior, weight_change=self.weight_change,
                          per_run=self.per_run)


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
    objective="dpo",
    batch_size: int | None = None,
    delta0: np.ndarray | None = None,
    eval_every: int = 1,
    keep_deltas: bool = False,
    progress: Callable[[int], None] | None = None,
    train_behaviors: Sequence[int] | None = None,
    train_n: int | None = None,
    reward_head: np.ndarray | torch.Tensor | None = None,
    pretrain=None,
    pretrain_n: int | None = None,
    reward_scales=None,
    heldout: PreferenceSample | None = None,
    prompt_offset=None,
    hidden_units: int | None = None,
    head_seed: int = 0,
) -> SimulationResult:
    """Train on a batched sample (``data.features`` of shape ``(S, n, d)``).

    ``reward_head`` (``Φ``, ``(V, d)`` or one per seed ``(S, V, d)``; ``r(g, y) =
    φ_yᵀg``) is the frozen reward an objective on ``prompts`` (``rlhf``) maximises;
    with it, a policy trained on every row also reports ``objective/scores`` and
    ``objective/rlhf_reward``. ``pretrain`` (a :class:`synthetic.pretrain.Pretraining`)
    is PPO-ptx's pretraining distribution: each seed draws ``pretrain_n`` examples
    (default ``n``) that an objective with ``ptx_coef = γ > 0`` also trains on
    (``+γ·mean(−log π(y|g))`` in its loss), and a held-out draw of the same size on
    which every run reports the alignment tax ``pretrain/loss`` at each recorded step.
    ``reward_scales`` (one factor per behavior, default 1) multiplies the reward of
    each behavior's prompts: the task reward RL maximises and ``objective/scores``
    reports (with ``score = "advantage"`` RL maximises the advantage model's score
    instead, :class:`_Rewards`). ``heldout`` (a sample shaped like ``data`` but for its
    ``n``) adds the metrics of :data:`dynamics.metrics.HELDOUT_METRICS` on it, named
    ``heldout/<metric>``: generalisation, and the tax on held-out preference pairs.
    ``prompt_offset`` (``c``, ``(d,)``) is what a prompt adds to the embedding: context
    distillation (``distill``) trains the unprompted policy towards the phase's
    starting policy seeing ``g + c``.

    ``train_behaviors`` (indices into ``data.names``; default all) restricts the
    training set to those behaviors' statements; metrics are still reported for
    every behavior (so forgetting is measured). ``train_n`` (default all) trains on
    that many of them: from each (behavior, class) group its first statements, the
    counts in proportion to the groups' sizes (largest remainder), so a smaller
    ``train_n`` is a subset of a larger one and keeps the class balance.

    ``objective`` is a registered name or a table ``{"name": ..., **hyperparameters}``
    (:func:`dynamics.objectives.resolve_objective`). ``reference`` is ``W0``
    ``(V, d)``, or one per seed ``(S, V, d)``; ``delta0`` the objective's starting
    parameter ``θ`` (default 0): for the ``difference`` view ``(d,)`` or ``(S, P, d)``
    (e.g. a previous result's ``final``), for the others ``(R, d)`` or ``(S, P, R, d)`` with ``R``
    the objective's rows (``V`` for the ``all`` view). Metrics are recorded at
    steps ``0, eval_every, …, steps``; ``progress(k)`` is called after each step.

    ``hidden_units`` (``H ≥ 1``) trains a one-hidden-layer MLP head instead of the
    linear one (:mod:`dynamics.mlp_head`, its start drawn from ``head_seed``).
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
    obj, hyper = resolve_objective(objective)
    beta_np, lr_np = _as_configs(beta, lr)
    dtype, device = x.dtype, x.device
    w0 = torch.as_tensor(np.asarray(reference), dtype=dtype, device=device)
    if w0.dim() == 2:
        w0 = w0[None]  # one reference for every seed
    if w0.dim() != 3 or w0.shape[0] not in (1, num_seeds) or w0.shape[2] != dim:
        raise ParameterError("reference", tuple(w0.shape),
                             f"must have shape (V, {dim}) or ({num_seeds}, V, {dim})")
    if hidden_units is not None:  # an MLP head: its own trainer, the linear engines untouched
        from dynamics.mlp_head import simulate_mlp
        return simulate_mlp(data, seeds=list(seeds), obj=obj, hyper=hyper, beta=beta_np,
                            lr=lr_np, steps=steps, w0=w0, hidden_units=hidden_units,
                            head_seed=head_seed, batch_size=batch_size, eval_every=eval_every,
                            progress=progress, train_behaviors=train_behaviors, heldout=heldout,
                            refused={"delta0": None if delta0 is None or not bool(
                                         torch.as_tensor(delta0).any()) else delta0,
                                     "reward_head": reward_head,
                                     "pretrain": pretrain, "prompt_offset": prompt_offset,
                                     "train_n": train_n,
                                     "keep_deltas": keep_deltas or None})
    rows = obj.rows or w0.shape[1]
    shape = (num_seeds, len(beta_np), rows, dim)
    theta = torch.zeros(shape, dtype=dtype, device=device)
    if delta0 is not None:
        start = torch.as_tensor(np.asarray(delta0) if not isinstance(delta0, torch.Tensor)
                                else delta0, dtype=dtype, device=device)
        if obj.view == "difference" and start.shape in ((dim,), shape[:2] + (dim,)):
            start = start.unsqueeze(-2)
        if start.shape not in ((rows, dim), shape):
            allowed = f"({dim},) or {shape[:2] + (dim,)}" if obj.view == "difference" else (
                f"({rows}, {dim}) or {shape}")
            raise ParameterError("delta0", tuple(start.shape), f"must have shape {allowed}")
        theta += start
    train = data
    if train_behaviors is not None:
        wanted = torch.zeros(len(data.names), dtype=torch.bool)
        for i in train_behaviors:
            wanted[check_integer("train_behaviors", i, ge=0, le=len(data.names) - 1)] = True
        keep = torch.nonzero(wanted[data.behavior.cpu()]).squeeze(1).to(data.behavior.device)
        if len(keep) < n:
            train = PreferenceSample(x[:, keep], s[:, keep], data.true_signs[:, keep],
                                     data.behavior[keep], data.names)
        if batch_size is not None and batch_size > len(keep):
            raise ParameterError("batch_size", batch_size,
                                 f"must be <= the {len(keep)} statements trained on")
    if train_n is not None:
        train = stratified_subset(train, check_integer("train_n", train_n, ge=2,
                                                       le=len(train.behavior)))
        if batch_size is not None and batch_size > train_n:
            raise ParameterError("batch_size", batch_size,
                                 f"must be <= the {train_n} statements trained on (train_n)")
    head = _reward_head(reward_head, obj, num_seeds, w0.shape[1], dim, dtype, device)
    rewards = None if head is None else _Rewards(head, reward_scales, len(data.names),
                                                 hyper.get("score", "reward"))
    sampled = obj.data == "prompts" and hyper["estimator"] != "exact"
    if sampled and batch_size is not None:
        raise ParameterError("batch_size", batch_size,
                             f"applies to the exact estimator; estimator "
                             f"{hyper['estimator']!r} draws rollout_size prompts a step")
    if sampled and hyper["rollout_size"] > len(train.behavior):
        raise ParameterError("objective.rollout_size", hyper["rollout_size"],
                             f"must be <= the {len(train.behavior)} prompts trained on")
    ptx = _Pretrain.build(pretrain, pretrain_n or n, obj, hyper, seeds, w0.shape[1], dim, dtype,
                          device)
    offset = None
    if obj.data == "context":
        if prompt_offset is None:
            raise ParameterError("prompt_offset", None, f"is required by {obj.name!r}: the "
                                 f"offset c (length {dim}) a prompt adds to the embedding")
        offset = torch.as_tensor(check_finite_array("prompt_offset", prompt_offset, (dim,)),
                                 dtype=dtype, device=device)
    if obj.view == "all":
        if sampled:
            from dynamics.rollouts import RolloutEngine as engine
        else:
            engine = _SoftmaxEngine
        run = engine(data, train, obj, hyper, beta_np, lr_np, w0, theta, batch_size, seeds,
                     rewards, ptx, offset)
    else:
        run = _MarginEngine(data, train, obj, hyper, beta_np, lr_np, w0, theta, batch_size,
                            seeds)
    if heldout is not None:
        if heldout.features.shape[0] != num_seeds or heldout.features.shape[2] != dim:
            raise ParameterError("heldout", tuple(heldout.features.shape),
                                 f"must have shape ({num_seeds}, m, {dim})")
        run.add_heldout(heldout)
    record = np.unique(np.r_[np.arange(0, steps + 1, eval_every), steps])
    wanted = set(record.tolist())
    store: dict[str, list] = {}
    norms, kept, stats = [], [], []
    for k in range(steps + 1):
        if k in wanted:
            values = run.evaluate()
            if heldout is not None:
                held = run.evaluate_heldout()
                values.update({f"heldout/{m}": held[m] for m in HELDOUT_METRICS if m in held})
            for name, value in values.items():
                store.setdefault(name, []).append(value)  # (S, P, K)
            norms.append(run.weight_change())
            stats.append(dict(getattr(run, "stats", {})))
            if ptx is not None:
                stats[-1]["pretrain/loss"] = ptx.tax(run.policy()).cpu().double().numpy()
            if keep_deltas:
                kept.append(run.theta())
        if k == steps:
            break
        run.step()
        if progress is not None:
            progress(k + 1)

    per_behavior = {name: torch.stack(v).cpu().double().numpy()
                    for name, v in store.items()}  # (E, S, P, K)
    per_run = {name: np.stack([st.get(name, np.full(norms[0].shape, np.nan)) for st in stats])
               for name in sorted({key for st in stats for key in st})}  # (E, S, P)
    final = run.theta()
    if obj.view == "difference":  # (S, P, d) as the DPO family has always returned it
        final, kept = final[:, :, 0], [t[:, :, 0] for t in kept]
    return SimulationResult(
        steps=record, seeds=list(seeds), beta=beta_np, lr=lr_np, names=tuple(data.names),
        per_behavior=per_behavior, weight_change=torch.stack(norms).cpu().double().numpy(),
        final=final, deltas=torch.stack(kept) if keep_deltas else None, per_run=per_run,
    )


def stratified_subset(data: PreferenceSample, size: int) -> PreferenceSample:
    """``size`` statements of ``data``: the first ones of each run of equal (behavior,
    true class), the counts proportional to the runs' lengths (largest remainder)."""
    behavior = data.behavior.cpu().numpy()
    cls = data.true_signs.reshape(-1, len(behavior))[0].cpu().numpy()
    starts = np.flatnonzero(np.r_[True, (behavior[1:] != behavior[:-1]) | (cls[1:] != cls[:-1])])
    lengths = np.diff(np.r_[starts, len(behavior)])
    counts = allocate(size, lengths)
    keep = torch.as_tensor(np.concatenate([np.arange(a, a + c) for a, c in zip(starts, counts)]),
                           device=data.behavior.device)
    return PreferenceSample(data.features[..., keep, :], data.signs[..., keep],
                            data.true_signs[..., keep], data.behavior[keep], data.names)


def gather_prompts(context: dict[str, torch.Tensor], idx: torch.Tensor) -> dict:
    """A per-prompt context ``(S, ·, ·, n)`` (β, per run, passes through) restricted to
    each seed's prompts ``idx`` ``(S, B)``."""
    return {key: value if key == "beta" else value.gather(
        -1, idx[:, None, None].expand(-1, value.shape[1], value.shape[2], -1))
        for key, value in context.items()}


class _Pretrain:
    """PPO-ptx's pretraining sample (training and held-out) of every seed, its term in
    the gradient and the alignment tax."""

    def __init__(self, train, heldout, tokens, coef):
        self.x, self.heldout, self.coef = train, heldout, coef  # (S, m, d) ×2, γ
        self.tokens = tokens[None, None, None, :]  # (1, 1, 1, m)

    @classmethod
    def build(cls, pretrain, size, obj, hyper, seeds, vocab, dim, dtype, device):
        coef = float(hyper.get("ptx_coef", 0.0))
        if pretrain is None:
            if coef > 0:
                raise ParameterError("objective.ptx_coef", coef, "needs a pretraining "
                                     "distribution ([pretrain] in the config)")
            return None
        if pretrain.dim != dim:
            raise ParameterError("pretrain.components.0.mean", pretrain.dim,
                                 f"must have length d = {dim}")
        pretrain.check_vocab(vocab)
        x, tokens = pretrain.sample(size, seeds, dtype=dtype, device=device)
        held, _ = pretrain.sample(size, seeds, heldout=True, dtype=dtype, device=device)
        return cls(x, held, tokens, coef)

    def tax(self, weights: torch.Tensor) -> torch.Tensor:
        """``mean(−log π(y|g))`` over the held-out draw, per run ``(S, P)``; ``weights``
        the policy ``(S, P, V, d)``."""
        logits = torch.bmm(weights.flatten(1, 2), self.heldout.transpose(1, 2))
        logits = logits.view(*weights.shape[:3], -1)  # (S, P, V, m)
        return _SFT.logit_loss(logits, self.tokens).mean(-1)

    def gradient(self, logits: torch.Tensor) -> torch.Tensor:
        """``γ ∂(−log π(y|g))/∂logits`` at the training draw's logits ``(S, P, V, m)``."""
        return _SFT.logit_grad(logits, self.tokens).mul_(self.coef)


class _Rewards:
    """The reward an RL run sees on each prompt, from the frozen head ``Φ``.

    The task reward of a prompt of behavior ``k`` is ``s_k φ_yᵀg`` (``s_k`` from
    ``reward_scales``). With ``score = "advantage"`` (the advantage model of
    "Stabilizing RLHF through Advantage Model and Selective Rehearsal", 2023) RL
    maximises instead ``(s_k φ_yᵀg − b(g)) / σ_k``: the reward minus its expectation
    ``b(g)`` under the phase's starting policy, each behavior's scores regulated to
    unit variance, ``σ_k² = E_{g∈k} Var_{y~π_start}[s_k φ_yᵀg]`` (measured per seed on
    its training prompts; the baseline leaves the exact gradient unchanged, the
    scaling reweights the behaviors).
    """

    def __init__(self, head, scales, behaviors: int, score: str):
        self.head, self.score = head, score  # (S or 1, V, d)
        scales = np.ones(behaviors) if scales is None else np.asarray(scales, dtype=np.float64)
        if scales.shape != (behaviors,):
            raise ParameterError("reward_scales", scales.shape, f"must have {behaviors} "
                                 "entries, one per behavior")
        for k, value in enumerate(scales):
            check_number(f"reward_scales.{k}", float(value), gt=0)
        self.scales = torch.as_tensor(scales, dtype=head.dtype, device=head.device)
        self.sd = None  # (S, P, K) once the advantage model is fixed

    def task(self, x: torch.Tensor, behavior: torch.Tensor) -> torch.Tensor:
        """``s_k φ_yᵀg`` ``(S, 1, V, n)`` for features ``(S, n, d)``."""
        head = self.head.expand(x.shape[0], -1, -1)
        return (torch.bmm(head, x.transpose(1, 2)) * self.scales[behavior])[:, None]

    def trained(self, task: torch.Tensor, logits: torch.Tensor, behavior: torch.Tensor,
                behaviors: int) -> torch.Tensor:
        """What RL maximises on these prompts, given the starting policy's logits
        ``(S, P, V, n)``: the task reward, or the advantage model's score (its σ_k
        fixed by the first call, on the training prompts)."""
        if self.score == "reward":
            return task
        probs = torch.softmax(logits, dim=-2)
        base = (probs * task).sum(-2, keepdim=True)  # (S, P, 1, n): b(g)
        if self.sd is None:
            var = (probs * task**2).sum(-2) - base[:, :, 0] ** 2  # (S, P, n)
            sums = torch.zeros(*var.shape[:2], behaviors, dtype=var.dtype, device=var.device)
            sums.index_add_(2, behavior, var.clamp_min(0))
            counts = torch.bincount(behavior, minlength=behaviors).to(var.dtype)
            self.sd = (sums / counts).sqrt().clamp_min(1e-12)  # (S, P, K)
        return (task - base) / self.sd[..., behavior][:, :, None]


def _reward_head(head, obj, num_seeds, vocab, dim, dtype, device) -> torch.Tensor | None:
    """The frozen reward head as ``(S or 1, V, d)``; required by an objective on prompts."""
    if head is None:
        if obj.data == "prompts":
            raise ParameterError("reward_head", None,
                                 f"is required by {obj.name!r}: a reward head Φ of shape "
                                 f"({vocab}, {dim}) (from a reward_model phase or "
                                 "model.reward_head)")
        return None
    head = torch.as_tensor(np.asarray(head) if not isinstance(head, torch.Tensor) else head,
                           dtype=dtype, device=device)
    given = tuple(head.shape)
    if head.dim() == 2:
        head = head[None]
    if head.dim() != 3 or head.shape[0] not in (1, num_seeds) or head.shape[1:] != (vocab, dim):
        raise ParameterError("reward_head", given,
                             f"must have shape ({vocab}, {dim}) or ({num_seeds}, {vocab}, {dim})")
    if not bool(torch.isfinite(head).all()):
        raise ParameterError("reward_head", "non-finite entries", "must be finite")
    return head


class _MarginEngine:
    """Gradient descent for the margin views, every run at once.

    The rows of every run are the rows of one batched matrix product: ``θ`` is
    carried as ``(S, P·R, d)`` with the row signs absorbed (``θ̃_r = σ_r θ_r``),
    so ``h_r = θ̃_rᵀ(s g)`` and, for an objective ``ℓ(h)`` and view gain ``G``,

        θ̃ ← θ̃ − G·lr · mean_j[ ℓ'(h_j) s_j g_j ]        (over the batch),

    i.e. gradient descent with step ``lr`` on the matrix rows (THEORY §1, exact).
    With the objective's logit form ``ℓ'(h) = outer(β)·inner_(b·h)`` the loop
    carries ``Φ = bθ̃``: ``Φ (s g)ᵀ`` is ``inner_``'s argument and a step is two
    elementwise passes. Runs as rows keep every output row-major, fast both for
    many configurations of one sample and for many seeds.
    """

    def __init__(self, data, train, obj, hyper, beta, lr, w0, theta, batch_size, seeds):
        x, s = data.features, data.signs
        num_seeds, _, dim = x.shape
        n = train.features.shape[1]
        dtype, device = x.dtype, x.device
        self.obj, self.hyper, self.shape = obj, hyper, theta.shape  # (S, P, R, d)
        rows = theta.shape[2]
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)  # noqa: E731
        beta_t, lr_t = t(beta), t(lr)
        # Signed features s·g, once: the margin is h = θ̃ᵀ(s g) and the gradient of
        # the mean loss is mean_j ℓ'(h_j) s_j g_j, so no step touches the signs.
        self.xs = x * s[..., None]  # (S, n, d)
        self.xs_t = self.xs.transpose(1, 2)  # (S, d, n), a view
        self.shared = train is data  # the evaluation's margins can serve the next step
        if not self.shared:
            self.train_xs = train.features * train.signs[..., None]
            self.train_xs_t = self.train_xs.transpose(1, 2)
        else:
            self.train_xs, self.train_xs_t = self.xs, self.xs_t
        self.row_signs = t(obj.row_signs)[:, None]  # (R, 1)
        self.beta_rows = beta_t.repeat_interleave(rows)[:, None]  # (P·R, 1)
        scale = (-obj.gain / (batch_size or n)) * lr_t.repeat_interleave(rows)[:, None]
        if obj.inner_ is not None:
            self.to_param = obj.inner_scale(self.beta_rows)  # (P·R, 1): Φ = to_param · θ̃
            self.coef = self.to_param * scale * obj.outer(self.beta_rows)
            self.step_r = lambda w: obj.inner_(w, **hyper)
        else:
            self.to_param = torch.ones_like(self.beta_rows)
            self.coef = scale
            self.step_r = lambda w: obj.grad(w, self.beta_rows, **hyper)
        signed = theta * self.row_signs  # θ̃
        self.param = signed.reshape(num_seeds, -1, dim) * self.to_param  # (S, P·R, d)
        self.evaluator = _Evaluator(data, self.xs, w0, obj, hyper, beta_t[:, None], rows)
        self.w0, self.beta_t = w0, beta_t
        # The step's (S, P·R, B) margins land in one buffer allocated once (a fresh
        # tensor per step measured ~5% slower at n = 500, d = 16); the full-batch
        # margins of an evaluation are reused by the next full-batch step.
        self.margins = torch.empty(num_seeds, self.param.shape[1], batch_size or n, dtype=dtype,
                                   device=device)
        self.shared = self.shared and batch_size is None
        self.batches = _BatchStream(seeds, n, batch_size, device) if batch_size else None
        self.fresh = False
        self.update = torch.empty_like(self.param)  # a step's change before its scale

    def theta(self) -> torch.Tensor:
        """The objective's parameter ``θ`` ``(S, P, R, d)`` (row signs undone)."""
        return (self.param / self.to_param).reshape(self.shape) * self.row_signs

    def weight_change(self) -> torch.Tensor:
        """``‖W − W0‖_F`` per run ``(S, P)``: ``‖Δ‖/√2`` for the policy's difference,
        0 for a reward head (the policy does not move)."""
        if self.obj.block != "policy":
            return torch.zeros(self.shape[:2], dtype=self.param.dtype, device=self.param.device)
        return self.theta()[:, :, 0].norm(dim=-1) / np.sqrt(2)

    def add_heldout(self, heldout) -> None:
        """Evaluate on ``heldout`` too (:meth:`evaluate_heldout`)."""
        xs = heldout.features * heldout.signs[..., None]
        self.heldout_xs_t = xs.transpose(1, 2)
        self.heldout_eval = _Evaluator(heldout, xs, self.w0, self.obj, self.hyper,
                                       self.beta_t[:, None], self.shape[2])

    def evaluate_heldout(self) -> dict[str, torch.Tensor]:
        w = torch.bmm(self.param, self.heldout_xs_t)
        return self.heldout_eval(w.view(*self.shape[:3], -1),
                                 self.to_param.view(-1, self.shape[2], 1))

    def policy(self) -> torch.Tensor:
        """The policy ``W`` ``(S, P, V, d)``: the reference with ``±θ/2`` on Yes/No for
        the policy's difference, the reference itself while a reward head trains."""
        weights = self.w0[:, None].expand(self.shape[0], self.shape[1], -1, -1).clone()
        if self.obj.block == "policy":
            theta = self.theta()[:, :, 0]
            weights[:, :, YES] += theta / 2
            weights[:, :, NO] -= theta / 2
        return weights

    def evaluate(self) -> dict[str, torch.Tensor]:
        w = torch.bmm(self.param, self.xs_t, out=self.margins if self.shared else None)
        self.fresh = self.shared  # (S, P·R, n)
        return self.evaluator(w.view(*self.shape[:3], -1), self.to_param.view(-1, self.shape[2], 1))

    def step(self) -> None:
        if self.batches is None:
            xb = self.train_xs
            if not self.fresh:
                torch.bmm(self.param, self.train_xs_t, out=self.margins)
        else:
            idx = self.batches.next()  # (S, B)
            xb = self.train_xs[torch.arange(self.xs.shape[0], device=idx.device)[:, None], idx]
            torch.bmm(self.param, xb.transpose(1, 2), out=self.margins)  # (S, P·R, B)
        self.fresh = False
        # θ̃ += coef ⊙ (ℓ'-part @ x): the per-row scale after the product, on (S, P·R, d)
        # values instead of the (S, P·R, B) margins (one pass over the margins fewer)
        torch.bmm(self.step_r(self.margins), xb, out=self.update)  # margins consumed
        self.param.addcmul_(self.update, self.coef)


class _SoftmaxEngine:
    """Gradient descent on every row of the policy (the ``all`` view):

        W ← W − lr · mean_j[ ∂ℓ/∂logits_j g_jᵀ ],   logits_j = W g_j,

    carried as ``W = W0 + D`` of shape ``(S, P·V, d)`` (runs × rows as matrix rows).
    An objective on prompts (RL) also reads, per prompt, the reference logits
    ``W0 g`` and the frozen rewards ``Φ g`` (:attr:`context`).
    """

    def __init__(self, data, train, obj, hyper, beta, lr, w0, theta, batch_size, seeds,
                 rewards=None, ptx=None, offset=None):
        x, s = data.features, data.signs
        num_seeds, _, dim = x.shape
        n = train.features.shape[1]
        dtype, device = x.dtype, x.device
        self.obj, self.hyper, self.shape = obj, hyper, theta.shape  # (S, P, V, d)
        self.w0 = w0[:, None]  # (S or 1, 1, V, d)
        self.rewards = rewards  # _Rewards or None
        vocab = w0.shape[1]
        self.x_t = x.transpose(1, 2)
        self.eval_chosen = torch.where(s > 0, YES, NO)[:, None, None, :]  # (S, 1, 1, n): y_w
        self.x = train.features
        self.chosen = torch.where(train.signs > 0, YES, NO)[:, None, None, :]
        lr_t = torch.as_tensor(lr, dtype=dtype, device=device)
        self.lr = lr_t
        self.beta = torch.as_tensor(beta, dtype=dtype, device=device).view(1, -1, 1, 1)
        self.scale = (-lr_t / (batch_size or n)).repeat_interleave(vocab)[:, None]  # (P·V, 1)
        self.weights = (theta + self.w0).reshape(num_seeds, -1, dim)  # (S, P·V, d)
        self.full_context = {}
        self.data_names = data.names
        self.offset = offset
        if offset is not None:  # context distillation's teacher: the start, prompted
            self.full_context = {"teacher": self._logits((self.x + offset).transpose(1, 2))}
        if rewards is not None:
            k = len(data.names)
            task = rewards.task(self.x, train.behavior)
            start = self._logits(self.x.transpose(1, 2))  # the starting policy's logits
            trained = rewards.trained(task, start, train.behavior, k)
            w0_all = self.w0[:, 0].expand(num_seeds, -1, -1)
            self.full_context = {"reference": torch.bmm(w0_all, self.x.transpose(1, 2))[:, None],
                                 "rewards": trained, "beta": self.beta}
            if hyper.get("rehearsal", "none") == "selective":
                # RL on the prompts the starting policy answers below select_below in
                # expected task reward; the others rehearse their demonstrations
                self.full_context["mask"] = self._rl_mask(task, start)
                self.full_context["chosen"] = self.chosen
        self.beta_col = torch.as_tensor(beta, dtype=dtype, device=device)[:, None]  # (P, 1)
        self.w0_given, self.start = w0, self.weights.clone()
        self.evaluator = _Evaluator(data, x * s[..., None], w0, obj, {}, self.beta_col, vocab,
                                    self._eval_rewards(x, data.behavior), self._teacher(x))
        self.batches = _BatchStream(seeds, n, batch_size, device) if batch_size else None
        self.ptx = ptx if ptx is not None and ptx.coef > 0 else None
        if self.ptx is not None:  # −lr per matrix row over the pretraining draw's size
            self.ptx_scale = -lr_t.repeat_interleave(vocab)[:, None] / self.ptx.x.shape[1]

    def policy(self) -> torch.Tensor:
        return self.weights.view(self.shape)

    def _ptx_step(self):
        """The pretraining term's update ``(coef (S, P·V, m), features (S, m, d))`` at
        the current weights (applied with the objective's, so both are one GD step)."""
        if self.ptx is None:
            return None
        coef = self.ptx.gradient(self._logits(self.ptx.x.transpose(1, 2)))
        return coef.flatten(1, 2).mul_(self.ptx_scale), self.ptx.x

    def _teacher(self, x):
        """Context distillation's teacher logits on prompts ``x`` (the starting policy
        seeing ``g + c``), ``(S, P, V, m)``; None for other objectives."""
        if self.offset is None:
            return None
        return self._logits((x + self.offset).transpose(1, 2), self.start)

    def _eval_rewards(self, x, behavior):
        """What the evaluator of prompts ``x`` ``(S, m, d)`` needs for RL: the task
        reward, the trained score (at the starting policy), and selective rehearsal's
        mask and weight; None for other objectives."""
        if self.rewards is None:
            return None
        task = self.rewards.task(x, behavior)
        start = self._logits(x.transpose(1, 2), self.start)  # the phase's starting policy
        out = (task, self.rewards.trained(task, start, behavior, len(self.data_names)))
        if self.hyper.get("rehearsal", "none") == "selective":
            out += (self._rl_mask(task, start), self.hyper["rehearsal_coef"])
        return out

    def add_heldout(self, heldout) -> None:
        """Evaluate on ``heldout`` too (:meth:`evaluate_heldout`)."""
        x = heldout.features
        self.heldout_x_t = x.transpose(1, 2)
        self.heldout_chosen = torch.where(heldout.signs > 0, YES, NO)[:, None, None, :]
        self.heldout_eval = _Evaluator(heldout, x * heldout.signs[..., None], self.w0_given,
                                       self.obj, {}, self.beta_col, self.shape[2],
                                       self._eval_rewards(x, heldout.behavior),
                                       self._teacher(x))

    def evaluate_heldout(self) -> dict[str, torch.Tensor]:
        change = torch.bmm(self.theta().flatten(1, 2), self.heldout_x_t)
        return self.heldout_eval.softmax(change.view(*self.shape[:3], -1), self.heldout_chosen)

    def _rl_mask(self, task: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """``1[E_{π_start}[r(g, ·)] < select_below]`` ``(S, P, 1, n)`` (selective rehearsal),
        from the starting policy's logits ``start``."""
        probs = torch.softmax(start, dim=-2)
        expected = (probs * task).sum(-2, keepdim=True)
        return (expected < self.hyper["select_below"]).to(task.dtype)

    def objective_grad(self, logits, chosen, context) -> torch.Tensor:
        """``∂ℓ/∂logits`` of the objective, with selective rehearsal's imitation term on
        the prompts RL leaves (``context["mask"] = 0``)."""
        keys = ("reference", "rewards", "beta", "teacher")
        coef = self.obj.logit_grad(logits, chosen, **{k: context[k] for k in keys
                                                      if k in context})
        if "mask" in context:
            coef = self.rehearse(coef, logits, context)
        return coef

    def rehearse(self, coef, logits, context) -> torch.Tensor:
        mask = context["mask"]
        sft = _SFT.logit_grad(logits, context["chosen"]).mul_(self.hyper["rehearsal_coef"])
        return coef * mask + (1 - mask) * sft

    def context(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """What an RL objective reads besides the logits, for the training prompts
        ``idx`` ``(S, B)``: reference logits ``(S, 1, V, B)``, rewards ``(S, 1 or P, V, B)``
        and ``β`` ``(1, P, 1, 1)``."""
        return gather_prompts(self.full_context, idx)

    def theta(self) -> torch.Tensor:
        """``D = W − W0`` ``(S, P, V, d)``."""
        return self.weights.reshape(self.shape) - self.w0

    def weight_change(self) -> torch.Tensor:
        return self.theta().flatten(-2).norm(dim=-1)  # ‖W − W0‖_F

    def _logits(self, x_t, weights=None) -> torch.Tensor:
        """Logits ``(S, P, V, n)`` of the current policy (or of ``weights``) at ``x_t``."""
        weights = self.weights if weights is None else weights
        return torch.bmm(weights, x_t).view(*self.shape[:3], -1)

    def evaluate(self) -> dict[str, torch.Tensor]:
        change = torch.bmm(self.theta().flatten(1, 2), self.x_t)  # (S, P·V, n): D g
        return self.evaluator.softmax(change.view(*self.shape[:3], -1), self.eval_chosen)

    def step(self) -> None:
        if self.batches is None:
            xb, chosen, context = self.x, self.chosen, self.full_context
        else:
            idx = self.batches.next()  # (S, B)
            rows = torch.arange(self.x.shape[0], device=idx.device)[:, None]
            xb = self.x[rows, idx]
            chosen = self.chosen[:, 0, 0][rows, idx][:, None, None]
            context = self.context(idx)
        coef = self.objective_grad(self._logits(xb.transpose(1, 2)), chosen,
                                   context)  # (S, P, V, B)
        ptx = self._ptx_step()
        self.weights.baddbmm_(coef.flatten(1, 2).mul_(self.scale), xb)
        if ptx is not None:
            self.weights.baddbmm_(*ptx)


class _Evaluator:
    """Per-behavior metrics ``(S, P, K)`` of every run (the table in
    :mod:`dynamics.metrics`), from per-sample rows averaged per behavior.

    Built once per call from the sample, the signed features ``xs`` ``(S, n, d)``,
    the reference ``w0`` ``(V, d)``, the objective and ``beta`` ``(P, 1)``. Five
    per-sample rows are written into one buffer ``(5, S, P, n)``, samples in
    behavior order, and averaged by one sum per behavior over its contiguous
    block (a product with an ``(n, K)`` share matrix is ~10× slower at small
    ``K``); only the rows that are not linear in the parameters are formed:

    * accuracies from signs: ``1[x>0] + ½·1[x=0] = (sign x + 1)/2``;
    * policy difference (DPO family): rows ``h``, loss, two signs and the
      log-partition shift ``log Z − log Z0 = log(π0(Yes) e^{sh/2} + π0(No)
      e^{−sh/2} + π0(rest))`` (``Δᵀg = s h`` moves the Yes and No logits by
      ``±Δᵀg/2``), and the rewards ``β(±h/2 − shift)`` from their means;
    * a reward head: its rewards ``r(y_w)``, ``r(y_l)`` directly, the policy's
      ranking accuracy at the reference;
    * every row of the policy (:meth:`softmax`): log-probabilities from the
      logits.
    """

    def __init__(self, data, xs, w0, obj, hyper, beta, rows, rewards=None, teacher=None):
        x, s, behavior = data.features, data.signs, data.behavior
        num_seeds, n, _ = x.shape
        num_configs = beta.shape[0]
        self.obj, self.hyper, self.beta = obj, hyper, beta
        agree = s * data.true_signs  # (S, n): +1 where the observed label is the true one
        # Samples in behavior order (sample_batch's already are: then no copy).
        order = torch.argsort(behavior, stable=True)
        self.order = None if bool((order == torch.arange(n, device=x.device)).all()) else order
        if self.order is not None:
            x, s, xs, agree = x[:, order], s[:, order], xs[:, order], agree[:, order]
        # RL: the task reward (S, 1, V, n) for objective/scores and the trained score
        # (S, 1 or P, V, n) for the loss, in the evaluation order
        self.teacher = (teacher if teacher is None or self.order is None
                        else teacher.index_select(-1, self.order))  # distillation's targets
        self.rewards = self.loss_rewards = self.rl_mask = None
        if rewards is not None:
            ordered = [r if self.order is None else r.index_select(-1, self.order)
                       for r in rewards[:3]]
            self.rewards, self.loss_rewards = ordered[:2]
            if len(rewards) > 2:  # selective rehearsal: RL's prompts, the imitation weight
                self.rl_mask, self.rehearsal_coef = ordered[2], rewards[3]
        counts = torch.bincount(behavior, minlength=len(data.names))
        self.counts = counts.tolist()
        self.inverse_counts = 1 / counts.to(x.dtype)  # (K,): an empty behavior gives NaN means
        # without label noise the clean accuracy is the accuracy: no pass is spent on it
        self.agree = None if bool((agree > 0).all()) else agree[:, None]  # (S, 1, n)
        logits0 = x @ w0.transpose(1, 2)  # (S, n, V)
        log_pi0 = torch.log_softmax(logits0, -1)  # (S, n, V): the reference policy, once
        self.logits0 = logits0.transpose(1, 2)[:, None]  # (S, 1, V, n)
        self.log_z0 = torch.logsumexp(self.logits0, dim=-2, keepdim=True)  # (S, 1, 1, n)
        self.log_yes = log_pi0[:, None, :, YES]  # (S, 1, n)
        self.log_no = log_pi0[:, None, :, NO]
        others = torch.ones(w0.shape[1], dtype=torch.bool, device=x.device)
        others[[YES, NO]] = False
        self.log_rest = (torch.logsumexp(log_pi0[..., others], -1)[:, None]
                         if others.any() else None)
        self.s = s[:, None]  # (S, 1, n)
        self.half_s = self.s / 2
        self.rank0 = (xs @ (w0[:, YES] - w0[:, NO])[..., None]).squeeze(-1)[:, None]  # s u0ᵀg
        self.buffer = torch.empty(6, num_seeds, num_configs, n, dtype=x.dtype, device=x.device)
        self.scratch = torch.empty(num_seeds, num_configs, n, dtype=x.dtype, device=x.device)

    def _means(self) -> torch.Tensor:
        rows = self.buffer if self.agree is not None else self.buffer[:5]
        sums = [block.sum(-1) for block in rows.split(self.counts, -1)]
        return torch.stack(sums, -1) * self.inverse_counts  # (5 or 6, S, P, K)

    def _behavior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per-behavior means ``(S, P, K)`` of a per-sample row ``(S, P, n)``."""
        return torch.stack([block.sum(-1) for block in x.split(self.counts, -1)],
                           -1) * self.inverse_counts

    def _ordered(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.order is None else w.index_select(-1, self.order)

    def _finish(self, loss, rank_sign, reward_sign, chosen, rejected, clean_sign=None, *,
                margins=None):
        """Metrics from the per-behavior means: an accuracy ``E[1[x>0] + ½·1[x=0]]``
        is ``(E[sign x] + 1)/2`` (:func:`dynamics.metrics.pair_metrics`'s definitions);
        ``margins`` where the caller has them directly (``βh``: fewer roundings)."""
        return {
            "loss": loss,
            "accuracy": (rank_sign + 1) / 2,
            "reward_accuracy": (reward_sign + 1) / 2,
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected if margins is None else margins,
            "clean_accuracy": (rank_sign + 1) / 2 if clean_sign is None else (clean_sign + 1) / 2,
        }

    def _clean(self, rank_sign: torch.Tensor) -> None:
        """Sign of the ranking against the true labels into the sixth row."""
        if self.agree is not None:
            torch.mul(rank_sign, self.agree, out=self.buffer[5])

    def __call__(self, w: torch.Tensor, to_param: torch.Tensor) -> dict[str, torch.Tensor]:
        """Metrics from the margin product ``w = Φ (s g)ᵀ`` ``(S, P, R, n)`` of a
        margin view (``h_r = w_r / to_param_r``, ``to_param`` ``(R, 1)`` per run)."""
        w = self._ordered(w)
        if self.obj.block == "reward":
            return self._reward(w / to_param)
        loss, acc, racc, h, shift = self.buffer[:5]
        torch.div(w[:, :, 0], to_param[:, 0], out=h)
        loss.copy_(self.obj.loss(h, self.beta, **self.hyper))
        torch.sign(torch.add(h, self.rank0, out=acc), out=acc)
        self._clean(acc)
        torch.sign(h, out=racc)
        yes = torch.addcmul(self.log_yes, h, self.half_s)  # log π0(Yes) + Δᵀg/2
        torch.addcmul(self.log_no, h, self.half_s, value=-1, out=self.scratch)
        torch.logaddexp(yes, self.scratch, out=shift)
        if self.log_rest is not None:
            torch.logaddexp(shift, self.log_rest, out=shift)
        # KL(π ‖ π0) = (π(Yes) − π(No))·Δᵀg/2 − shift (log π/π0 is ±Δᵀg/2 − shift on
        # Yes/No and −shift on every other token)
        kl = (yes.sub_(shift).exp_() - self.scratch.sub_(shift).exp_()).mul_(h).mul_(
            self.half_s).sub_(shift)
        loss_m, acc_m, racc_m, h_m, shift_m, *clean_m = self._means()
        beta = self.beta  # (P, 1) against (S, P, K)
        # rewards β(±h/2 − shift): linear, so from the means of h and of the shift
        out = self._finish(loss_m, acc_m, racc_m, beta * (h_m / 2 - shift_m),
                           beta * (-h_m / 2 - shift_m), *clean_m, margins=beta * h_m)
        out["objective/kl"] = self._behavior_mean(kl)
        return out

    def _reward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """A reward head's margins ``h`` ``(S, P, R, n)``: R = 1, ``h = sψᵀg`` with
        ``ψ = φ_Yes − φ_No`` (the head symmetric, ``φ_Yes + φ_No = 0``: rewards
        ``±h/2``); R = 2, ``h_Yes = s φ_Yesᵀg`` and ``h_No = −s φ_Noᵀg``, whence
        ``r(y_w) − r(y_l) = h_Yes + h_No`` and ``r(y_w) = h_Yes`` if ``s > 0`` else
        ``h_No``. The policy is the reference: its ranking is ``s u0ᵀg``."""
        loss, acc, racc, chosen, rejected = self.buffer[:5]
        loss.copy_(self.obj.loss(h, self.beta[..., None], **self.hyper).sum(2))
        margin = h.sum(2)  # (S, P, n): r(y_w) − r(y_l)
        acc.copy_(torch.sign(self.rank0).expand_as(acc))
        self._clean(acc)
        torch.sign(margin, out=racc)
        if h.shape[2] == 1:
            torch.mul(margin, 0.5, out=chosen)
        else:
            torch.where(self.s > 0, h[:, :, 0], h[:, :, 1], out=chosen)
        torch.sub(chosen, margin, out=rejected)
        return self._finish(*self._means())

    def softmax(self, change: torch.Tensor, chosen: torch.Tensor) -> dict[str, torch.Tensor]:
        """Metrics from the change of the policy's logits ``D g`` ``(S, P, V, n)``
        (every row trained): ``log π/π0 = D g − (log Z − log Z0)``, and the implicit
        reward margin ``s (D_Yes − D_No)ᵀg`` exactly 0 at the reference."""
        change = self._ordered(change)
        if self.order is not None:
            chosen = chosen.index_select(-1, self.order)
        loss, acc, racc, chosen_r, rejected_r = self.buffer[:5]
        logits = self.logits0 + change
        context = ({"reference": self.logits0, "rewards": self.loss_rewards,
                    "beta": self.beta.view(-1, 1, 1)} if self.obj.data == "prompts" else {})
        if self.teacher is not None:
            context = {"teacher": self.teacher}
        value = self.obj.logit_loss(logits, chosen, **context)
        if self.rl_mask is not None:
            mask = self.rl_mask[:, :, 0]
            value = value * mask + (1 - mask) * self.rehearsal_coef * _SFT.logit_loss(logits,
                                                                                     chosen)
        loss.copy_(value)
        shift = torch.logsumexp(logits, dim=-2, keepdim=True) - self.log_z0  # (S, P, 1, n)
        logp = change - shift  # log π/π0 (S, P, V, n)
        s = self.s
        torch.sign(s * (logits[:, :, YES] - logits[:, :, NO]), out=acc)
        self._clean(acc)
        implicit = change[:, :, YES] - change[:, :, NO]  # (S, P, n): Δᵀg
        torch.sign(s * implicit, out=racc)
        positive = s > 0
        torch.mul(torch.where(positive, logp[:, :, YES], logp[:, :, NO]), self.beta, out=chosen_r)
        torch.mul(torch.where(positive, logp[:, :, NO], logp[:, :, YES]), self.beta,
                  out=rejected_r)
        out = self._finish(*self._means())
        # TRL's PPO statistics, exact over the answers: KL(π ‖ π0), E_π[r], their combination
        probs = torch.softmax(logits, dim=-2)
        kl = self._behavior_mean((probs * logp).sum(-2))
        out["objective/kl"] = kl
        if self.rewards is not None:
            scores = self._behavior_mean((probs * self.rewards).sum(-2))
            out["objective/scores"] = scores
            out["objective/rlhf_reward"] = scores - self.beta * kl
        return out


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
