"""The pure computations of ``prefdyn preflight``: no model, no files.

Letters: ``n`` examples, ``d`` feature width, ``K`` behaviors (or clusters of pairs).

**The model the report predicts** (THEORY §1–§3.1). Examples carry a feature
``g ∈ R^d``, a sign ``s = ±1`` and a behavior ``b ∈ [0, K)``; a margin objective
``ℓ(h)`` of ``h = s Δᵀg`` trains ``Δ`` from 0 by full-batch gradient descent.
For persona statements ``g`` is the final hidden state of the prompt and ``s``
says whether the behavior answers Yes (the Yes/No rows of the last layer). For
multi-token pairs ``g = φ(x, y_w) − φ(x, y_l)``, the difference of the two
responses' *mean* final hidden states (the response-mean features), i.e. a linear
log-ratio ``Δᵀφ`` trained on the pairs; each pair enters twice, ``(g, +1)`` and
``(−g, −1)``, which leaves every margin, loss and gradient unchanged and gives
the two classes that the Gaussian fit needs (``μ⁺ = −μ⁻``, ``Σ⁺ = Σ⁻``).

**Initial learning rates.** With ``m_i = E_i[s g]`` (the signed mean of behavior
``i``) and behavior weights ``w`` (summing to one), ``m = Σ_j w_j m_j`` and at
``Δ = 0``

    dL_i/dt = −2 ℓ'(0)² ⟨m_i, m⟩,          t = lr · step,

(DPO: ``ℓ'(0) = −β/2``, so ``−(β²/2)⟨m_i, m⟩``, :func:`dynamics.bounds.initial_loss_slope`).
The *rate* ``r_i(w) = ⟨m_i, Σ_j w_j m_j⟩ = (G w)_i`` with the Gram matrix
``G_ij = ⟨m_i, m_j⟩`` is linear in ``w``: the weights that make every rate equal
solve ``G w ∝ 1`` (:func:`equalising_weights`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from scipy import optimize

from synthetic.validation import ParameterError, check_integer

__all__ = ["MARGIN_OBJECTIVES", "NEGLECT_FRACTION", "margin_objectives", "loss_slope_at_zero",
           "signed_means", "initial_rates", "equalising_weights", "kmeans", "default_clusters",
           "ches_table", "symmetrised", "resample_counts", "bootstrap_sample", "spread",
           "interval"]

NEGLECT_FRACTION = 0.25
"""A behavior whose predicted initial rate is below this fraction of the largest is
*neglected*; one whose rate is ≤ 0 is *pushed back first* (the shared direction raises
its loss at the start); one whose predicted loss at the end of the horizon is not below
its start is *unlearned*."""


def margin_objectives() -> list[str]:
    """The registered objectives whose population flow is a margin flow on ``Δ``
    (view ``difference``, data ``pairs``): the ones the report can predict."""
    from dynamics.objectives import OBJECTIVES

    return [name for name, obj in OBJECTIVES.items()
            if obj.view == "difference" and obj.data == "pairs"]


MARGIN_OBJECTIVES = tuple(margin_objectives())


def loss_slope_at_zero(objective: str, beta: float) -> float:
    """``ℓ'(0)`` of a registered margin objective with its default hyperparameters
    (central difference in float64; every registered loss is smooth at 0)."""
    from dynamics.objectives import resolve_objective

    obj, hyper = resolve_objective(objective)
    eps = 1e-6
    h = torch.tensor([-eps, eps], dtype=torch.float64)
    value = obj.loss(h, beta=beta, **hyper)
    return float((value[1] - value[0]) / (2 * eps))


def signed_means(x: np.ndarray, s: np.ndarray, b: np.ndarray, k: int) -> np.ndarray:
    """``m_i = mean_{j: b_j = i} s_j g_j``, ``(K, d)`` from x (n, d), s (n,), b (n,)."""
    x, s, b = np.asarray(x, dtype=np.float64), np.asarray(s, dtype=np.float64), np.asarray(b)
    out = np.zeros((k, x.shape[1]))
    for i in range(k):
        mask = b == i
        out[i] = (s[mask, None] * x[mask]).mean(0)
    return out


def initial_rates(means: np.ndarray, weights) -> np.ndarray:
    """``r_i = ⟨m_i, Σ_j w_j m_j⟩`` (K,), weights normalised to sum to one."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return means @ (w @ means)


def equalising_weights(means: np.ndarray) -> tuple[np.ndarray, bool]:
    """Behavior weights ``w ≥ 0``, ``Σ w = 1``, that make the initial rates equal.

    ``(G w)_i`` must not depend on ``i``: ``w ∝ G⁻¹ 1`` when that is positive (then
    ``exact`` is True); otherwise the nonnegative least-squares fit of ``G w ≈ 1``
    (some rates stay unequal, ``exact`` False: no mixture of the data equalises them).
    means (K, d) → (weights (K,), exact).
    """
    gram = means @ means.T  # (K, K)
    ones = np.ones(len(gram))
    try:
        w = np.linalg.solve(gram, ones)
    except np.linalg.LinAlgError:
        w = np.full(len(gram), -1.0)
    if np.all(w > 0) and np.all(np.isfinite(w)):
        return w / w.sum(), True
    w, _ = optimize.nnls(gram, ones)
    if w.sum() <= 0:
        return np.full(len(gram), 1.0 / len(gram)), False
    return w / w.sum(), False


def default_clusters(n: int) -> int:
    """``K = clip(round(√(n/20)), 2, 8)`` clusters for ``n`` pairs: about 20·K² pairs
    per K, so each cluster keeps tens of pairs for its Gaussian fit."""
    return int(min(8, max(2, round(math.sqrt(n / 20)))))


def kmeans(x: np.ndarray, k: int, *, seed: int, restarts: int = 4,
           iterations: int = 100) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's k-means with k-means++ starts, the best of ``restarts`` by inertia.

    x (n, d) → (labels (n,) int, centres (K, d), inertia ``Σ_j ‖x_j − c_{b_j}‖²``).
    Labels are renumbered by decreasing cluster size (ties: smallest first index), so
    the result does not depend on the order in which the starts found them.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    k = check_integer("clusters", k, ge=1, le=n)
    rng = np.random.default_rng(seed)
    best = None
    sq = (x * x).sum(1)
    for _ in range(restarts):
        centres = [x[rng.integers(n)]]
        for _ in range(1, k):  # k-means++: the next centre ∝ squared distance
            dist = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
            total = dist.sum()
            pick = rng.integers(n) if total <= 0 else rng.choice(n, p=dist / total)
            centres.append(x[pick])
        c = np.array(centres)
        labels = np.full(n, -1)
        for _ in range(iterations):
            dist = sq[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]  # (n, K)
            new = dist.argmin(1)
            if np.array_equal(new, labels):
                break
            labels = new
            for i in range(k):
                members = labels == i
                if members.any():
                    c[i] = x[members].mean(0)
                else:  # an empty cluster takes the point farthest from its centre
                    far = dist[np.arange(n), labels].argmax()
                    c[i], labels[far] = x[far], i
        inertia = float(((x - c[labels]) ** 2).sum())
        if best is None or inertia < best[2] - 1e-12 * (1 + inertia):
            best = (labels.copy(), c.copy(), inertia)
    labels, centres, inertia = best
    sizes = np.bincount(labels, minlength=k)
    first = np.array([np.flatnonzero(labels == i)[0] if sizes[i] else n for i in range(k)])
    order = sorted(range(k), key=lambda i: (-sizes[i], first[i]))
    rename = np.empty(k, dtype=np.int64)
    rename[order] = np.arange(k)
    return rename[labels], centres[order], inertia


def ches_table(chosen_sum: np.ndarray, rejected_sum: np.ndarray, chosen_tokens,
               rejected_tokens, line=None) -> pd.DataFrame:
    """CHES of every pair (Razin et al. arXiv:2410.08847, Definition 2), ranked.

    ``S_w``, ``S_l`` (n, d): the sums over response tokens of the final hidden states
    that score them (:func:`llm_probes.pair_features.response_features`).
    ``ches = ⟨S_w, S_l⟩ − ‖S_w‖²``; ``ches_normalised`` is their length-normalised form
    ``⟨S_w, S_l⟩/(L_w L_l) − ‖S_w‖²/L_w²``. ``rank`` 1 = the highest CHES, the pair
    most at risk of likelihood displacement (``log π(y_w)`` falling under DPO).
    """
    sw, sl = np.asarray(chosen_sum, np.float64), np.asarray(rejected_sum, np.float64)
    lw, ll = np.asarray(chosen_tokens, np.float64), np.asarray(rejected_tokens, np.float64)
    inner, norm = (sw * sl).sum(1), (sw * sw).sum(1)
    table = pd.DataFrame({
        "pair": np.arange(len(sw)),
        "line": np.arange(len(sw)) if line is None else np.asarray(line),
        "ches": inner - norm, "ches_normalised": inner / (lw * ll) - norm / lw**2,
        "chosen_tokens": lw.astype(int), "rejected_tokens": ll.astype(int)})
    table["rank"] = table["ches"].rank(ascending=False, method="first").astype(int)
    return table.sort_values("rank", kind="stable").reset_index(drop=True)


def symmetrised(diffs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
    """Pairs as examples of the margin model: ``(g, +1)`` and ``(−g, −1)`` per pair.
    diffs (n, d), labels (n,) → x (2n, d), s (2n,), b (2n,)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    n = len(diffs)
    return (np.concatenate([diffs, -diffs]), np.r_[np.ones(n), -np.ones(n)],
            np.concatenate([labels, labels]).astype(np.int64))


def resample_counts(s: np.ndarray, b: np.ndarray, weights, total: int) -> np.ndarray:
    """Examples to draw per (behavior, sign) so that behavior ``i`` has the share
    ``w_i`` of ``total`` and keeps its own class balance: ``(K, 2)`` counts (column 0
    the positives), each at least 1 (largest remainder, then the floor of 1, so a
    behavior of weight 0 is still present, by one example of each sign)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    k = len(w)
    share = np.zeros((k, 2))
    for i in range(k):
        mask = b == i
        share[i] = w[i] * np.array([(s[mask] > 0).mean(), (s[mask] < 0).mean()])
    raw = share.reshape(-1) * total
    counts = np.floor(raw).astype(np.int64)
    left = total - counts.sum()
    counts[np.argsort(-(raw - counts), kind="stable")[:left]] += 1
    counts = counts.reshape(k, 2)
    return np.maximum(counts, 1)


def bootstrap_sample(s: np.ndarray, b: np.ndarray, counts: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """Indices of one weighted bootstrap sample: ``counts[i, 0]`` positives and
    ``counts[i, 1]`` negatives of behavior ``i``, drawn with replacement, in the order
    behavior, sign (the same layout for every seed)."""
    idx = []
    for i in range(len(counts)):
        for col, sign in enumerate((1.0, -1.0)):
            pool = np.flatnonzero((b == i) & (s == sign))
            if counts[i, col]:
                idx.append(rng.choice(pool, size=counts[i, col], replace=True))
    return np.concatenate(idx)


def spread(speeds: np.ndarray) -> np.ndarray:
    """Spread of learning speeds across behaviors (last axis): the coefficient of
    variation ``sd/|mean|`` (population sd), 0 when all are equal."""
    speeds = np.asarray(speeds, dtype=np.float64)
    return speeds.std(-1) / np.abs(speeds.mean(-1))


def interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the Student-t interval of the mean of ``values`` over seeds."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return mean, mean - half, mean + half


def check_weights(name: str, weights, k: int) -> np.ndarray:
    """Behavior weights: K finite numbers ≥ 0 with a positive sum."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ParameterError(name, np.asarray(weights).tolist(),
                             f"must be {k} finite weights >= 0 with a positive sum")
    return w / w.sum()
