"""A "pretraining" distribution for PPO-ptx (InstructGPT eq. 2): features and the
token the pretrained model should keep predicting on them.

Component ``c`` (weight ``w_c``) draws ``g ~ N(mean_c, σ_c² I)`` with target token
``y_c``. RL with ``ptx_coef = γ`` adds ``−γ E_pretrain[log π(y|g)]`` to its loss, and
every policy objective reports the *alignment tax* ``E_pretrain[−log π(y|g)]``.

Samples are drawn per seed from their own stream (the preference sample's seed,
with a tag), so adding a pretraining distribution changes no preference sample;
a second, held-out sample of the same size measures the tax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from synthetic.sampling import allocate
from synthetic.validation import ParameterError, check_finite_array, check_integer, check_number

__all__ = ["Pretraining"]

_TRAIN, _HELDOUT = 0x70747831, 0x70747832  # stream tags: "ptx1", "ptx2"


@dataclass(frozen=True)
class Pretraining:
    """Gaussian components ``(means (C, d), sigmas (C,), tokens (C,), weights (C,))``."""

    means: np.ndarray
    sigmas: np.ndarray
    tokens: np.ndarray
    weights: np.ndarray

    def __post_init__(self):
        means = check_finite_array("pretrain.means", self.means, np.shape(self.means))
        if means.ndim != 2 or len(means) == 0:
            raise ParameterError("pretrain.components", means.shape,
                                 "must be one or more components with a mean of length d")
        count = len(means)
        for name, values in (("sigma", self.sigmas), ("weight", self.weights)):
            if np.shape(values) != (count,):
                raise ParameterError(f"pretrain.{name}s", np.shape(values), f"must have {count}")
        for i in range(count):
            check_number(f"pretrain.components.{i}.sigma", self.sigmas[i], ge=0)
            check_number(f"pretrain.components.{i}.weight", self.weights[i], gt=0)
            check_integer(f"pretrain.components.{i}.token", self.tokens[i], ge=0)
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "sigmas", np.asarray(self.sigmas, dtype=np.float64))
        object.__setattr__(self, "tokens", np.asarray(self.tokens, dtype=np.int64))
        weights = np.asarray(self.weights, dtype=np.float64)
        object.__setattr__(self, "weights", weights / weights.sum())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def check_vocab(self, vocab: int) -> None:
        for i, token in enumerate(self.tokens):
            if token >= vocab:
                raise ParameterError(f"pretrain.components.{i}.token", int(token),
                                     f"must be < the vocabulary size {vocab}")

    def sample(self, n: int, seeds: Sequence[int], *, heldout: bool = False,
               dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` examples per seed, components in order: features ``(S, n, d)`` and
        target tokens ``(n,)`` (the layout is shared by the seeds)."""
        n = check_integer("pretrain.n", n, ge=1)
        counts = allocate(n, self.weights)
        tokens = np.repeat(self.tokens, counts)
        tag = _HELDOUT if heldout else _TRAIN
        features = []
        for seed in seeds:
            rng = np.random.default_rng([int(seed), tag])
            parts = [mean + sigma * rng.standard_normal((count, self.dim))
                     for mean, sigma, count in zip(self.means, self.sigmas, counts)]
            features.append(np.concatenate(parts))
        return (torch.as_tensor(np.stack(features), dtype=dtype, device=device),
                torch.as_tensor(tokens, device=device))

    def cloud(self, points: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Scrambled Sobol points of each component ``(C, M, d)`` float64 and the
        tokens ``(C,)``: the population flow's expectations over the distribution."""
        from scipy import stats

        unit = stats.qmc.Sobol(self.dim, scramble=True, seed=seed).random(points)
        z = stats.norm.ppf(np.clip(unit, 1e-12, 1 - 1e-12))
        cloud = self.means[:, None, :] + self.sigmas[:, None, None] * z[None]
        return torch.as_tensor(cloud), torch.as_tensor(self.tokens)
