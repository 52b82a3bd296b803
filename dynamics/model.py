"""The last-layer model of Im & Li (THEORY §1) and its reduction to ``Δ``.

``π_W(y|x) = softmax(W g)_y`` with ``W ∈ R^{V×d}``; rows :data:`YES` and
:data:`NO` are the two answers. DPO's gradient touches only those rows, equal
and opposite, so training from ``W0`` keeps

    W(t) = W0 + ½ (e_Yes − e_No) Δ(t)ᵀ,       ‖W(t) − W0‖_F = ‖Δ(t)‖ / √2,

and the margin of a statement with sign ``s`` is ``h = s Δᵀg``. Everything
the dynamics computes works on ``Δ``; this module maps back to ``W`` and to
per-token log-probabilities (used by TRL's reward metrics and by tests that
train ``W`` itself with autograd).
"""

from __future__ import annotations

import numpy as np
import torch

from synthetic.validation import ParameterError, check_finite_array, check_integer, check_number

__all__ = ["YES", "NO", "reference_weights", "policy_weights", "answer_logps"]

YES, NO = 0, 1


def reference_weights(dim: int, *, vocab_size: int = 2, scale: float = 1.0, seed: int = 0,
                      given=None) -> np.ndarray:
    """The reference unembedding ``W0``, shape ``(V, d)``, float64.

    ``given`` (a ``(V, d)`` array) is validated and returned; otherwise the
    entries are i.i.d. ``N(0, scale²/d)`` from ``seed``, so ``‖u0‖`` with
    ``u0 = w0_Yes − w0_No`` is about ``scale·√2``.
    """
    dim = check_integer("dim", dim, ge=1)
    vocab_size = check_integer("vocab_size", vocab_size, ge=2)
    if given is not None:
        return check_finite_array("reference", given, (vocab_size, dim))
    scale = check_number("init_scale", scale, ge=0)
    rng = np.random.default_rng(check_integer("init_seed", seed, ge=0))
    return rng.standard_normal((vocab_size, dim)) * (scale / np.sqrt(dim))


def policy_weights(w0: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W = W0 + ½ (e_Yes − e_No) Δᵀ``; ``w0 (V, d)``, ``delta (d,)`` → ``(V, d)``."""
    w = w0.clone()
    w[YES] += delta / 2
    w[NO] -= delta / 2
    return w


def answer_logps(w: torch.Tensor, features: torch.Tensor, signs: torch.Tensor):
    """``(log π(y_w|g), log π(y_l|g))`` for each statement; ``w (V, d)``,
    ``features (n, d)``, ``signs (n,)`` → two ``(n,)`` tensors."""
    if w.shape[0] < 2:
        raise ParameterError("vocab_size", w.shape[0], "must be >= 2")
    logp = torch.log_softmax(features @ w.T, dim=-1)  # (n, V)
    yes, no = logp[:, YES], logp[:, NO]
    positive = signs > 0
    return torch.where(positive, yes, no), torch.where(positive, no, yes)
