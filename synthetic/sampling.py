"""Drawing preference data from a problem.

Allocation is stratified: behavior ``i`` gets ``n·w_i`` statements and, of those,
a share ``pos_fraction`` are positive (largest-remainder rounding), so every
seed of a problem has the same layout and only the embeddings and label flips
are random. Within a group, embeddings are i.i.d. from the problem's family.
Samples are ordered by behavior, then class.

Randomness is passed in: an ``int`` seed or a :class:`numpy.random.Generator`;
nothing touches global state, and the same seed gives the same numbers on every
device and dtype (draws are made in float64 with NumPy, then converted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from synthetic.problem import Problem
from synthetic.validation import ParameterError, check_integer

__all__ = ["PreferenceSample", "sample", "sample_batch", "allocate"]


@dataclass(frozen=True, eq=False)
class PreferenceSample:
    """Preference data, one or several seeds (leading ``S`` axis) sharing a layout.

    features   (S, n, d) or (n, d)  embeddings g
    signs      (S, n)    or (n,)    observed sign s (+1: chosen = Yes)
    true_signs (S, n)    or (n,)    class before label noise (or the judge's labels)
    behavior   (n,)                 behavior index of each statement (int64)
    names      K names
    """

    features: torch.Tensor
    signs: torch.Tensor
    true_signs: torch.Tensor
    behavior: torch.Tensor
    names: tuple[str, ...]

    @property
    def n(self) -> int:
        return self.behavior.shape[0]

    def restrict(self, features: int) -> "PreferenceSample":
        """The first ``features = k`` coordinates of every embedding (a sample of
        :meth:`synthetic.problem.Problem.restrict`'s marginal problem, on the same draws);
        ``k = d`` returns ``self``."""
        dim = self.features.shape[-1]
        k = check_integer("features", features, ge=1, le=dim)
        if k == dim:
            return self
        return PreferenceSample(self.features[..., :k].contiguous(), self.signs,
                                self.true_signs, self.behavior, self.names)

    def seed(self, index: int) -> "PreferenceSample":
        """One seed of a batched sample, as an unbatched sample."""
        if self.features.dim() != 3:
            raise ValueError("seed() needs a batched sample (features of shape (S, n, d))")
        return PreferenceSample(self.features[index], self.signs[index],
                                self.true_signs[index], self.behavior, self.names)


def allocate(total: int, shares: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` proportional to ``shares`` (largest remainder)."""
    exact = total * np.asarray(shares, dtype=np.float64) / np.sum(shares)
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _layout(problem: Problem, n: int) -> list[tuple[int, int, int]]:
    """(behavior, true sign, count) groups in sample order."""
    groups = []
    counts = allocate(n, problem.weights)
    if counts.min() < 1:
        empty = problem.names[int(counts.argmin())]
        raise ParameterError("n", n, f"must give every behavior a statement (behavior {empty!r} "
                             f"gets none; n·w = {n * problem.weights.min():.2g})")
    for index, count in enumerate(counts):
        frac = problem.behaviors[index].pos_fraction
        n_pos, n_neg = allocate(int(count), np.array([frac, 1 - frac]))
        groups += [(index, +1, int(n_pos)), (index, -1, int(n_neg))]
    return groups


def _root(cov: np.ndarray) -> np.ndarray:
    """``L`` with ``L Lᵀ = cov`` for a PSD matrix (eigen-decomposition, no Cholesky
    failure on singular covariances)."""
    vals, vecs = np.linalg.eigh(cov)
    return vecs * np.sqrt(np.clip(vals, 0.0, None))


def _draw(problem: Problem, groups, rng: np.random.Generator):
    family = problem.family_spec
    feats, true_signs = [], []
    for index, sign, count in groups:
        behavior = problem.behaviors[index]
        mu, cov = (behavior.mu_pos, behavior.cov_pos) if sign > 0 else (behavior.mu_neg,
                                                                           behavior.cov_neg)
        z = family.sample_standard(count, problem.dim, rng)
        feats.append(mu + z @ _root(cov).T)
        true_signs.append(np.full(count, float(sign)))
    true = np.concatenate(true_signs)
    feats = np.concatenate(feats)
    if problem.principles is not None:  # the judge's labels (no random numbers spent)
        behavior = np.concatenate([np.full(count, index) for index, _, count in groups])
        return feats, true, problem.principles.labels(feats, behavior)
    flips = rng.random(true.shape[0]) < problem.label_noise
    return feats, true, np.where(flips, -true, true)


def _generator(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(check_integer("seed", seed, ge=0))


def sample(problem: Problem, n: int, seed, *, dtype=torch.float32,
           device="cpu") -> PreferenceSample:
    """Draw ``n`` statements from ``problem``; see the module docstring."""
    return _finish(problem, n, [seed], dtype, device, batched=False)


def sample_batch(problem: Problem, n: int, seeds: Sequence, *, dtype=torch.float32,
                 device="cpu") -> PreferenceSample:
    """One sample per seed, stacked on a leading axis (same layout for all)."""
    if len(seeds) < 1:
        raise ParameterError("seeds", list(seeds), "must name at least one seed")
    return _finish(problem, n, list(seeds), dtype, device, batched=True)


def _finish(problem, n, seeds, dtype, device, *, batched) -> PreferenceSample:
    n = check_integer("n", n, ge=2)
    groups = _layout(problem, n)
    draws = [_draw(problem, groups, _generator(seed)) for seed in seeds]
    behavior = np.concatenate([np.full(count, index) for index, _, count in groups])

    def stack(i):
        arr = np.stack([d[i] for d in draws]) if batched else draws[0][i]
        return torch.as_tensor(arr, dtype=dtype, device=device)

    return PreferenceSample(stack(0), stack(2), stack(1),
                            torch.as_tensor(behavior, dtype=torch.int64, device=device),
                            tuple(problem.names))
