"""``prefdyn probe last-layer --pairs``: DPO on frozen multi-token features, every row moving.

The model's hidden states are frozen; only the output layer ``W`` ``(V, d)`` (started
at the model's own, untied) learns. A response ``y`` of ``L`` tokens after a prompt
``x`` has one scoring state ``h_k`` per token (:mod:`llm_probes.pair_features`), and

    log π_W(y|x) = Σ_k [ (W h_k)[y_k] − logsumexp(W h_k) ],

over the whole vocabulary: no Yes/No reduction. DPO on ``n`` train pairs
``(y_w, y_l)`` minimises ``L(W) = (1/n) Σ_i softplus(−β m_i)`` with
``m_i = Δ_w − Δ_l`` and ``Δ = log π_W − log π_{W0}``; full-batch gradient descent
``W ← W − η ∇L``. Any other margin objective of the registry (IPO, cDPO, robust DPO,
hinge) or ``rlhf`` over each pair's two responses trains the same way
(:func:`pair_objective`).

**The one-step prediction** (Ren & Sutherland, "Learning dynamics of LLM finetuning",
ICLR 2025): to first order in ``η`` the change of any response's log-probability is

    Δ log π(y_o|x_o) = −η Σ_k Σ_u A_k K(k, u) G_u + O(η²),

with ``A_k = e_{y_k} − π_k`` (the gradient of ``log π(y_k)`` in the logits at token ``k``),
``G_u = ∂L/∂z_u = a_{r(u)} (e_{y_u} − π_u)`` (``a_r = ∂L/∂log π(r)``: ``−β σ(−β m_i)/n``
on a chosen response, ``+β σ(−β m_i)/n`` on a rejected one), and the empirical NTK of
the last layer, ``K(k, u) = ⟨h_k, h_u⟩ I_V``, which is exact and constant here (the
features are frozen). This module computes it as ``Σ_k A_kᵀ (ΔW h_k)``, the same sum
(:func:`one_step_kernel` evaluates the kernel form term by term, for the tests), and
splits it into the part pushed by the chosen responses' gradient and the part pushed
by the rejected ones' (the latter is the "squeezing" term). Every step it is set
against the measured change ``log π_{W+ΔW} − log π_W`` of every response, train and
held-out; the remainder is ``O(η²)``.

**Step size.** At ``W0`` the loss's Gauss–Newton curvature is
``(β²/4n) λ_max(Gram)``, ``Gram_ij = ⟨M_i, M_j⟩_F`` with ``M_i = ∇_W m_i``, computed
through the token kernel ``⟨h_k, h_u⟩ ⟨A_k, A_u⟩`` without forming any ``M_i``
(:func:`gauss_newton_limit`). Gradient descent on that quadratic diverges above
``η = 2/λ``; ``--lr auto`` takes ``--lr-fraction`` of it (default 0.5).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from synthetic.validation import ParameterError, check_number

__all__ = ["PairStates", "WholeLayer", "MarginObjective", "pair_objective", "pair_objectives",
           "gauss_newton_limit", "one_step_kernel", "split_pairs", "pair_states", "run",
           "PROBS_BUDGET"]

PROBS_BUDGET = 4 * 2**30
"""Bytes the per-token next-token distributions of a run may take (kept for a step)."""
_ROWS = 512
"""Token rows per logit block (``512 × V`` at a time)."""


@dataclass
class PairStates:
    """Frozen scoring states of ``n_train`` train and ``n_test`` held-out pairs.

    Responses are ordered train chosen, train rejected, test chosen, test rejected
    (response ``r`` of kind ``role[r]``); ``states`` ``(R, d)`` holds every response's
    tokens' states contiguously (response ``r`` owns rows ``offsets[r]:offsets[r+1]``)
    and ``targets`` ``(R,)`` the tokens they score."""

    states: torch.Tensor
    targets: torch.Tensor
    offsets: np.ndarray
    n_train: int
    n_test: int

    @property
    def responses(self) -> int:
        return 2 * (self.n_train + self.n_test)

    @property
    def owner(self) -> torch.Tensor:
        """``(R,)`` the response each token row belongs to."""
        counts = torch.as_tensor(np.diff(self.offsets))
        return torch.repeat_interleave(torch.arange(len(counts)), counts)

    @property
    def train_rows(self) -> int:
        """Token rows of the train responses (the first rows)."""
        return int(self.offsets[2 * self.n_train])

    def roles(self) -> pd.DataFrame:
        """One row per response: ``pair`` (index within its split), ``split``, ``role``."""
        n, m = self.n_train, self.n_test
        return pd.DataFrame({
            "pair": np.r_[np.arange(n), np.arange(n), np.arange(m), np.arange(m)],
            "split": ["train"] * (2 * n) + ["test"] * (2 * m),
            "role": ["chosen"] * n + ["rejected"] * n + ["chosen"] * m + ["rejected"] * m,
            "tokens": np.diff(self.offsets)})


def _softmax_rows(w: torch.Tensor, h: torch.Tensor):
    """Logits ``h Wᵀ`` turned into probabilities in place, and the log-partition."""
    logits = h @ w.T
    lse = torch.logsumexp(logits, dim=1)
    return logits.sub_(lse[:, None]).exp_(), lse


@dataclass(frozen=True)
class MarginObjective:
    """A per-pair loss ``ℓ(m)`` of the margin ``m = Δ_w − Δ_l`` (``Δ = log π − log π0``),
    its derivative and (None where it has none) its second derivative, elementwise
    over the train pairs."""

    name: str
    loss: object
    grad: object
    hess: object | None
    per_pair: bool = False  # its loss depends on the pair beyond the margin (rlhf)


def pair_objectives() -> list[str]:
    """Every objective the pairs probe trains: the registry's policy objectives on the
    margin of preference pairs (:mod:`dynamics.objectives`), and ``rlhf``."""
    from dynamics.objectives import OBJECTIVES

    return [name for name, o in OBJECTIVES.items()
            if o.block == "policy" and o.view == "difference" and o.data == "pairs"] + ["rlhf"]


def pair_objective(spec, *, beta: float, reference_margin=None, reward_gap=None,
                   path: str = "--objective") -> MarginObjective:
    """The :class:`MarginObjective` of a registry ``spec`` (a name or a table).

    ``rlhf`` is the KL-regularised return over each pair's two responses, the policy
    renormalised on them, ``p = σ(z0 + m)`` with ``z0`` the reference margin
    ``log π0(y_w) − log π0(y_l)`` (``reference_margin``) and rewards differing by
    ``reward_gap`` ``r(y_w) − r(y_l)``:

        ℓ(m) = −[p·Δr − β KL(Bern(p) ‖ Bern(σ(z0)))],   ℓ'(m) = −p(1−p)(Δr − βm),

    the exact policy gradient over that set (the engine's ``rlhf`` with two answers;
    ``r(y_l)`` dropped, a constant). Its optimum is ``m* = Δr/β``."""
    from dynamics.objectives import resolve_objective

    obj, hyper = resolve_objective(spec, path=path)
    if obj.name == "rlhf":
        if hyper.get("estimator", "exact") != "exact":
            raise ParameterError(f"{path}.estimator", hyper["estimator"], "must be exact on "
                                 "pairs (the expectation over the two responses is exact)")
        if reference_margin is None or reward_gap is None:
            raise ParameterError(path, "rlhf", "needs a reward: the reference margin and the "
                                 "reward gap of every train pair")
        z0 = torch.as_tensor(reference_margin, dtype=torch.float64)
        gap = torch.as_tensor(reward_gap, dtype=torch.float64)

        def loss(m):
            z = z0 + m
            p = torch.sigmoid(z)
            kl = (p * (torch.nn.functional.logsigmoid(z) - torch.nn.functional.logsigmoid(z0))
                  + (1 - p) * (torch.nn.functional.logsigmoid(-z)
                               - torch.nn.functional.logsigmoid(-z0)))
            return -(p * gap - beta * kl)

        def grad(m):
            p = torch.sigmoid(z0 + m)
            return -p * (1 - p) * (gap - beta * m)

        def hess(m):
            p = torch.sigmoid(z0 + m)
            return p * (1 - p) * (beta - (1 - 2 * p) * (gap - beta * m))

        return MarginObjective("rlhf", loss, grad, hess, per_pair=True)
    if obj.name not in pair_objectives():
        raise ParameterError(path, obj.name, "must be one of " + ", ".join(pair_objectives())
                             + " on pairs (a policy objective on preference pairs)")
    return MarginObjective(obj.name, lambda m: obj.loss(m, beta, **hyper),
                           lambda m: obj.grad(m, beta, **hyper),
                           None if obj.hess is None else lambda m: obj.hess(m, beta, **hyper))


class WholeLayer:
    """Gradient descent on ``W`` ``(V, d)`` over frozen :class:`PairStates` for a margin
    objective (DPO by default; :func:`pair_objective`; a callable ``reference ↦
    MarginObjective`` when it needs the reference margins, as ``rlhf`` does).

    ``dtype`` is the run's (states and ``W`` are converted); ``rows`` the token rows
    per logit block. :meth:`step` does one step and returns what it measured at the
    current ``W``; :meth:`logps` is ``log π_W`` of every response.
    """

    def __init__(self, w0: torch.Tensor, data: PairStates, *, beta: float,
                 objective="dpo", dtype=torch.float32, rows: int = _ROWS):
        self.beta = check_number("beta", beta, gt=0)
        self.data = data
        self.h = data.states.to(dtype)
        self.y = data.targets.to(torch.long)
        self.owner = data.owner
        self.w = w0.detach().to(dtype).clone()
        self.rows = rows
        vocab = self.w.shape[0]
        need = self.h.shape[0] * vocab * self.h.element_size()
        if need > PROBS_BUDGET:
            raise ParameterError("--max-pairs", data.n_train + data.n_test,
                                 f"needs {need / 2**30:.1f} GiB for the {self.h.shape[0]} "
                                 f"response tokens' next-token distributions (limit "
                                 f"{PROBS_BUDGET / 2**30:.0f} GiB); use fewer pairs or a "
                                 "smaller --max-response-tokens")
        self.reference = self.logps()
        if callable(objective):
            self.objective = objective(self.reference)
        else:
            self.objective = pair_objective(objective, beta=beta)

    # ---------------------------------------------------------------- pieces
    def _forward(self):
        """Per-token ``log π(y_k)`` ``(R,)`` (as :meth:`logps` computes it, bit for bit)
        and the distributions ``π_k`` ``(R, V)``."""
        probs = torch.empty((self.h.shape[0], self.w.shape[0]), dtype=self.h.dtype)
        token = torch.empty(self.h.shape[0], dtype=torch.float64)
        for start in range(0, self.h.shape[0], self.rows):
            part = slice(start, start + self.rows)
            logits, token[part] = self._token_logps(part)
            probs[part] = logits.exp_()
        return token, probs

    def _token_logps(self, part: slice):
        """Log-softmax rows ``(rows, V)`` of token ``part`` and their targets' entries."""
        logits = self.h[part] @ self.w.T
        logits.sub_(torch.logsumexp(logits, dim=1)[:, None])
        return logits, logits.gather(1, self.y[part, None])[:, 0].double()

    def _per_response(self, token: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.data.responses, dtype=torch.float64)
        return out.index_add_(0, self.owner, token.double())

    def logps(self) -> torch.Tensor:
        """``log π_W(y|x)`` of every response ``(2(n + m),)``, float64."""
        token = torch.empty(self.h.shape[0], dtype=torch.float64)
        for start in range(0, self.h.shape[0], self.rows):
            part = slice(start, start + self.rows)
            token[part] = self._token_logps(part)[1]
        return self._per_response(token)

    def margins(self, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Train and test margins ``Δ_w − Δ_l`` (not multiplied by ``β``)."""
        n, m = self.data.n_train, self.data.n_test
        delta = logp - self.reference
        return delta[:n] - delta[n:2 * n], delta[2 * n:2 * n + m] - delta[2 * n + m:]

    def coefficients(self, train_margin: torch.Tensor) -> torch.Tensor:
        """``a_r = ∂L/∂ log π(r)`` of every response (0 on held-out ones):
        ``±ℓ'(m_i)/n`` on the chosen and the rejected response of train pair ``i``."""
        n = self.data.n_train
        slope = self.objective.grad(train_margin) / n
        a = torch.zeros(self.data.responses, dtype=torch.float64)
        a[:n], a[n:2 * n] = slope, -slope
        return a

    def loss(self, train_margin: torch.Tensor) -> float:
        """``L = (1/n) Σ_i ℓ(m_i)``."""
        return float(self.objective.loss(train_margin).mean())

    def _gradient(self, probs, a_token, rows: slice) -> torch.Tensor:
        """``Σ_k a_k (e_{y_k} − π_k) h_kᵀ`` over token ``rows`` (``(V, d)``)."""
        h, a = self.h[rows], a_token[rows].to(self.h.dtype)
        grad = torch.zeros_like(self.w)
        grad.index_add_(0, self.y[rows], a[:, None] * h)
        for start in range(rows.start, rows.stop, self.rows):
            part = slice(start, min(start + self.rows, rows.stop))
            grad.sub_((probs[part] * a_token[part].to(self.h.dtype)[:, None]).T @ self.h[part])
        return grad

    def _predicted(self, probs, delta_w) -> torch.Tensor:
        """``Σ_k A_kᵀ (ΔW h_k)`` per response: the first-order change of ``log π``."""
        token = torch.empty(self.h.shape[0], dtype=torch.float64)
        for start in range(0, self.h.shape[0], self.rows):
            part = slice(start, start + self.rows)
            dz = self.h[part] @ delta_w.T
            token[part] = (dz.gather(1, self.y[part, None])[:, 0]
                           - (probs[part] * dz).sum(1)).double()
        return self._per_response(token)

    # ---------------------------------------------------------------- the step
    def step(self, lr: float, *, split: bool = False, predict: bool = True) -> dict:
        """One gradient step of size ``lr``. Returns, at the ``W`` before the step:
        ``logp`` (every response), ``loss``, ``margin`` (train), ``test_margin`` and
        ``predicted``, the first-order change of every response's ``log π`` that the
        step makes; with ``split``, also ``from_chosen`` and ``from_rejected``, the
        parts of ``predicted`` due to the chosen and the rejected responses' gradient;
        without ``predict``, no prediction (one product with ``W`` fewer)."""
        token, probs = self._forward()
        logp = self._per_response(token)
        margin, test_margin = self.margins(logp)
        a = self.coefficients(margin)
        a_token = a[self.owner]
        n, offsets = self.data.n_train, self.data.offsets
        out = dict(logp=logp, margin=margin, test_margin=test_margin, loss=self.loss(margin))
        if split:
            chosen = -lr * self._gradient(probs, a_token, slice(0, int(offsets[n])))
            rejected = -lr * self._gradient(probs, a_token,
                                            slice(int(offsets[n]), int(offsets[2 * n])))
            out["from_chosen"] = self._predicted(probs, chosen)
            out["from_rejected"] = self._predicted(probs, rejected)
            out["predicted"] = out["from_chosen"] + out["from_rejected"]
            delta = chosen.add_(rejected)
        else:
            delta = -lr * self._gradient(probs, a_token, slice(0, int(offsets[2 * n])))
            if predict:
                out["predicted"] = self._predicted(probs, delta)
        del probs
        self.w.add_(delta)
        return out


def one_step_kernel(w: torch.Tensor, data: PairStates, reference: torch.Tensor, *,
                    objective: MarginObjective, lr: float) -> torch.Tensor:
    """Ren & Sutherland's decomposition ``−η Σ_k Σ_u A_k K(k,u) G_u`` evaluated term by
    term (``A_k``, ``G_u`` as ``V``-vectors; ``K(k,u) = ⟨h_k, h_u⟩``), for every response.
    Quadratic in the tokens: a reference for small problems."""
    h, y, own = data.states.double(), data.targets, data.owner
    logits = h @ w.double().T
    probs = torch.softmax(logits, dim=1)
    eye = torch.eye(w.shape[0], dtype=torch.float64)
    A = eye[y] - probs  # (R, V)
    logp = torch.zeros(data.responses, dtype=torch.float64).index_add_(
        0, own, torch.log_softmax(logits, 1).gather(1, y[:, None])[:, 0])
    n = data.n_train
    delta = logp - reference
    slope = objective.grad(delta[:n] - delta[n:2 * n]) / n
    a = torch.zeros(data.responses, dtype=torch.float64)
    a[:n], a[n:2 * n] = slope, -slope
    out = torch.zeros(data.responses, dtype=torch.float64)
    for k in range(len(y)):
        total = 0.0
        for u in range(data.train_rows):
            G = a[own[u]] * A[u]
            total += float(A[k] @ G) * float(h[k] @ h[u])
        out[own[k]] += -lr * total
    return out


def gauss_newton_limit(model: WholeLayer) -> dict:
    """At the current ``W``: the Gauss–Newton curvature of the loss,
    ``λ = λ_max(C^{1/2} Gram C^{1/2})`` with ``Gram_ij = ⟨∇_W m_i, ∇_W m_j⟩_F`` and
    ``C = diag(max(ℓ''(m_i), 0))/n`` (``β²/(4n)`` for DPO at zero margins), and the
    step ``2/λ`` above which gradient descent on it diverges (NaN for an objective with
    no second derivative, e.g. the hinge).

    ``⟨∇m_i, ∇m_j⟩ = Σ_{k∈i, u∈j} s_k s_u ⟨h_k, h_u⟩ ⟨e_{y_k} − π_k, e_{y_u} − π_u⟩``
    (``s`` = +1 on chosen tokens, −1 on rejected ones), with
    ``⟨e_a − π, e_b − π'⟩ = [a = b] − π'_a − π_b + ⟨π, π'⟩``."""
    data, n = model.data, model.data.n_train
    rows = data.train_rows
    h, y = model.h[:rows].double(), model.y[:rows]
    inner = torch.zeros((rows, rows), dtype=torch.float64)
    at_targets = torch.empty((rows, rows), dtype=torch.float64)  # [u, k] = π_u[y_k]
    for start in range(0, rows, model.rows):
        part = slice(start, min(start + model.rows, rows))
        p, _ = _softmax_rows(model.w, model.h[part])
        at_targets[part] = p[:, y].double()
        for other in range(0, rows, model.rows):
            block = slice(other, min(other + model.rows, rows))
            q, _ = _softmax_rows(model.w, model.h[block])
            inner[part, block] = (p @ q.T).double()
    same = (y[:, None] == y[None, :]).double()
    token = (h @ h.T) * (same - at_targets - at_targets.T + inner)
    owner = data.owner[:rows]
    sign = torch.where(owner < n, 1.0, -1.0).double()
    incidence = torch.zeros((n, rows), dtype=torch.float64)
    incidence[owner % n, torch.arange(rows)] = sign
    gram = incidence @ token @ incidence.T
    if model.objective.hess is None:
        return {"curvature": math.nan, "limit": math.nan}
    logp = model.logps()
    margin, _ = model.margins(logp)
    root = (model.objective.hess(margin).clamp_min(0) / n).sqrt()
    lam = float(torch.linalg.eigvalsh(root[:, None] * gram * root[None, :])[-1])
    return {"curvature": lam, "limit": 2.0 / lam if lam > 0 else math.inf}


def split_pairs(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test pair indices: a seeded permutation, ``round(n·test_fraction)``
    held out (at least one pair kept for training)."""
    order = np.random.default_rng(seed).permutation(n)
    held = min(int(round(n * test_fraction)), n - 1)
    return np.sort(order[held:]), np.sort(order[:held])


# ---------------------------------------------------------------------- the probe


def add_arguments(group) -> None:
    """Options that only ``--pairs`` runs take (added to the last-layer probe's)."""
    group.add_argument("--test-fraction", type=float, default=0.25, metavar="F",
                       help="with --pairs: share of the pairs held out (default: 0.25)")
    group.add_argument("--objective", default="dpo", metavar="NAME",
                       help="with --pairs: the margin objective trained, one of "
                       + ", ".join(name for name in pair_objectives() if name != "rlhf")
                       + " (default: dpo; rlhf from a reward model: prefdyn probe rlhf)")


def check(args) -> None:
    """``--pairs`` rules of the last-layer probe's options."""
    from dynamics.objectives import get_objective

    check_number("--test-fraction", args.test_fraction, ge=0, lt=1)
    names = [name for name in pair_objectives() if name != "rlhf"]
    if args.objective not in names:
        raise ParameterError("--objective", args.objective, "must be one of " + ", ".join(names)
                             + (" (rlhf needs a reward model: prefdyn probe rlhf)"
                                if args.objective == "rlhf" else ""))
    if args.lr == "auto" and get_objective(args.objective).hess is None:
        raise ParameterError("--lr", "auto", f"needs the loss's curvature, which "
                             f"{args.objective} does not have; give a number")
    for flag in ("center", "together"):
        if getattr(args, flag):
            raise ParameterError(f"--{flag}", True, "applies to --behaviors runs only "
                                 "(with --pairs every output row moves, one run)")


def _states(ctx, index: np.ndarray) -> tuple[dict, float]:
    """Scoring states of the chosen then the rejected responses of pairs ``index``."""
    from llm_probes.pair_features import shared_prompt_features

    f = ctx.tokenized.frame.iloc[index]
    prompts = list(f.prompt_ids)
    tick = time.perf_counter()
    bar = _bar(2 * len(f), ctx.progress, "response states", "resp")
    out = shared_prompt_features(ctx.model, prompts, list(f.chosen_ids), list(f.rejected_ids),
                                 batch_size=ctx.args.batch_size, keep_states=True,
                                 progress=bar.update)
    bar.close()
    return out, time.perf_counter() - tick


def pair_states(states: dict, n: int, m: int) -> PairStates:
    """:class:`PairStates` of :func:`_states`'s output for ``n`` train then ``m`` test
    pairs (responses there: the chosen of all pairs, then the rejected of all)."""
    order = np.r_[np.arange(n), n + m + np.arange(n), n + np.arange(m),
                  2 * n + m + np.arange(m)]  # chosen/rejected of train, then of test
    rows = np.concatenate([np.arange(states["offsets"][r], states["offsets"][r + 1])
                           for r in order])
    return PairStates(torch.as_tensor(states["states"][rows]),
                      torch.as_tensor(states["targets"][rows]),
                      np.r_[0, np.cumsum(states["tokens"][order])], n, m)


def _bar(total: int, enabled: bool, desc: str, unit: str):
    from llm_probes.features import _progress

    return _progress(total, enabled, desc, unit=unit)


def _step_row(step: int, lr: float, out: dict, measured, roles: pd.DataFrame,
              start: torch.Tensor, model: WholeLayer) -> dict:
    """One row of ``pair_last_layer.parquet``: the metrics at step ``step`` and how
    well the step's prediction matched the change it made (NaN when ``measured`` is
    None: the last step, which takes no step). Accuracies count ties one half."""
    from dynamics.metrics import tie_half

    row = dict(step=step, t=lr * step, loss=out["loss"],
               reward_accuracy=float(tie_half(out["margin"]).mean()),
               margin=float(out["margin"].mean()))
    tm = out["test_margin"]
    row["test_loss"] = (float(model.objective.loss(tm).mean())
                        if len(tm) and not model.objective.per_pair else math.nan)
    row["test_reward_accuracy"] = float(tie_half(tm).mean()) if len(tm) else math.nan
    change = out["logp"] - start
    for split in ("train", "test"):
        for role in ("chosen", "rejected"):
            mask = torch.tensor(((roles.split == split) & (roles.role == role)).to_numpy())
            row[f"{split}_{role}_change"] = (float(change[mask].mean()) if mask.any()
                                             else math.nan)
        mask = torch.tensor(((roles.split == split) & (roles.role == "chosen")).to_numpy())
        row[f"{split}_chosen_fell"] = (float((change[mask] < 0).double().mean())
                                       if mask.any() else math.nan)
        mask = torch.tensor((roles.split == split).to_numpy())
        if mask.any() and measured is not None:
            p, m = out["predicted"][mask], measured[mask]
            row[f"{split}_prediction_error"] = float((m - p).norm() / m.norm().clamp_min(1e-300))
            row[f"{split}_prediction_corr"] = float(np.corrcoef(p, m)[0, 1]) if len(m) > 1 \
                else math.nan
        else:
            row[f"{split}_prediction_error"] = row[f"{split}_prediction_corr"] = math.nan
    return row


def run(ctx) -> list[Path]:
    """``last-layer --pairs``: writes ``pair_last_layer.parquet`` (per step),
    ``pair_last_layer_changes.parquet`` (per response at the recorded steps: measured
    and predicted change, split by the pushing side), ``pair_last_layer_summary.json``
    and the figure."""
    from dynamics.io import atomic_write, write_parquet
    from figures.probe_pair_last_layer import plot
    from llm_probes.last_layer import AUTO_FRACTION, choose_lr

    args = ctx.args
    started = time.perf_counter()
    loaded = ctx.model
    n_pairs = len(ctx.tokenized.frame)
    train_index, test_index = split_pairs(n_pairs, args.test_fraction, ctx.seed)
    if len(train_index) < 1:
        raise ParameterError("--max-pairs", n_pairs, "must leave at least one train pair")
    states, extract_seconds = _states(ctx, np.r_[train_index, test_index])
    n, m = len(train_index), len(test_index)
    data = pair_states(states, n, m)
    w0 = loaded.model.get_output_embeddings().weight.detach().float()
    model = WholeLayer(w0, data, beta=args.beta, objective=args.objective)
    limit = gauss_newton_limit(model)
    fraction = AUTO_FRACTION if args.lr_fraction is None else args.lr_fraction
    lr = choose_lr(args.lr, {"pairs": limit["limit"]}, fraction=fraction, hint="lower --lr",
                   rule="2/λ, λ the Gauss-Newton curvature at W0")
    roles = data.roles()
    start = model.reference.clone()
    history, changes = [], []
    bar = _bar(args.steps, ctx.progress, "whole-layer DPO", "step")
    tick = time.perf_counter()
    previous, summed = None, torch.zeros(data.responses, dtype=torch.float64)
    for step in range(args.steps + 1):
        record = step % args.eval_every == 0 or step == args.steps
        if step < args.steps:
            out = model.step(lr, split=record)
            summed += out["predicted"]
        else:
            logp = model.logps()
            margin, test_margin = model.margins(logp)
            out = dict(logp=logp, margin=margin, test_margin=test_margin,
                       loss=model.loss(margin))
        if previous is not None:
            prev_step, prev = previous
            measured = out["logp"] - prev["logp"]
            history.append(_step_row(prev_step, lr, prev, measured, roles, start, model))
            if "from_chosen" in prev:
                changes.append(roles.assign(step=prev_step, logp=prev["logp"].numpy(),
                                            measured=measured.numpy(),
                                            predicted=prev["predicted"].numpy(),
                                            from_chosen=prev["from_chosen"].numpy(),
                                            from_rejected=prev["from_rejected"].numpy()))
        previous = (step, out)
        if step < args.steps:
            bar.update(1)
    bar.close()
    train_seconds = time.perf_counter() - tick
    final = out
    last = _step_row(args.steps, lr, final, None, roles, start, model)
    curves = pd.DataFrame(history + [last])
    changes = pd.concat(changes, ignore_index=True)
    total = (final["logp"] - start).numpy()
    summary = dict(
        model=loaded.name, fingerprint=loaded.fingerprint, objective=args.objective,
        beta=args.beta, lr=lr,
        lr_rule="auto" if args.lr == "auto" else "given", lr_fraction_of_limit=lr / limit[
            "limit"], gauss_newton_curvature=limit["curvature"],
        stability_limit=limit["limit"], steps=args.steps, eval_every=args.eval_every,
        seed=ctx.seed, train_pairs=n, test_pairs=m, tokens=ctx.tokenized.report(),
        response_tokens=int(data.offsets[-1]), vocab=int(w0.shape[0]),
        final_loss=final["loss"],
        final_reward_accuracy=last["reward_accuracy"],
        final_test_reward_accuracy=last["test_reward_accuracy"],
        train_chosen_fell=float((total[:n] < 0).mean()),
        test_chosen_fell=float((total[2 * n:2 * n + m] < 0).mean()) if m else math.nan,
        prediction_error_median=float(curves["train_prediction_error"].median()),
        prediction_error_max=float(curves["train_prediction_error"].max()),
        prediction_corr_min=float(curves["train_prediction_corr"].min()),
        sum_of_predictions_error=float(np.linalg.norm(total - summed.numpy())
                                       / np.linalg.norm(total)),
        seconds=dict(states=extract_seconds, training=train_seconds,
                     total=time.perf_counter() - started),
        note="only the output layer moves (every row); hidden states frozen; prompts are "
             "the dialogue text as written (no chat template)")
    out_dir = ctx.out
    files = [write_parquet(out_dir / "pair_last_layer.parquet", curves),
             write_parquet(out_dir / "pair_last_layer_changes.parquet", changes),
             atomic_write(out_dir / "pair_last_layer_summary.json", lambda p: p.write_text(
                 json.dumps(summary, indent=2, default=float) + "\n"))]
    files += plot(curves, changes, summary, out_dir / "probe_pair_last_layer")
    if ctx.progress:
        print(f"last-layer --pairs: {n} train / {m} test pairs, lr {lr:.3g} "
              f"({summary['lr_fraction_of_limit']:.2f} of the Gauss-Newton limit "
              f"{limit['limit']:.3g}); loss {curves.loss.iloc[0]:.4f} -> {final['loss']:.4f}; "
              f"one-step prediction error median {summary['prediction_error_median']:.2e} "
              f"(max {summary['prediction_error_max']:.2e}); log π(y_w) fell on "
              f"{summary['train_chosen_fell']:.0%} of train pairs", file=sys.stderr)
    return files

