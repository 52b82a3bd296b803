"""Population dynamics: gradient descent on the expected loss, computed exactly.

For a component with observed sign ``s``, mean ``μ`` and covariance ``Σ`` of a
Gaussian (or Gaussian scale-mixture) family, the margin ``h = s Δᵀg`` is
one-dimensional, and Stein's lemma turns the population gradient into
one-dimensional expectations (THEORY §2). For any objective ``ℓ(h)``:

    F(Δ) = −2 Σ_c π_c ( s_c μ_c E[ℓ'(h_c)] + E[w ℓ''(h_c)] Σ_c Δ ),
    h_c | w ~ N(s_c Δᵀμ_c, w ΔᵀΣ_cΔ),

(``w ≡ 1`` for Gaussians; ``w ~ Exp(1)`` for the Laplace family) which for DPO
is ``2β Σ_c π_c (s_c μ_c E[σ(−z_c)] − β E[w σ(z_c)σ(−z_c)] Σ_c Δ)`` with
``z = βh``. Each expectation is one integral against the law of the
standardised projection ``Y`` with the Stein weight ``E[w | Y]``
(:meth:`synthetic.Family.projection_rule`): composite Gauss–Legendre whose
panels are ``panel_width`` wide in *logit* units, the scale on which ``σ(βh)``
turns over. In units of ``Y`` a panel is ``panel_width / spread`` wide, with
``spread = β·max_c √(ΔᵀΣ_cΔ)``, rounded down to a power of two and at most 1,
so a step near the reference integrates on ~160 nodes and a strongly separated
one on more; the error stays ~1e-12 (measured up to spread 50 with the
default ``panel_width = 2``). Accuracies use the family's closed-form CDF.

**Population gradient descent** ``Δ_{k+1} = Δ_k + η F(Δ_k)`` is what a
finite-sample run with the same step ``η = lr`` tends to, step for step, as
``n → ∞``; the **continuous flow** ``dΔ/dt = F(Δ)`` (``continuous=True``) is its
``η → 0`` limit, reported at ``t = lr·k``.

Two quantities are not functions of one projection: ``rewards/chosen`` and
``rewards/rejected`` involve the log-partition over the whole vocabulary, and a
family that is no scale mixture (``uniform``) has no Stein identity. Those use
scrambled Sobol points (``qmc_points``, seeded), an integration error of about
1e-4, independent of any training sample.

Cost per step: ``O(C d²)`` for ``C`` components (plus ``O(C·qmc_points·d)``
for the QMC parts); it does not depend on a sample size.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import integrate, special, stats

from dynamics.metrics import BEHAVIOR_METRICS, tidy_frame, tie_half
from dynamics.model import NO, YES
from dynamics.objectives import OBJECTIVES, adapt_kl, resolve_objective
from synthetic.families import get_family
from synthetic.mixture import Mixture
from synthetic.validation import ParameterError, check_finite_array, check_integer, check_number

__all__ = ["PopulationFlow", "PopulationTrajectory", "population_descent",
           "population_descent_many"]

_SQRT2 = np.sqrt(2.0)
_POINTS_PER_CHUNK = 2**22  # quadrature values formed at once by the metrics (32 MiB float64)
_SHARED_RULE_POINTS = 2**13  # below this, the metrics put every row on the finest rule needed
_GRADED_LEVEL = 4  # beyond a logit spread of 16·panel_width, graded rules (PopulationFlow._graded)
_SATURATED = 40.0  # |logit| past which σ is within e^-40 of 0 or 1: no fine panels needed


def _against(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``Σ_j values[..., c, j]·weights[(c,) j]``: a rule shared by every component
    (``(J,)``) or one per component (``(C, J)``)."""
    return values @ weights if weights.ndim == 1 else (values * weights).sum(-1)


@functools.lru_cache(maxsize=32)
def _standard_points(family: str, dims: int, points: int, seed: int) -> torch.Tensor:
    """Scrambled Sobol points of ``(0,1)^(dims+1)`` mapped to the family's standardised
    draws, ``(points, dims)`` float64: a pure function of its arguments, kept per process
    so the flows of a sweep or a figure share one draw (never written to)."""
    unit = stats.qmc.Sobol(dims + 1, scramble=True, seed=seed).random(points)
    return torch.as_tensor(get_family(family).standard_from_unit(
        np.clip(unit, 1e-12, 1 - 1e-12)))


_OFFSETS: dict = {}


def _logistic_offset(objective, hyper) -> float | None:
    """:func:`_recognise_logistic`, once per objective and hyperparameters."""
    try:
        key = (objective.name, tuple(sorted(hyper.items())))
        hash(key)
    except TypeError:
        return _recognise_logistic(objective, hyper)
    if key not in _OFFSETS:
        _OFFSETS[key] = _recognise_logistic(objective, hyper)
    return _OFFSETS[key]


def _recognise_logistic(objective, hyper) -> float | None:
    """``c`` when ``objective``'s margin derivatives are the logistic family's,
    ``ℓ'(h) = −b(q + c)`` and ``ℓ''(h) = b² q(1 − q)`` with ``q = σ(−b h)`` and ``b = β``
    (``b = 1`` for an objective that does not use β): DPO (``c = 0``), cDPO, robust
    DPO, the reward models. ``None`` for any other objective.

    The form is recognised by evaluating ``objective.derivatives`` at a few margins
    and two β's, not by the objective's name: an objective added or changed in
    :mod:`dynamics.objectives` takes the generic path unless it is exactly of this
    form. ``c`` is read at a margin where ``q`` underflows to 0 (there ``ℓ' = −b c``),
    so DPO's is exactly 0.
    """
    if objective.view == "all" or objective.moments is not None:
        return None
    offsets = []
    for beta in (0.5, 3.0):
        b = beta if objective.uses_beta else 1.0
        h = np.array([-6.0, -1.0, -0.25, 0.0, 0.3, 2.0, 7.0, 800.0]) / b  # σ(−800) = 0
        try:
            first, second = (np.asarray(v, dtype=np.float64) * np.ones_like(h)
                             for v in objective.derivatives(h, beta, **hyper))
        except Exception:  # derivatives that do not take NumPy arrays: the generic path
            return None
        offset = float(-first[-1] / b)
        q = special.expit(-b * h)
        if not (np.allclose(first, -b * (q + offset), rtol=1e-13, atol=1e-15 * b)
                and np.allclose(second, b * b * q * (1 - q), rtol=1e-13, atol=0.0)):
            return None
        offsets.append(offset)
    return offsets[0] if math.isclose(*offsets, rel_tol=1e-14, abs_tol=1e-15) else None


class _LogisticDrift:
    """:meth:`PopulationFlow.drift_np` for a logistic-family objective
    (:func:`_logistic_offset`) on a uniform rule, and the whole descent
    (:meth:`descend`): nine NumPy operations and one torch one a step, on buffers
    allocated once (the generic path takes about 25).

    At the sizes of the flow (``C`` components × ``J`` ≈ 160 nodes, ``d`` ≤ a few
    hundred) a step costs per-operation overhead, not arithmetic (THEORY §6), so
    the work is arranged into as few operations as possible; each rearrangement is
    exact up to rounding (a few ulps):

    * ``buf`` holds the rows ``[Σ_c θ; s_c μ_c]`` ``(2C, d)``: one product with
      ``θ`` gives ``[θᵀΣ_cθ, E h_c]``, and the drift is one product of a ``(2C,)``
      coefficient row with the same buffer (``−G π_c s_c μ_c E[ℓ']`` and
      ``−G π_c E[wℓ''] Σ_cθ`` summed over ``c`` at once);
    * the nodes' logits ``z = −b(E h_c + sd_c·y_j)`` are one ``(C, 2) @ (2, J)``
      product, with ``−b`` folded into the rule's ``(2, J)`` factor;
    * one sigmoid per node, ``q = σ(z)``, gives ``ℓ' = −b(q + c)`` and
      ``ℓ'' = b² q(1 − q) = b² (q − q²)``; it is torch's, run on the same memory
      (its vectorised exp takes about a third of the time of scipy's ``expit`` at
      these sizes), and one square beside it fills the rows ``[q²; q]`` ``(2C, J)``;
    * the rule's weights ``[p, p·w]`` ``(J, 2)`` turn those rows into every
      component's four sums in one product, and a constant ``(4C, 2C)`` matrix
      (``±G π_c b²``, ``G π_c b`` and the step ``lr``, one per rule level, ``b``
      and ``lr``) turns the sums into the coefficients in another.

    The buffers are shared by the copies of a flow that differ only in β (the
    constants are cached per ``b``); a call returns a fresh array, so its result is
    never overwritten by the next one (not reentrant across threads).
    """

    def __init__(self, flow: PopulationFlow, offset: float):
        a = flow._np
        comps, dim = a["s_mu"].shape
        self.comps, self.offset = comps, offset
        self.diag = a["diag"]  # contiguous (Mixture.diagonal_covs)
        self.cov = a["cov"]
        # a diagonal of non-negative variances gives θᵀΣθ ≥ 0 exactly: no clamp needed
        self.clamp = self.diag is None or bool((self.diag < 0).any())
        self.buf = np.empty((2 * comps, dim))
        self.buf[comps:] = a["s_mu"]
        self.cov_delta = self.buf[:comps]  # (C, d): Σ_c θ, written each call
        self.moments = np.empty(2 * comps)  # [θᵀΣ_cθ → sd_c, E h_c]
        self.var = self.moments[:comps]
        self.columns = self.moments.reshape(2, comps).T  # (C, 2): [sd_c, E h_c]
        self.sums = np.empty(4 * comps)  # [Σ_j p q², Σ_j p w q²] per c, then the same of q
        self.pairs = self.sums.reshape(-1, 2)
        self.coef = np.empty(2 * comps)
        self.pi_gain = flow.objective.gain * np.asarray(flow.mixture.weights, np.float64)
        self.nodes: dict[int, tuple] = {}
        self.constants: dict[tuple[int, float, float], tuple] = {}
        self.last: tuple | None = None  # (level, b, lr, *constants) of the latest call

    def _nodes(self, flow: PopulationFlow, level: int) -> tuple:
        """A rule level's ``[y; 1]`` ``(2, J)`` (so that ``[sd, E h] @ [y; 1]`` is
        ``E h + sd·y``), its weights ``[p, p·w]`` ``(J, 2)``, and per-node buffers:
        the rows ``[q²; q]`` ``(2C, J)``, their two halves and a torch view of the
        ``q`` half."""
        if level not in self.nodes:
            y, p, pw = flow._rule_at(level)
            rows = np.empty((2 * self.comps, y.size))
            lower = rows[self.comps:]
            self.nodes[level] = (np.stack([y, np.ones_like(y)]), np.stack([p, pw], axis=1),
                                 rows, rows[:self.comps], lower, torch.from_numpy(lower))
        return self.nodes[level]

    def _constants(self, flow: PopulationFlow, level: int, b: float, lr: float) -> tuple:
        """``(factor, weights, rows, squares, q, q_torch, mixing, shift)`` for a rule
        level, ``b`` and step ``lr``: ``factor`` ``(2, J)`` = ``−b [y; 1]``, then
        :meth:`_nodes`' weights and buffers; ``mixing`` ``(4C, 2C)`` maps the sums
        ``[Σ p q², Σ p w q²]`` (rows ``c``) and ``[Σ p q, Σ p w q]`` (rows ``C + c``) to
        ``lr·[−G π_c b² Σ p w q(1 − q); G π_c b Σ p q]``; ``shift`` ``(2C,)`` the
        offset's share of the first-derivative coefficients (``None`` when ``c = 0``)."""
        key = (level, b, lr)
        if key not in self.constants:
            nodes = self._nodes(flow, level)
            p = flow._rule_at(level)[1]
            c, comps = np.arange(self.comps), self.comps
            mixing = np.zeros((2 * comps, 2, 2 * comps))  # [row of the sums, p or p·w, coef]
            curvature = self.pi_gain * b * b * lr
            # Σ p w q(1 − q) = Σ p w q − Σ p w q²
            mixing[c, 1, c] = curvature
            mixing[comps + c, 1, c] = -curvature
            mixing[comps + c, 0, comps + c] = self.pi_gain * b * lr  # G π_c b Σ p q
            shift = None
            if self.offset:
                shift = np.zeros(2 * comps)
                shift[comps:] = self.pi_gain * b * self.offset * p.sum() * lr
            _, weights, rows, squares, q, q_torch = nodes
            self.constants[key] = (-b * nodes[0], weights, rows, squares, q, q_torch,
                                   mixing.reshape(4 * comps, 2 * comps), shift)
        return self.constants[key]

    def expectations(self, flow: PopulationFlow, level: int, mean: np.ndarray, sd: np.ndarray,
                     scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``E[ℓ'(h)]`` and ``E[w ℓ''(h)]`` ``(P, C)`` for margins ``h = mean + sd·Y``
        ``(P, C)`` with one ``b`` per row ``scale`` ``(P,)`` on the uniform rule of
        ``level``: :meth:`PopulationFlow.drift_np_many`'s quadrature, with the logits
        as one ``(P·C, 2) @ (2, J)`` product and one sigmoid per node, in place."""
        _, p, pq = flow._rule_at(level)
        minus_b = -np.asarray(scale, dtype=np.float64)[:, None]  # (P, 1)
        columns = np.stack([sd * minus_b, mean * minus_b], axis=-1).reshape(-1, 2)
        q = np.dot(columns, self._nodes(flow, level)[0])  # (P·C, J): z = −b (E h + sd·y)
        torch.from_numpy(q).sigmoid_()  # q = σ(−b h), in place
        first = np.dot(q, p)
        if self.offset:
            first += self.offset * p.sum()
        np.multiply(np.subtract(1.0, q), q, out=q)  # q (1 − q)
        second = np.dot(q, pq)
        return (first.reshape(sd.shape) * minus_b,  # −b (E[q] + c)
                second.reshape(sd.shape) * (minus_b * minus_b))  # b² E[w q (1 − q)]

    def coefficients(self, flow: PopulationFlow, delta: np.ndarray, lr: float) -> bool:
        """Write ``lr`` times the drift's coefficients on the rows of :attr:`buf` at
        ``delta`` ``(d,)`` into :attr:`coef` (and ``Σ_c θ`` into the buffer); ``False``
        where the generic path must take over (a spread that needs graded rules, or a
        non-finite ``θ``, whose error the generic path reports)."""
        var, dot = self.var, np.dot
        if self.diag is None:
            np.matmul(self.cov, delta, out=self.cov_delta)
        else:
            np.multiply(self.diag, delta, out=self.cov_delta)
        dot(self.buf, delta, out=self.moments)  # [θᵀΣ_cθ, E h_c]
        if self.clamp:
            np.maximum(var, 0.0, out=var)
        np.sqrt(var, out=var)
        sds = var.tolist()  # (a Python max of C floats is cheaper than ndarray.max)
        top = max(sds)
        if not math.isfinite(sum(sds)):
            return False
        scale = flow.scale
        level = flow._level(top)
        if level > _GRADED_LEVEL:
            return False
        last = self.last
        if last is None or last[0] != level or last[1] != scale or last[2] != lr:
            last = self.last = (level, scale, lr, *self._constants(flow, level, scale, lr))
        _, _, _, factor, weights, rows, squares, q, q_torch, mixing, shift = last
        # np.dot, not @ (np.matmul): ~0.6 µs less dispatch each at these sizes
        dot(self.columns, factor, out=q)  # z = −b (E h + sd·y)
        q_torch.sigmoid_()  # q = σ(−b h), in place
        np.square(q, out=squares)
        dot(rows, weights, out=self.pairs)  # (2C, 2): [Σ p v, Σ p w v] for v in [q²; q]
        dot(self.sums, mixing, out=self.coef)
        if shift is not None:
            self.coef += shift
        return True

    def __call__(self, flow: PopulationFlow, delta: np.ndarray) -> np.ndarray | None:
        """The drift at ``delta`` ``(d,)``, or ``None`` where the generic path must
        take over (see :meth:`coefficients`)."""
        return self.coef.dot(self.buf) if self.coefficients(flow, delta, 1.0) else None

    def descend(self, flow: PopulationFlow, start: np.ndarray, lr: float, steps: int,
                record: np.ndarray) -> np.ndarray:
        """Gradient descent ``θ ← θ + lr·F(θ)`` from ``start`` ``(d,)`` for ``steps``
        steps, returning ``θ`` at the steps in ``record`` (sorted) ``(E, d)``. The
        step ``lr`` is folded into the coefficients, so an update is one more product
        and one addition; a step the fast path cannot take goes through
        :meth:`PopulationFlow.drift_np`'s generic path."""
        theta = np.array(start, dtype=np.float64)
        out = np.empty((len(record), theta.size))
        update = np.empty_like(theta)
        marks = iter(record.tolist())
        mark, kept = next(marks), 0
        for k in range(steps + 1):
            if k == mark:
                out[kept] = theta
                kept += 1
                mark = next(marks, -1)
            if k == steps:
                break
            if self.coefficients(flow, theta, lr):
                np.dot(self.coef, self.buf, out=update)
            else:
                np.multiply(flow._drift_np_generic(theta), lr, out=update)
            np.add(theta, update, out=theta)
        return out


@dataclass
class PopulationTrajectory:
    """Population gradient descent (or flow) and its metrics.

    steps (E,) · deltas (E, d) · per_behavior[metric] (E, K) · weight_change (E,)
    """

    steps: np.ndarray
    deltas: np.ndarray
    per_behavior: dict[str, np.ndarray]
    weight_change: np.ndarray
    beta: float
    lr: float
    names: tuple[str, ...]
    per_run: dict[str, np.ndarray] = field(default_factory=dict)  # (E,): pretrain/loss

    def frame(self) -> pd.DataFrame:
        """Tidy table with ``source = "theory"`` and a missing seed."""
        return tidy_frame(
            source="theory", steps=self.steps, lr=np.array([self.lr]),
            beta=np.array([self.beta]), seeds=[None], names=self.names,
            per_behavior={k: v[:, None, None, :] for k, v in self.per_behavior.items()},
            weight_change=self.weight_change[:, None, None],
            per_run={k: v[:, None, None] for k, v in self.per_run.items()},
        )


class PopulationFlow:
    """Expectations over a :class:`Mixture` as functions of ``Δ``.

    ``reference`` is ``W0`` of shape ``(V, d)``; its ``Yes − No`` row difference
    is ``u0``. All arithmetic is float64.
    """

    def __init__(self, mixture: Mixture, *, beta: float, reference: np.ndarray,
                 objective="dpo", panel_width: float = 2.0,
                 qmc_points: int = 8192, qmc_seed: int = 0, reward_head=None, pretrain=None,
                 reward_scales=None, prompt_offset=None):
        self.mixture = mixture
        self.beta = check_number("beta", beta, gt=0)
        self.objective, self.hyper = resolve_objective(objective)
        # the logit scale of the margins, which sets the quadrature's resolution
        self.scale = self.beta if self.objective.uses_beta else 1.0
        self.qmc_points, self.qmc_seed = qmc_points, qmc_seed
        self._cloud_points = None
        self.panel_width = check_number("panel_width", panel_width, gt=0, le=10)
        qmc_points = check_integer("qmc_points", qmc_points, ge=16)
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
        self.pi, self.s, self.mu, self.cov = (t(mixture.weights), t(mixture.signs),
                                              t(mixture.means), t(mixture.covs))
        self.members = t(np.eye(mixture.num_behaviors)[mixture.behavior])  # (C, K)
        self.pi_k = t(mixture.behavior_weights())  # (K,): Σ_{c ∈ k} π_c
        self.w0 = t(reference)
        self.u0 = self.w0[YES] - self.w0[NO]  # (d,)
        self.head = None if reward_head is None else t(check_finite_array(
            "reward_head", reward_head, tuple(self.w0.shape)))  # Φ (V, d): r(g, y) = φ_yᵀg
        if self.head is None and self.objective.data == "prompts":
            raise ParameterError("reward_head", None,
                                 f"is required by {self.objective.name!r}: a reward head Φ of "
                                 f"shape {tuple(self.w0.shape)}")
        self._context = None
        # context distillation: the offset c a prompt adds, and the prompted starting
        # policy's logits at the cloud (fix_start)
        self.offset = None if prompt_offset is None else t(check_finite_array(
            "prompt_offset", prompt_offset, (mixture.dim,)))
        if self.offset is None and self.objective.data == "context":
            raise ParameterError("prompt_offset", None, f"is required by {self.objective.name!r}"
                                 f": the offset c (length {mixture.dim}) a prompt adds")
        self._teacher = None
        # RL's reward per component: the task reward s_k φ_yᵀg (reward_scales), or the
        # advantage model's score once fix_start has seen the starting policy
        scales = (np.ones(mixture.num_behaviors) if reward_scales is None
                  else np.asarray(reward_scales, dtype=np.float64))
        if scales.shape != (mixture.num_behaviors,) or np.any(scales <= 0):
            raise ParameterError("reward_scales", scales.tolist(), f"must be "
                                 f"{mixture.num_behaviors} positive numbers, one per behavior")
        self.task_scale = t(scales[mixture.behavior])  # (C,): s_k of each component
        self.score_scale = self.task_scale.clone()  # (C,): what multiplies φ_yᵀg in training
        self.score_start = None  # the advantage model's starting policy (V, d)
        self._rl_mask = None  # selective rehearsal: 1 on RL's points (C, 1, M), fix_start
        # PPO-ptx's pretraining distribution (synthetic.pretrain.Pretraining): QMC points
        self.ptx_coef = float(self.hyper.get("ptx_coef", 0.0))
        if pretrain is None and self.ptx_coef > 0:
            raise ParameterError("objective.ptx_coef", self.ptx_coef, "needs a pretraining "
                                 "distribution ([pretrain] in the config)")
        self.pretrain = None
        if pretrain is not None:
            pretrain.check_vocab(self.w0.shape[0])
            cloud, tokens = pretrain.cloud(qmc_points, qmc_seed)
            self.pretrain = (cloud, torch.as_tensor(pretrain.weights), tokens)

        family = "gaussian" if mixture.family == "empirical" else mixture.family
        self.family = get_family(family)
        # principle-driven labels are a function of each point: quasi-Monte Carlo
        self.principles = mixture.principles
        self.exact = self.family.projection_rule() is not None and self.principles is None
        self._labels = None
        self._rules: dict[int, tuple[torch.Tensor, ...]] = {}
        self._rules_np: dict[int, tuple[np.ndarray, ...]] = {}
        # NumPy copies for the drift: a step is ~15 tiny float64 operations, and
        # NumPy dispatches them ~5× faster than torch (THEORY §6: the flow's cost).
        pi, sign = mixture.weights.astype(np.float64), mixture.signs.astype(np.float64)
        self._np = {
            "cov": np.asarray(mixture.covs, dtype=np.float64),  # (C, d, d)
            "s_mu": sign[:, None] * mixture.means,  # (C, d): s_c μ_c
            # −G π_c s_c μ_c (G the view's gain)
            "mean_term": -self.objective.gain * (pi * sign)[:, None] * mixture.means,
            "cov_term": -self.objective.gain * pi,  # −G π_c
        }
        # Diagonal covariances (the builder's isotropic behaviors): Σ_c θ is an
        # elementwise product, O(C d) instead of O(C d²), with the same numbers (the
        # matrix product only adds exact zeros)
        self._np["diag"] = mixture.diagonal_covs  # (C, d) or None
        self._diag = None if self._np["diag"] is None else torch.from_numpy(self._np["diag"])

        # QMC points and the reference policy at each point: log π0(Yes), log π0(No)
        # and log π0(any other token), for the rewards' log-partition shift.
        vocab = self.w0.shape[0]
        self.root = self.explain = None  # the exact family's: _exact_basis, on first use
        if self.exact:
            dims = vocab + 1
        else:
            dims = mixture.dim  # uniform: points g = μ_c + L_c z in full dimension
            vals, vecs = torch.linalg.eigh(self.cov)
            self.root = vecs * vals.clamp_min(0).sqrt()[:, None, :]  # (C, d, d): L Lᵀ = Σ
        self.z = _standard_points(self.family.name, dims, qmc_points, qmc_seed)  # (M, dims)
        self._reference_points = None  # (_reference_logps, on first use)
        # Two answers, a scale mixture and each component's own label: the policy's
        # log-partition and KL are one-dimensional expectations (_two_answer_terms)
        # and need no QMC points
        self.two_answers = self.exact and vocab == 2 and self.principles is None
        self._reference_softplus = None  # E_c[softplus(u0ᵀg)] (C,), on first use

    def _exact_basis(self) -> None:
        """The exact family's QMC basis, on first use: only the joint law of
        ``(W0 g, Δᵀg)`` matters, which given the scale ``w`` is Gaussian. With
        ``R_c R_cᵀ = W0 Σ_c W0ᵀ``, draw ``W0 g = W0 μ_c + √w R_c u`` and, at each ``Δ``,
        ``Δᵀg = Δᵀμ_c + √w (bᵀu + c e)`` with ``b = R_c⁺ W0 Σ_c Δ`` and
        ``c² = ΔᵀΣ_cΔ − ‖b‖²`` (the conditional law): ``V + 2`` Sobol dimensions,
        whatever ``d`` is. Sets :attr:`root` ``(C, V, V)`` and :attr:`explain`
        ``(C, V, d)`` = ``R⁺ W0 Σ_c``."""
        if self.root is not None:
            return
        cross = self.w0 @ self.cov  # (C, V, d): W0 Σ_c
        vals, vecs = torch.linalg.eigh(cross @ self.w0.T)  # W0 Σ_c W0ᵀ
        roots = vals.clamp_min(0).sqrt()
        inverse = torch.where(roots > 1e-12 * roots.amax(-1, keepdim=True).clamp_min(1e-300),
                              1 / roots.clamp_min(1e-300), torch.zeros_like(roots))
        self.explain = (vecs * inverse[:, None, :]).transpose(1, 2) @ cross
        self.root = vecs * roots[:, None, :]

    def _var(self, v: torch.Tensor) -> torch.Tensor:
        """``vᵀ Σ_c v`` ``(E, C)`` for vectors ``v`` ``(E, d)`` (an elementwise product
        for diagonal covariances)."""
        return (v * v) @ self._diag.T if self._diag is not None else _quadratic(self.cov, v)

    def _cross(self, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``vᵀ Σ_c w`` ``(E, C)`` for vectors ``v``, ``w`` ``(E, d)``."""
        if self._diag is not None:
            return (v * w) @ self._diag.T
        return torch.einsum("ecd,ed->ec", torch.einsum("cij,ej->eci", self.cov, w), v)

    def _reference_logps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The reference policy at every QMC point: ``log π0(Yes)``, ``log π0(No)`` and
        ``log π0(any other token)`` (``None`` for two answers), each ``(C, M)``; for the
        rewards' log-partition shift, computed on first use."""
        if self._reference_points is None:
            if self.exact:
                self._exact_basis()
            # W0 g_cm = W0 μ_c + (root_c z_m)[:V] (exact) or W0 L_c z_m (uniform)
            mixing = self.root if self.exact else self.w0 @ self.root  # (C, V, ·)
            logits0 = (self.mu @ self.w0.T)[:, None, :] + self.z[:, :mixing.shape[-1]] @ (
                mixing.transpose(1, 2))  # (C, M, V)
            log_pi0 = torch.log_softmax(logits0, dim=-1)  # (C, M, V): the reference policy
            others = torch.ones(self.w0.shape[0], dtype=torch.bool)
            others[[YES, NO]] = False
            rest = torch.logsumexp(log_pi0[..., others], dim=-1) if others.any() else None
            self._reference_points = (log_pi0[..., YES], log_pi0[..., NO], rest)
        return self._reference_points

    # ---------------------------------------------------------------- projections
    def _project(self, v: torch.Tensor) -> torch.Tensor:
        """``vᵀg`` at every QMC point of every component, shape ``(C, M)``, jointly
        with the reference logits at those points."""
        return self._project_many(v[None])[0]

    def _level(self, max_sd: float, scale: float | None = None) -> int:
        """Rule level for the largest margin standard deviation: panels of
        ``2^-level`` in units of ``Y``, the coarsest with ``2^-level·spread ≤
        panel_width`` (and at most 1); ``scale`` (default the objective's) turns a
        margin into logits."""
        spread = (self.scale if scale is None else scale) * max_sd
        return 0 if spread <= self.panel_width else math.ceil(math.log2(spread / self.panel_width))

    def _levels(self, max_sds: np.ndarray, scale: float | None = None) -> np.ndarray:
        """:meth:`_level` of every entry of ``max_sds`` at once (one at a time where one
        is not finite, so that :meth:`_level` raises its error)."""
        spread = (self.scale if scale is None else scale) * max_sds
        if not np.isfinite(spread).all():
            return np.array([self._level(float(sd), scale) for sd in max_sds], dtype=int)
        return np.where(spread <= self.panel_width, 0, np.ceil(np.log2(
            np.maximum(spread, self.panel_width) / self.panel_width))).astype(int)

    def _rule_at(self, level: int) -> tuple[np.ndarray, ...]:
        """``(y, p, p·q)`` of the projection rule with panels of ``2^-level``."""
        if level not in self._rules_np:
            y, p, q = self.family.projection_rule(2.0**-level)
            self._rules_np[level] = (y, p, p * q)
        return self._rules_np[level]

    def _graded(self, mean: np.ndarray, sd: np.ndarray,
                scale: float | None = None) -> tuple[np.ndarray, ...]:
        """Per-component rules ``(y, p, p·q)`` ``(C, J)`` for margins ``h = mean + sd·Y``
        whose logit spread ``scale·sd`` is past :data:`_GRADED_LEVEL`: fine panels
        (``panel_width`` logits wide) only where ``|scale·h| ≤ _SATURATED``, coarse
        ones elsewhere, so the node count no longer grows with β·sd
        (:meth:`synthetic.Family.graded_rule`)."""
        scale = self.scale if scale is None else scale
        sd = np.maximum(sd, 1e-300)
        low = (-_SATURATED / scale - mean) / sd
        high = (_SATURATED / scale - mean) / sd
        y, p, q = self.family.graded_rule(low, high, self.panel_width / (scale * sd))
        return y, p, p * q

    def _rule_for(self, mean: np.ndarray, sd: np.ndarray,
                  scale: float | None = None) -> tuple[np.ndarray, ...]:
        """The rule for margins ``h_c = mean_c + sd_c·Y`` ``(C,)``: the shared
        uniform one (``(J,)`` arrays) up to :data:`_GRADED_LEVEL`, a graded one per
        component (``(C, J)``) beyond, where a uniform rule would need
        ``160·2^level`` nodes (hundreds of millions at β = 10⁴)."""
        level = self._level(float(sd.max()) if sd.size else 0.0, scale)
        return (self._rule_at(level) if level <= _GRADED_LEVEL
                else self._graded(mean, sd, scale))

    def _rule_torch(self, level: int) -> tuple[torch.Tensor, ...]:
        """:meth:`_rule_at` as torch tensors."""
        if level not in self._rules:
            self._rules[level] = tuple(torch.as_tensor(a) for a in self._rule_at(level))
        return self._rules[level]

    # ---------------------------------------------------------------- dynamics
    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the objective's parameter ``θ``: ``(d,)`` for the difference
        view, ``(R, d)`` for the others (``R = V`` for the ``all`` view)."""
        d = self.mu.shape[1]
        if self.objective.view == "difference":
            return (d,)
        return (self.objective.rows or self.w0.shape[0], d)

    def drift(self, theta) -> torch.Tensor:
        """``F(θ)``: the population descent direction (minus the gradient times
        the view's gain), same shape as ``θ``."""
        if self.exact and self.objective.view == "difference":  # the DPO family: no reshaping
            return torch.from_numpy(self.drift_np(np.asarray(theta, dtype=np.float64)))
        theta = torch.as_tensor(np.asarray(theta, dtype=np.float64))
        if self.objective.data == "prompts" and self.exact_rlhf:
            return torch.from_numpy(self._drift_rlhf(theta.numpy())) + self._drift_ptx(theta)
        if self.objective.view == "all":
            return self._drift_all(theta) + self._drift_ptx(theta)
        rows = theta.reshape(-1, self.mu.shape[1])  # (R, d)
        signs = torch.as_tensor(self.objective.row_signs, dtype=torch.float64)[:, None]
        signed = rows * signs  # θ̃_r = σ_r θ_r: h_r = s θ̃_rᵀg
        if self.exact:
            out = np.stack([self.drift_np(v) for v in signed.numpy()])
            return (torch.from_numpy(out) * signs).reshape(theta.shape)
        out = torch.stack([self._drift_qmc(v) for v in signed])
        return (out * signs).reshape(theta.shape)

    def _drift_qmc(self, delta: torch.Tensor) -> torch.Tensor:
        """A margin row's drift for a family that is no scale mixture (QMC)."""
        beta, obj = self.beta, self.objective
        signs = self.point_signs()
        h = signs * self._project(delta)  # (C, M)
        g1 = signs * obj.grad(h, beta, **self.hyper)
        # mean over points of s ℓ'(h) g = μ_c mean(s ℓ') + L_c (zᵀ s ℓ')/M
        term = self.mu * g1.mean(1, keepdim=True) + torch.einsum(
            "cde,ce->cd", self.root, g1 @ self.z) / g1.shape[1]
        return -obj.gain * self.pi @ term

    def point_signs(self) -> torch.Tensor:
        """The observed sign at each QMC point ``(C, M)``: the component's ``s_c``, or
        the principle-driven judge's label of the point (:mod:`synthetic.principles`)."""
        if self.principles is None:
            return self.s[:, None].expand(-1, self.qmc_points)
        if self._labels is None:
            cloud = self._cloud().numpy()
            behavior = self.mixture.behavior
            self._labels = torch.as_tensor(np.stack([
                self.principles.labels(points, np.full(len(points), behavior[c]))
                for c, points in enumerate(cloud)]))
        return self._labels

    def drift_np(self, delta: np.ndarray) -> np.ndarray:
        """One margin row's drift for a scale-mixture family, in NumPy, ``(d,)`` →
        ``(d,)``: ``−G Σ_c π_c (s_c μ_c E[ℓ'(h_c)] + E[w ℓ''(h_c)] Σ_c θ)`` (Stein).
        The logistic family (DPO's) on a uniform rule takes :class:`_LogisticDrift`,
        the same numbers in fewer operations."""
        fast = self._logistic()
        if fast is not None:
            out = fast(self, delta)
            if out is not None:
                return out
        return self._drift_np_generic(delta)

    def _drift_np_generic(self, delta: np.ndarray) -> np.ndarray:
        """:meth:`drift_np` by the objective's derivatives at the rule's nodes (or its
        closed-form moments), for any scale-mixture objective and spread."""
        a = self._np
        cov_delta = a["cov"] @ delta if a["diag"] is None else a["diag"] * delta  # (C, d): Σ_c θ
        sd = np.sqrt(np.maximum(cov_delta @ delta, 0.0))  # (C,)
        mean = a["s_mu"] @ delta  # (C,): E[h_c]
        if self.objective.moments is not None:  # closed form (a kink: hinge)
            _, first, second = self.objective.moments(mean, sd, self.beta, self.family,
                                                      **self.hyper)
            return first @ a["mean_term"] + (a["cov_term"] * second) @ cov_delta
        y, p, pq = self._rule_for(mean, sd)
        points = mean[:, None] + sd[:, None] * y  # (C, J): h = s θᵀμ + sd·y
        first, second = self.objective.derivatives(points, self.beta, **self.hyper)
        # constants −G π_c s_c μ_c and −G π_c folded in at set-up
        return _against(first, p) @ a["mean_term"] + (
            a["cov_term"] * _against(second, pq)) @ cov_delta

    def _logistic(self) -> _LogisticDrift | None:
        """The fast drift of a logistic-family objective, built on first use (kept in
        ``_np``, which the β-copies of :func:`population_descent_many` share), or
        ``None`` for other objectives."""
        if "logistic" not in self._np:
            offset = _logistic_offset(self.objective, self.hyper) if self.exact else None
            self._np["logistic"] = None if offset is None else _LogisticDrift(self, offset)
        return self._np["logistic"]

    def drift_np_many(self, deltas: np.ndarray, betas: np.ndarray) -> np.ndarray:
        """:meth:`drift_np` for ``P`` configurations at once: ``deltas`` ``(P, d)``, one
        ``β`` each ``(P,)`` → ``(P, d)``. The per-step work is the same dozen NumPy
        operations whatever ``P`` is (the flow's step is per-operation overhead at
        these sizes, THEORY §6), on one rule fine enough for the largest spread;
        ``None`` where that spread needs graded rules (then step one at a time)."""
        a, obj = self._np, self.objective
        diag = a["diag"]
        if diag is None:
            cov_delta = (a["cov"] @ deltas.T).transpose(2, 0, 1)  # (P, C, d): Σ_c Δ_p
            var = (cov_delta * deltas[:, None]).sum(-1)
        else:  # Σ_c Δ_p = diag_c ⊙ Δ_p, never formed: Δᵀ Σ_c Δ = (Δ ⊙ Δ)·diag_c
            var = np.dot(deltas * deltas, diag.T)
        sd = np.sqrt(np.maximum(var, 0.0))  # (P, C)
        mean = np.dot(deltas, a["s_mu"].T)  # (P, C)
        beta = np.asarray(betas, dtype=np.float64)[:, None]  # (P, 1)
        if obj.moments is not None:
            _, first, second = obj.moments(mean, sd, beta, self.family, **self.hyper)
        else:
            scale = beta[:, 0] if obj.uses_beta else np.ones(len(deltas))
            spread = float((scale * sd.max(1)).max()) if sd.size else 0.0
            level = (0 if spread <= self.panel_width
                     else math.ceil(math.log2(spread / self.panel_width)))
            if level > _GRADED_LEVEL:
                return None
            fast = self._logistic()
            if fast is not None:
                first, second = fast.expectations(self, level, mean, sd, scale)
            else:
                y, p, pq = self._rule_at(level)
                points = mean[..., None] + sd[..., None] * y  # (P, C, J)
                d1, d2 = obj.derivatives(points, beta[..., None], **self.hyper)
                first, second = d1 @ p, d2 @ pq  # (P, C)
        weights = a["cov_term"] * second  # (P, C)
        out = np.dot(first, a["mean_term"])
        if diag is None:
            return out + (weights[:, None, :] @ cov_delta)[:, 0]
        return out + np.dot(weights, diag) * deltas

    def _cloud(self) -> torch.Tensor:
        """Scrambled Sobol points of every component in the full dimension,
        ``g = μ_c + L_c z`` ``(C, M, d)``: the ``all`` view's expectations over the
        joint law of all ``V`` logits (quasi-Monte Carlo where the vocabulary
        forces it)."""
        if self._cloud_points is None:
            d = self.mu.shape[1]
            z = _standard_points(self.family.name, d, self.qmc_points, self.qmc_seed)
            vals, vecs = torch.linalg.eigh(self.cov)
            root = vecs * vals.clamp_min(0).sqrt()[:, None, :]  # (C, d, d): L Lᵀ = Σ
            self._cloud_points = self.mu[:, None, :] + z @ root.transpose(1, 2)
        return self._cloud_points

    def _cloud_logits(self, theta: torch.Tensor):
        """Logits ``(W0 + D) g`` ``(C, V, M)`` at the cloud, and each component's
        chosen answer ``(C, 1, 1)`` broadcastable against them."""
        cloud = self._cloud()
        logits = ((self.w0 + theta) @ cloud.transpose(1, 2))  # (C, V, M)
        chosen = torch.where(self.point_signs() > 0, YES, NO)[:, None, :]  # (C, 1, M)
        return logits, chosen

    @property
    def exact_rlhf(self) -> bool:
        """Whether the RL drift is exact (two answers, Gaussian classes): see
        :meth:`_drift_rlhf`; otherwise it is QMC over the cloud."""
        return (self.w0.shape[0] == 2 and self.family.name == "gaussian"
                and self.hyper.get("rehearsal", "none") == "none")

    def _drift_rlhf(self, theta: np.ndarray) -> np.ndarray:
        """The exact policy gradient of ``J`` for two answers (THEORY §3.1), ``(2, d)``.

        With ``x = aᵀg`` (``a = u0 + Δ``) the log-odds of Yes, ``p = σ(x)``, ``y = bᵀg``
        (``b = ψ − βΔ``, ``ψ = φ_Yes − φ_No``) and ``f = p(1−p)``, the gradient on the
        Yes row is ``E[f(x) y g] = −`` that on the No row. For ``g ~ N(μ, Σ)`` Stein's
        lemma gives ``μ E[f y] + Σa E[f' y] + Σb E[f]``, and since ``y`` is Gaussian
        and linear given ``x``, ``E[φ(x) y] = m_y E[φ] + c_xy E[φ']`` (``m_y = bᵀμ``,
        ``c_xy = aᵀΣb``, Stein once more): every term is a one-dimensional expectation
        over ``x`` of ``f``, ``f' = f(1−2p)`` or ``f'' = f(1−6p+6p²)``, on the
        projection rule at logit resolution.
        """
        delta = theta[YES] - theta[NO]
        a = self.u0.numpy() + delta
        psi = (self.head[YES] - self.head[NO]).numpy()
        b = self.score_scale.numpy()[:, None] * psi - self.beta * delta  # (C, d): per component
        mu, cov = self.mu.numpy(), self._np["cov"]
        cov_a, cov_b = cov @ a, np.einsum("cij,cj->ci", cov, b)  # (C, d)
        mean_x, mean_y = mu @ a, (mu * b).sum(-1)  # (C,)
        sd = np.sqrt(np.maximum((cov_a * a).sum(-1), 0.0))
        cross = (cov_a * b).sum(-1)  # (C,): c_xy
        y, p, _ = self._rule_for(mean_x, sd, scale=1.0)
        x = mean_x[:, None] + sd[:, None] * y
        prob = special.expit(x)
        f = prob * (1 - prob)
        f1 = f * (1 - 2 * prob)
        f2 = f * (1 - 6 * prob + 6 * prob**2)
        e0, e1, e2 = (_against(v, p) for v in (f, f1, f2))  # (C,)
        per_c = (mu * (mean_y * e0 + cross * e1)[:, None] + cov_a * (mean_y * e1 + cross * e2)[
            :, None] + cov_b * e0[:, None])  # (C, d): E_c[f y g]
        grad = self.pi.numpy() @ per_c
        return np.stack([grad, -grad])  # ascent on J = descent on ℓ = −J

    def _pretrain_logits(self, weights: torch.Tensor):
        """Logits ``(E, C, V, M)`` of policies ``weights`` ``(E, V, d)`` at the pretraining
        points, with the tokens ``(C, 1, 1)`` broadcastable against them."""
        cloud, _, tokens = self.pretrain
        logits = torch.einsum("evd,cmd->ecvm", weights, cloud)
        return logits, tokens.reshape(-1, 1, 1).expand(-1, 1, cloud.shape[1])

    def _drift_ptx(self, theta: torch.Tensor) -> torch.Tensor | float:
        """PPO-ptx: ``−γ Σ_c w_c E_c[(π − e_y) gᵀ]`` on every row (0 without it)."""
        if self.ptx_coef == 0:
            return 0.0
        cloud, weights, _ = self.pretrain
        logits, tokens = self._pretrain_logits((self.w0 + theta)[None])
        coef = OBJECTIVES["sft"].logit_grad(logits[0], tokens)  # (C, V, M)
        per_c = coef @ cloud / cloud.shape[1]  # (C, V, d)
        return -self.ptx_coef * torch.einsum("c,cvd->vd", weights, per_c)

    def mean_kl(self, theta) -> float:
        """``E_g KL(π(·|g) ‖ π0(·|g))`` of the policy ``W0 + D`` (the ``all`` view's ``θ``)
        over the mixture, by QMC: what a rollout's sampled KL estimates."""
        logits, _ = self._cloud_logits(torch.as_tensor(np.asarray(theta, dtype=np.float64)))
        logp = torch.log_softmax(logits, dim=1)
        logp0 = torch.log_softmax(self.w0 @ self._cloud().transpose(1, 2), dim=1)
        per_c = (logp.exp() * (logp - logp0)).sum(1).mean(-1)  # (C,)
        return float(self.pi @ per_c)

    def pretrain_loss(self, thetas) -> np.ndarray:
        """The alignment tax ``E_pretrain[−log π(y|g)]`` at each of ``thetas`` ``(E,
        *shape)``: ``(E,)``; the policy is the reference (with the Yes/No difference
        added for a policy-difference view, every row for the ``all`` view)."""
        thetas = torch.as_tensor(np.asarray(thetas, dtype=np.float64)).reshape(
            (-1,) + self.shape)
        weights = self.w0.expand(len(thetas), -1, -1).clone()
        if self.objective.block == "policy" and self.objective.view == "difference":
            weights[:, YES] += thetas / 2
            weights[:, NO] -= thetas / 2
        elif self.objective.block == "policy":
            weights += thetas
        _, mix, _ = self.pretrain
        out = []
        for w in weights:  # one policy at a time: (C, V, M) values
            logits, tokens = self._pretrain_logits(w[None])
            loss = OBJECTIVES["sft"].logit_loss(logits[0], tokens).mean(-1)  # (C,)
            out.append(float(mix @ loss))
        return np.array(out)

    def _cloud_context(self) -> dict:
        """What an objective on prompts reads at the cloud: reference logits and
        rewards ``(C, V, M)``, and ``β``; context distillation: the teacher's logits."""
        if self.objective.data == "context":
            if self._teacher is None:
                self.fix_start(np.zeros(tuple(self.w0.shape)))
            return {"teacher": self._teacher}
        if self.objective.data != "prompts":
            return {}
        if self._context is None:
            cloud_t = self._cloud().transpose(1, 2)
            task = (self.head @ cloud_t) * self.task_scale[:, None, None]  # (C, V, M)
            rewards = task
            if self.score_start is not None:  # (task − b(g))/σ_k, b under the start policy
                probs = torch.softmax((self.w0 + self.score_start) @ cloud_t, dim=1)
                base = (probs * task).sum(1, keepdim=True)
                rewards = (task - base) * (self.score_scale / self.task_scale)[:, None, None]
            self._context = {"reference": self.w0 @ cloud_t, "rewards": rewards}
        return {**self._context, "beta": self.beta}

    def fix_start(self, start) -> None:
        """What RL fixes at the phase's starting policy ``start`` ``(V, d)`` (QMC):

        * the advantage model (``score = "advantage"``): RL maximises ``(s_k φ_yᵀg −
          b(g))/σ_k``, ``b(g) = E_{π_start}[s_k φ_yᵀg]``, ``σ_k² = E_{g∈k}
          Var_{π_start}[s_k φ_yᵀg]``;
        * selective rehearsal: the prompts with ``b(g) < select_below`` (not yet
          answered well) are RL's, the others rehearse the demonstrations.

        Context distillation: the teacher, ``(W0 + start)(g + c)`` at the cloud.

        A no-op for other objectives and for the raw reward without rehearsal."""
        if self.objective.data == "context":
            start = torch.as_tensor(np.asarray(start, dtype=np.float64)).reshape(self.w0.shape)
            self._teacher = (self.w0 + start) @ (self._cloud() + self.offset).transpose(1, 2)
            return
        if self.objective.data != "prompts":
            return
        start = torch.as_tensor(np.asarray(start, dtype=np.float64)).reshape(self.w0.shape)
        cloud_t = self._cloud().transpose(1, 2)
        task = (self.head @ cloud_t) * self.task_scale[:, None, None]  # (C, V, M)
        probs = torch.softmax((self.w0 + start) @ cloud_t, dim=1)
        if self.hyper.get("rehearsal", "none") == "selective":
            below = (probs * task).sum(1, keepdim=True) < self.hyper["select_below"]
            self._rl_mask = below.to(torch.float64)  # (C, 1, M)
            self._context = None
        if self.hyper.get("score") != "advantage":
            return
        var = ((probs * task**2).sum(1) - (probs * task).sum(1) ** 2).clamp_min(0).mean(-1)
        per_k = (var * self.pi) @ self.members / self.pi_k  # (K,): E_{g∈k} Var_y
        sigma = per_k.sqrt().clamp_min(1e-12) @ self.members.T  # (C,)
        self.score_scale = self.task_scale / sigma
        self.score_start, self._context = start, None

    def _rehearsed(self, value, logits, chosen, sft):
        """Selective rehearsal: RL's ``value`` on its prompts, ``γ_r ×`` the imitation
        term ``sft(logits, chosen)`` on the others (unchanged without rehearsal)."""
        if self.hyper.get("rehearsal", "none") != "selective":
            return value
        if self._rl_mask is None:  # no start fixed: the reference
            self.fix_start(np.zeros(tuple(self.w0.shape)))
        mask = self._rl_mask if value.dim() == 3 else self._rl_mask[:, 0]
        return value * mask + (1 - mask) * self.hyper["rehearsal_coef"] * sft(logits, chosen)

    def _drift_all(self, theta: torch.Tensor) -> torch.Tensor:
        """``−Σ_c π_c E_c[∂ℓ/∂logits gᵀ]`` ``(V, d)`` by QMC over the cloud."""
        logits, chosen = self._cloud_logits(theta)
        coef = self.objective.logit_grad(logits, chosen, **self._cloud_context())  # (C, V, M)
        coef = self._rehearsed(coef, logits, chosen, OBJECTIVES["sft"].logit_grad)
        cloud = self._cloud()
        per_c = coef @ cloud / cloud.shape[1]  # (C, V, d)
        return -self.objective.gain * torch.einsum("c,cvd->vd", self.pi, per_c)

    def _project_many(self, v: torch.Tensor) -> torch.Tensor:
        """``vᵀg`` for several vectors ``v`` ``(E, d)``: ``(E, C, M)``, one matrix
        product with the mean term added in it."""
        num, comps = v.shape[0], self.mu.shape[0]
        offset = (v @ self.mu.T).reshape(-1, 1)  # (E·C, 1): vᵀμ_c
        if self.exact:
            # vᵀg = vᵀμ_c + [b, c]ᵀ z[:, :V+1] with b = R_c⁺ W0 Σ_c v, c² = vᵀΣ_c v − ‖b‖²
            self._exact_basis()
            b = torch.einsum("cvd,ed->ecv", self.explain, v)  # (E, C, V)
            c = (self._var(v) - (b * b).sum(-1)).clamp_min(0).sqrt()
            loads = torch.cat([b, c[..., None]], -1)  # (E, C, V+1)
            basis = self.z[:, :loads.shape[-1]]
        else:
            loads = torch.einsum("cij,ei->ecj", self.root, v)  # (E, C, d): L_cᵀ v
            basis = self.z
        return torch.addmm(offset, loads.reshape(num * comps, -1), basis.T).reshape(
            num, comps, -1)

    def metrics_many(self, thetas, chunk_elements: int = 2**19
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-behavior metrics ``(E, K)`` and weight changes ``(E,)`` at each of
        ``thetas`` ``(E, *shape)``, in chunks of about ``chunk_elements`` QMC values."""
        thetas = torch.as_tensor(np.asarray(thetas, dtype=np.float64)).reshape(
            (-1,) + self.shape)
        # QMC metrics hold (E, C, M) values a chunk; the two-answer path's quadrature
        # bounds its own memory (_expect), so it takes every row at once
        one_dim = (self.two_answers and self.objective.view == "difference"
                   and self.objective.block == "policy")
        size = max(1, len(thetas) if one_dim
                   else chunk_elements // max(1, self.mu.shape[0] * self.qmc_points))
        parts = [self._metrics_chunk(thetas[i:i + size]) for i in range(0, len(thetas), size)]
        if not parts:
            return ({name: torch.zeros(0, len(self.pi_k), dtype=torch.float64)
                     for name in BEHAVIOR_METRICS}, torch.zeros(0, dtype=torch.float64))
        out = {name: torch.cat([part[0][name] for part in parts]) for name in parts[0][0]}
        return out, torch.cat([part[1] for part in parts])

    def metrics(self, theta) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-behavior metrics ``(K,)`` and the weight change at one ``θ``."""
        out, change = self.metrics_many(torch.as_tensor(np.asarray(theta))[None])
        return {name: value[0] for name, value in out.items()}, change[0]

    def _metrics_chunk(self, thetas: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        obj = self.objective
        if obj.view == "all":
            per_c, change = self._metrics_all(thetas)
        elif obj.block == "policy":
            per_c = self._metrics_policy(thetas)
            change = thetas.norm(dim=-1) / _SQRT2
        else:
            per_c = self._metrics_reward(thetas.reshape(len(thetas), -1, self.mu.shape[1]))
            change = torch.zeros(len(thetas), dtype=torch.float64)
        # against the true preference: a component whose observed sign is flipped ranks
        # correctly exactly when it ranks wrongly against its observed sign (ties half)
        if "clean_accuracy" not in per_c:
            flipped = torch.as_tensor(self.mixture.true_signs != self.mixture.signs)
            per_c["clean_accuracy"] = torch.where(flipped, 1 - per_c["accuracy"],
                                                  per_c["accuracy"])
        weights = self.members * self.pi[:, None] / self.pi_k  # (C, K): within-behavior shares
        return {name: value @ weights for name, value in per_c.items()}, change

    def _expect(self, values, mean: torch.Tensor, sds: torch.Tensor,
                scale: float | None = None) -> torch.Tensor:
        """``E[f(h)]`` ``(F, E, C)`` for margins ``h = mean + sd·Y`` ``(E, C)`` on the
        family's projection rule, where ``values(points, y)`` gives the ``F`` integrands
        ``(F, …, J)`` at the points ``(…, J)`` (``y`` the rule's nodes, broadcast
        alike); ``scale`` (default the objective's) turns a margin into logits, which
        sets the rule's resolution. A wide spread takes a graded rule per row; the
        uniform rules' points are formed a few rows at a time, so memory stays under
        :data:`_POINTS_PER_CHUNK` values whatever the spread."""
        out = None
        levels = self._levels(sds.amax(1).numpy(), scale)
        if len(levels) and levels.max() <= _GRADED_LEVEL:
            # every row on the finest rule any row needs, in one chunk, when that is small
            # (a finer rule only shrinks a row's quadrature error, ~1e-13) or all rows
            # share the rule: no per-level indexing
            y, p, _ = self._rule_torch(int(levels.max()))
            points = mean.numel() * len(y)
            if points <= _SHARED_RULE_POINTS or (levels.min() == levels.max()
                                                 and points <= _POINTS_PER_CHUNK):
                return (values(torch.addcmul(mean[..., None], sds[..., None], y), y) * p).sum(-1)
        for e in np.flatnonzero(levels > _GRADED_LEVEL):  # one graded rule per row
            y, p, _ = (torch.from_numpy(a) for a in self._graded(mean[e].numpy(),
                                                                  sds[e].numpy(), scale))
            got = values(mean[e, :, None] + sds[e, :, None] * y, y)
            if out is None:
                out = torch.empty((len(got),) + tuple(mean.shape), dtype=torch.float64)
            out[:, e] = (got * p).sum(-1)
        for level in np.unique(levels[levels <= _GRADED_LEVEL]):  # one shared rule
            which = np.flatnonzero(levels == level)
            y, p, _ = self._rule_torch(int(level))
            size = max(1, _POINTS_PER_CHUNK // (mean.shape[1] * len(y)))
            for start in range(0, len(which), size):
                idx = torch.from_numpy(which[start:start + size])
                got = values(torch.addcmul(mean[idx, :, None], sds[idx, :, None], y), y)
                if out is None:
                    out = torch.empty((len(got),) + tuple(mean.shape), dtype=torch.float64)
                out[:, idx] = got @ p
        return out

    def _expected_loss(self, rows: torch.Tensor) -> torch.Tensor:
        """``Σ_r E_c[ℓ(h_r)]`` ``(E, C)`` for signed rows ``θ̃`` ``(E, R, d)``."""
        obj, total = self.objective, 0
        for r in range(rows.shape[1]):
            v = rows[:, r]
            if not self.exact:
                total = total + obj.loss(self.point_signs() * self._project_many(v),
                                         self.beta, **self.hyper).mean(-1)
                continue
            mean = self.s * (v @ self.mu.T)  # (E, C): E[h] per component
            sds = self._var(v).clamp_min(0).sqrt()  # (E, C)
            if obj.moments is not None:
                loss = torch.as_tensor(obj.moments(mean.numpy(), sds.numpy(), self.beta,
                                                   self.family, **self.hyper)[0])
            elif len(v) == 0:
                loss = torch.zeros_like(mean)
            else:
                loss = self._expect(lambda h, _: obj.loss(h, self.beta, **self.hyper)[None],
                                    mean, sds)[0]
            total = total + loss
        return total

    def _positive_of(self, v: torch.Tensor, truth: bool = False) -> torch.Tensor:
        """``P(s vᵀg > 0)`` per component ``(E, C)`` for vectors ``v`` ``(E, d)``
        (ties half): the family's CDF, or QMC for a family that has none. ``truth``:
        against the true class where a judge's labels are the observed ones."""
        if self.exact:
            return self._positive(self.s * (v @ self.mu.T), self._var(v))
        signs = self.s[:, None] if truth else self.point_signs()
        return tie_half(signs * self._project_many(v)).mean(-1)

    def _accuracy(self, per_c: dict, v: torch.Tensor) -> None:
        """``accuracy`` of the ranking direction ``v`` ``(E, d)``, and with a judge's
        labels also ``clean_accuracy`` against the true classes."""
        per_c["accuracy"] = self._positive_of(v)
        if self.principles is not None:
            per_c["clean_accuracy"] = self._positive_of(v, truth=True)

    def _metrics_policy(self, deltas: torch.Tensor) -> dict[str, torch.Tensor]:
        """The policy's difference ``Δ`` ``(E, d)`` (DPO family)."""
        beta, per_c = self.beta, {}
        per_c["loss"] = self._expected_loss(deltas[:, None])
        self._accuracy(per_c, self.u0 + deltas)
        per_c["reward_accuracy"] = self._positive_of(deltas)
        # the rewards are β(±E[h]/2 − E[shift]) with the log-partition shift
        # log Z − log Z0 = log(π0(Yes) e^{Δᵀg/2} + π0(No) e^{−Δᵀg/2} + π0(rest)), E[h] in
        # closed form
        if self.two_answers:
            mean = self.s * (deltas @ self.mu.T)  # (E, C): E[h] per component
            mean_shift, per_c["objective/kl"] = self._two_answer_terms(deltas)
        else:  # at the QMC points
            proj = self._project_many(deltas)  # (E, C, M): Δᵀg
            mean = (self.s * (deltas @ self.mu.T) if self.principles is None
                    else (self.point_signs() * proj).mean(-1))
            log_yes, log_no, log_rest = self._reference_logps()
            yes = torch.add(log_yes, proj, alpha=0.5)
            no = torch.add(log_no, proj, alpha=-0.5)
            shift = torch.logaddexp(yes, no)
            if log_rest is not None:
                torch.logaddexp(shift, log_rest, out=shift)
            mean_shift = shift.mean(-1)
            # KL(π ‖ π0) = (π(Yes) − π(No))·Δᵀg/2 − shift at each point
            per_c["objective/kl"] = ((torch.exp(yes - shift) - torch.exp(no - shift)) * proj
                                     / 2 - shift).mean(-1)
        per_c["rewards/chosen"] = beta * (mean / 2 - mean_shift)
        per_c["rewards/rejected"] = beta * (-mean / 2 - mean_shift)
        per_c["rewards/margins"] = beta * mean
        return per_c

    def _logistic_moments(self, mean: torch.Tensor, sds: torch.Tensor) -> torch.Tensor:
        """``E[softplus(u)]``, ``E[σ(u)]`` and ``E[Y σ(u)]`` ``(3, E, C)`` for logit gaps
        ``u = mean + sd·Y`` ``(E, C)``, on the projection rule at logit scale 1."""

        def values(u, y):
            sigma = torch.sigmoid(u)
            # softplus within e^-40 of u past 40: below an ulp of u
            return torch.stack([torch.nn.functional.softplus(u, threshold=40.0), sigma,
                                y * sigma])

        return self._expect(values, mean, sds, scale=1.0)

    def _two_answer_terms(self, deltas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean log-partition shift and ``KL(π ‖ π0)`` ``(E, C)`` of two answers on a
        scale mixture, as one-dimensional expectations of the policy's logit gap.

        With ``a = u0ᵀg`` (the reference's gap), ``x = Δᵀg`` and ``u = a + x``:
        ``log Z − log Z0 = softplus(u) − softplus(a) − x/2`` and
        ``KL = σ(u)·x − softplus(u) + softplus(a)``. Given the scale ``w``, ``(x, u)``
        is Gaussian with covariance ``w·[ΔᵀΣΔ, ΔᵀΣu; ·, uᵀΣu]``, so
        ``E[x | u] = E[x] + (ΔᵀΣu / uᵀΣu)(u − E[u])`` whatever ``w`` is, and
        ``E[σ(u) x] = E[x] E[σ(u)] + (ΔᵀΣu / sd_u) E[Y σ(u)]`` with ``u = E[u] + sd_u Y``.
        """
        policy = self.u0 + deltas  # (E, d): the policy's Yes − No row
        fresh = self._reference_softplus is None  # with the reference's row, in one evaluation
        rows = torch.cat([self.u0[None], policy]) if fresh else policy
        sd_u = self._var(rows).clamp_min(0).sqrt()  # (E, C)
        soft, sigma, y_sigma = self._logistic_moments(rows @ self.mu.T, sd_u)
        if fresh:
            self._reference_softplus = soft[0]
            soft, sigma, y_sigma, sd_u = soft[1:], sigma[1:], y_sigma[1:], sd_u[1:]
        moved = deltas @ self.mu.T  # (E, C): E[x]
        cross = self._cross(deltas, policy)  # ΔᵀΣ_c u
        # sd_u = 0 makes u constant and ΔᵀΣu = 0 (Cauchy–Schwarz): no regression term
        slope = torch.where(sd_u > 0, cross / sd_u.clamp_min(1e-300), torch.zeros_like(sd_u))
        sigma_x = moved * sigma + slope * y_sigma  # E[σ(u) x]
        shift = soft - self._reference_softplus - moved / 2
        return shift, sigma_x - soft + self._reference_softplus

    def _metrics_reward(self, thetas: torch.Tensor) -> dict[str, torch.Tensor]:
        """A reward head ``(E, R, d)``: R = 1 the difference ``ψ`` (rewards ``±h/2``),
        R = 2 the rows Yes and No (see :class:`dynamics.simulate._Evaluator`)."""
        signs = torch.as_tensor(self.objective.row_signs, dtype=torch.float64)[:, None]
        signed = thetas * signs  # θ̃_r: h_r = s θ̃_rᵀg
        psi = signed.sum(1)  # ψ = φ_Yes − φ_No, whose margin s ψᵀg = Σ_r h_r
        if self.principles is None:
            margin = self.s * (psi @ self.mu.T)  # (E, C): E[r(y_w) − r(y_l)]
            means = self.s * torch.einsum("erd,cd->erc", signed, self.mu)  # (E, R, C): E[h_r]
            chosen = margin / 2 if thetas.shape[1] == 1 else torch.where(
                self.s > 0, means[:, 0], means[:, 1])
        else:  # the judge's label at each point picks the chosen answer
            signs = self.point_signs()
            margin = (signs * self._project_many(psi)).mean(-1)
            if thetas.shape[1] == 1:
                chosen = margin / 2
            else:
                yes, no = self._project_many(thetas[:, 0]), self._project_many(thetas[:, 1])
                chosen = torch.where(signs > 0, yes, no).mean(-1)
        per_c = {
            "loss": self._expected_loss(signed),
            "reward_accuracy": self._positive_of(psi),
            "rewards/chosen": chosen,
            "rewards/rejected": chosen - margin,
            "rewards/margins": margin,
        }
        self._accuracy(per_c, self.u0[None])
        per_c["accuracy"] = per_c["accuracy"].expand_as(margin)
        if "clean_accuracy" in per_c:
            per_c["clean_accuracy"] = per_c["clean_accuracy"].expand_as(margin)
        return per_c

    def _metrics_all(self, thetas: torch.Tensor):
        """Every row of the policy ``D`` ``(E, V, d)``: loss and rewards by QMC over
        the cloud, accuracies from the Yes − No difference."""
        cloud = self._cloud()
        logits0 = self.w0 @ cloud.transpose(1, 2)  # (C, V, M)
        log_pi0 = torch.log_softmax(logits0, dim=1)
        rows = {name: [] for name in BEHAVIOR_METRICS}
        chosen_is_yes = self.point_signs() > 0  # (C, M)
        context = self._cloud_context()
        for theta in thetas:
            logits, chosen = self._cloud_logits(theta)
            loss = self.objective.logit_loss(logits, chosen, **context)
            loss = self._rehearsed(loss, logits, chosen, OBJECTIVES["sft"].logit_loss)
            rows["loss"].append(loss.mean(-1))
            ratio = torch.log_softmax(logits, dim=1) - log_pi0  # (C, V, M): log π/π0
            probs = torch.softmax(logits, dim=1)
            rows.setdefault("objective/kl", []).append((probs * ratio).sum(1).mean(-1))
            if self.head is not None:
                task = (self.head @ cloud.transpose(1, 2)) * self.task_scale[:, None, None]
                scores = (probs * task).sum(1).mean(-1)
                rows.setdefault("objective/scores", []).append(scores)
                rows.setdefault("objective/rlhf_reward", []).append(
                    scores - self.beta * rows["objective/kl"][-1])
            yes, no = ratio[:, YES], ratio[:, NO]  # (C, M)
            rows["rewards/chosen"].append(
                self.beta * torch.where(chosen_is_yes, yes, no).mean(-1))
            rows["rewards/rejected"].append(
                self.beta * torch.where(chosen_is_yes, no, yes).mean(-1))
        per_c = {name: torch.stack(v) for name, v in rows.items() if v}
        per_c["rewards/margins"] = per_c["rewards/chosen"] - per_c["rewards/rejected"]
        deltas = thetas[:, YES] - thetas[:, NO]  # (E, d): the policy's Yes − No change
        self._accuracy(per_c, self.u0 + deltas)
        per_c["reward_accuracy"] = self._positive_of(deltas)
        return per_c, thetas.flatten(1).norm(dim=-1)

    def _positive(self, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """``P(X > 0)`` (ties half) for ``X = mean + √var·Y``, per component."""
        sd = var.clamp_min(0).sqrt()
        ratio = torch.where(sd > 0, mean / sd.clamp_min(1e-300), torch.sign(mean) * torch.inf)
        ratio = torch.where((sd == 0) & (mean == 0), torch.zeros_like(ratio), ratio)
        return torch.as_tensor(self.family.projection_cdf(ratio.numpy()))


def _quadratic(cov: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``vᵀ Σ_c v`` for covariances ``(C, d, d)`` and vectors ``(E, d)``: ``(E, C)``."""
    return torch.einsum("ecd,ed->ec", torch.einsum("cij,ej->eci", cov, v), v)


def population_descent(
    mixture: Mixture,
    *,
    beta: float,
    lr: float,
    steps: int,
    reference: np.ndarray,
    objective="dpo",
    delta0: np.ndarray | None = None,
    continuous: bool = False,
    eval_every: int = 1,
    train_mixture: Mixture | None = None,
    **flow_options,
) -> PopulationTrajectory:
    """Population gradient descent with step ``lr`` (or the continuous flow).

    Returns ``θ`` and the metrics at ``step = 0, eval_every, …, steps`` (the
    last step always included); ``t = lr·step``. ``objective`` is a name or a
    table with hyperparameters; ``delta0`` (default 0: the policy at the
    reference, a reward head at zero) sets ``θ`` at step 0, shaped like
    :attr:`PopulationFlow.shape`. ``train_mixture`` (default ``mixture``) is the
    population trained on, e.g. a subset of the behaviors; the metrics are those
    of ``mixture``.
    """
    lr = check_number("lr", lr, gt=0)
    steps = check_integer("steps", steps, ge=1)
    eval_every = check_integer("eval_every", eval_every, ge=1)
    flow = PopulationFlow(mixture, beta=beta, reference=reference, objective=objective,
                          **flow_options)
    trainer = flow if train_mixture is None else PopulationFlow(
        train_mixture, beta=beta, reference=reference, objective=objective, **flow_options)
    record = np.unique(np.r_[np.arange(0, steps + 1, eval_every), steps])
    shape = flow.shape
    start = np.zeros(shape) if delta0 is None else np.asarray(delta0, dtype=np.float64)
    if start.shape != shape:
        raise ParameterError("delta0", start.shape, f"must have shape {shape}")
    for f in {id(flow): flow, id(trainer): trainer}.values():
        f.fix_start(start)  # the advantage model's σ_k and b(g) at the phase's start
    # PPO makes ppo_epochs × num_minibatches updates of lr per rollout: its theory is the
    # exact flow taking as many steps per recorded step (the limit of unbounded rollouts
    # and small steps, where the ratio stays near 1 and nothing is clipped)
    hyper = trainer.hyper
    updates = (hyper["ppo_epochs"] * hyper["num_minibatches"]
               if hyper.get("estimator") == "ppo" else 1)
    if trainer.objective.view == "difference" and trainer.exact:
        step = trainer.drift_np  # the DPO family's fast path: NumPy, no reshaping
    else:
        step = lambda v: trainer.drift(v.reshape(shape)).numpy().reshape(-1)  # noqa: E731
    if continuous:
        sol = integrate.solve_ivp(
            lambda _, y: step(y), (0.0, lr * updates * steps), start.reshape(-1),
            t_eval=lr * updates * record,
            method="DOP853", rtol=1e-10, atol=1e-12,
        )
        if not sol.success:
            raise RuntimeError(f"population flow ODE failed: {sol.message}")
        deltas = sol.y.T.copy()
    elif (step == trainer.drift_np and updates == 1 and hyper.get("kl_target", 0.0) == 0
          and trainer._logistic() is not None):
        # the logistic family's descent on buffers allocated once (_LogisticDrift.descend)
        deltas = trainer._logistic().descend(trainer, start.reshape(-1), lr, steps, record)
    else:
        kept, wanted, coefs = [], set(record.tolist()), []
        current = start.reshape(-1).copy()
        adaptive = hyper.get("kl_target", 0.0) > 0
        used = np.nan  # the KL coefficient of the update that led here (as the simulation's)
        for k in range(steps + 1):
            if k in wanted:
                kept.append(current.copy())
                coefs.append(used)
            if k == steps:
                break
            used = trainer.beta
            kl = trainer.mean_kl(current.reshape(shape)) if adaptive else None
            for _ in range(updates):
                current = current + lr * step(current)
            if adaptive:  # the controller after each rollout, on its starting policy's KL
                trainer.beta = trainer.beta * adapt_kl(kl, hyper["kl_target"],
                                                       hyper["kl_horizon"])
        trainer.beta = beta  # the metrics are on train.beta's scale
        deltas = np.stack(kept)
    deltas = deltas.reshape((len(record),) + shape)
    metrics, weight_change = flow.metrics_many(deltas)
    per_behavior = {name: value.numpy() for name, value in metrics.items()}
    per_run = {} if flow.pretrain is None else {"pretrain/loss": flow.pretrain_loss(deltas)}
    if not continuous and hyper.get("kl_target", 0.0) > 0:
        per_run["objective/kl_coef"] = np.array(coefs)
    return PopulationTrajectory(record, deltas, per_behavior, weight_change.numpy(), beta, lr,
                                mixture.names, per_run)


def population_descent_many(
    mixture: Mixture,
    *,
    beta,
    lr,
    steps: int,
    reference: np.ndarray,
    objective="dpo",
    eval_every: int = 1,
    **flow_options,
) -> list[PopulationTrajectory]:
    """Population gradient descent for several configurations in one call: ``beta``
    and ``lr`` are numbers or equal-length lists (zipped, as for the simulation), and
    the result is one :class:`PopulationTrajectory` per configuration, equal to
    :func:`population_descent`'s (to the quadrature error: the batch integrates every
    configuration on the rule of the largest spread).

    The DPO family's flow on a scale-mixture family steps every configuration at
    once (:meth:`PopulationFlow.drift_np_many`), so a β sweep of the theory costs
    about one configuration's; other objectives and families, and spreads that need
    graded rules, step each configuration in turn.
    """
    from dynamics.simulate import _as_configs

    betas, lrs = _as_configs(beta, lr)
    steps = check_integer("steps", steps, ge=1)
    eval_every = check_integer("eval_every", eval_every, ge=1)
    flows = {}

    def flow_for(b: float) -> PopulationFlow:
        # the set-up (QMC points, reference policy at them, rule cache) does not depend
        # on β: one flow is built, the others are copies with their own β
        if b not in flows:
            if flows:
                flow = copy.copy(next(iter(flows.values())))
                flow.beta = check_number("beta", b, gt=0)
                flow.scale = flow.beta if flow.objective.uses_beta else 1.0
                flows[b] = flow
            else:
                flows[b] = PopulationFlow(mixture, beta=b, reference=reference,
                                          objective=objective, **flow_options)
        return flows[b]

    first = flow_for(float(betas[0]))
    if not (first.exact and first.objective.view == "difference"):
        return [population_descent(mixture, beta=float(b), lr=float(r), steps=steps,
                                   reference=reference, objective=objective,
                                   eval_every=eval_every, **flow_options)
                for b, r in zip(betas, lrs)]
    record = np.unique(np.r_[np.arange(0, steps + 1, eval_every), steps])
    wanted = set(record.tolist())
    current = np.zeros((len(betas), mixture.dim))
    kept = []
    for k in range(steps + 1):
        if k in wanted:
            kept.append(current.copy())
        if k == steps:
            break
        drift = first.drift_np_many(current, betas)
        if drift is None:  # graded rules: one configuration at a time
            drift = np.stack([flow_for(float(b)).drift_np(v) for b, v in zip(betas, current)])
        current = current + lrs[:, None] * drift
    deltas = np.stack(kept, 1)  # (P, E, d)
    out = []
    for b, r, path in zip(betas, lrs, deltas):
        metrics, change = flow_for(float(b)).metrics_many(path)
        out.append(PopulationTrajectory(record, path, {m: v.numpy() for m, v in metrics.items()},
                                        change.numpy(), float(b), float(r), mixture.names))
    return out
