"""Training in phases: an ordered list of (objective, steps, lr, behaviors, flip).

"Align, then flip" and "SFT → reward model → RL" are configs, not branches in
code: each phase trains one objective from where the previous phases left the
model, on the population (theory) and on every seed's sample (simulation).

Between phases the model is held in its *canonical state*: the policy's change
``D = W − W0`` and the reward head ``Φ``, both ``V × d``. A phase reads its
objective's parameter ``θ`` from the block it trains (the ``Yes − No``
difference, the two rows, or every row; :mod:`dynamics.objectives`), runs the
solver from there, and writes ``θ`` back, leaving everything it does not train
as it was. The reference policy stays ``W0`` throughout (a phase's implicit
rewards are ``β log π/π0``), so the metrics of successive phases are on one scale:

* a policy-difference phase (DPO family) after a phase that moved the policy's
  rows other than equal and opposite (SFT with ``V > 2``) runs with the reference
  ``W0 + B``, ``B`` the part of ``D`` it does not train (``B_Yes = B_No``, so its
  margins, ranking and implicit-reward accuracies are unchanged), and adds to
  ``rewards/chosen`` and ``rewards/rejected`` the per-sample constant
  ``β(log π_B(y) − log π0(y))`` (the same for both answers); its weight change is
  ``√(‖Δ‖²/2 + ‖B‖²)``; its ``objective/kl`` is not reported (NaN);
* a reward-head phase runs with the reference ``W0 + D`` (the policy as it is),
  so its ranking accuracy is the current policy's; its weight change is ``‖D‖``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from dynamics.analytic import PopulationFlow, population_descent
from dynamics.model import NO, YES
from dynamics.objectives import resolve_objective
from dynamics.simulate import simulate_sample
from synthetic.mixture import Mixture
from synthetic.sampling import PreferenceSample
from synthetic.validation import ParameterError

__all__ = ["Phase", "run_theory", "run_simulation", "flipped_mixture", "restrict_mixture"]


@dataclass(frozen=True)
class Phase:
    """One training phase (see the module docstring).

    objective: a name or a table with hyperparameters · behaviors: indices trained
    on (``None``: all) · record: whether its metrics are kept (an unrecorded phase
    only prepares the start of the next, and does not advance the step count) ·
    n: statements per seed trained on (a class-stratified subset of the behaviors'
    share, :func:`dynamics.simulate.simulate_sample`'s ``train_n``; ``None``: all; the
    population is the same whatever ``n``).
    """

    objective: object
    steps: int
    lr: float
    behaviors: tuple[int, ...] | None = None
    flip: bool = False
    record: bool = True
    n: int | None = None


def flipped_mixture(mixture: Mixture) -> Mixture:
    """The same measure with every observed preference swapped."""
    judge = None if mixture.principles is None else mixture.principles.flipped()
    return dataclasses.replace(mixture, signs=-mixture.signs, true_signs=-mixture.true_signs,
                               principles=judge)


def restrict_mixture(mixture: Mixture, behaviors: Sequence[int] | None) -> Mixture:
    """The components of ``behaviors`` only, weights renormalised (``None``: all)."""
    if behaviors is None:
        return mixture
    keep = np.isin(mixture.behavior, list(behaviors))
    w = mixture.weights[keep]
    return dataclasses.replace(mixture, weights=w / w.sum(), signs=mixture.signs[keep],
                               behavior=mixture.behavior[keep], means=mixture.means[keep],
                               covs=mixture.covs[keep], true_signs=mixture.true_signs[keep])


# ----------------------------------------------------------------------------- views


def read_view(obj, block):
    """``θ`` of ``obj`` from a canonical block ``(..., V, d)`` (NumPy or torch)."""
    if obj.view == "difference":
        return block[..., YES, :] - block[..., NO, :]
    if obj.view == "rows":
        return block[..., [YES, NO], :]
    return block


def write_view(obj, block, theta0, theta):
    """The block with ``θ`` written back (``theta0`` what was read at the start)."""
    out = block.clone() if isinstance(block, torch.Tensor) else block.copy()
    if obj.view == "difference":
        change = (theta - theta0) / 2  # the two rows move equal and opposite
        out[..., YES, :] += change
        out[..., NO, :] -= change
    elif obj.view == "rows":
        out[..., YES, :], out[..., NO, :] = theta[..., 0, :], theta[..., 1, :]
    else:
        out[...] = theta
    return out


def _untrained_part(obj, policy):
    """``B``: the part of the policy's change a difference-view phase leaves alone
    (``D`` minus ``½(e_Yes − e_No)Δᵀ``)."""
    if obj.view != "difference":
        return None
    return write_view(obj, policy, read_view(obj, policy), 0 * read_view(obj, policy))


# ----------------------------------------------------------------------------- runners


@dataclass
class _Recorder:
    """Concatenates the recorded phases' frames with global steps and times."""

    frames: list
    step: int = 0
    time: float = 0.0

    def add(self, frame: pd.DataFrame, index: int, phase: Phase, name: str) -> None:
        if phase.record:
            frame = frame.copy()
            frame.insert(0, "objective", name)
            frame.insert(0, "phase", index)
            frame["t"] = self.time + phase.lr * frame["step"]
            frame["step"] = self.step + frame["step"]
            self.frames.append(frame)
            self.step += phase.steps
            self.time += phase.lr * phase.steps


def _initial_head(reward_head, shape) -> np.ndarray:
    return np.zeros(shape) if reward_head is None else np.array(reward_head, dtype=np.float64)


def _head_for(obj, head, index: int):
    """The frozen reward head an RL phase maximises (None for other objectives)."""
    if obj.data != "prompts":
        return None
    if not bool((head != 0).any()):
        raise ParameterError(f"phases.{index}.objective", obj.name,
                             "needs a reward head: a reward_model (or binary) phase before "
                             "it, or model.reward_head")
    return head


def run_theory(mixture: Mixture, phases: Sequence[Phase], *, beta: float, reference: np.ndarray,
               eval_every: int, progress: Callable[[int], None] | None = None,
               reward_head=None, pretrain=None, reward_scales=None, prompt_offset=None,
               **flow) -> tuple[list[pd.DataFrame], list]:
    """The population through every phase: the recorded frames and, per phase,
    its trajectory (for bounds). ``reward_head``: ``Φ`` at the start (default 0)."""
    vocab, dim = reference.shape
    state = {"policy": np.zeros((vocab, dim)), "reward": _initial_head(reward_head, (vocab, dim))}
    recorder, trajectories = _Recorder([]), []
    for index, phase in enumerate(phases):
        obj, _ = resolve_objective(phase.objective)
        block = state[obj.block]
        theta0 = read_view(obj, block)
        target = flipped_mixture(mixture) if phase.flip else mixture
        ref, base = _phase_reference(obj, state, reference)
        trajectory = population_descent(
            target, beta=beta, lr=phase.lr, steps=phase.steps, reference=ref,
            objective=phase.objective, delta0=theta0,
            eval_every=eval_every if phase.record else phase.steps,
            train_mixture=restrict_mixture(target, phase.behaviors),
            reward_head=_head_for(obj, state["reward"], index), pretrain=pretrain,
            reward_scales=reward_scales, prompt_offset=prompt_offset, **flow)
        if base is not None and np.any(base):
            _correct_theory(trajectory, PopulationFlow(target, beta=beta, reference=reference,
                                                       objective=phase.objective, **_qmc(flow)),
                            reference, base, beta)
        if obj.block == "reward":
            trajectory.weight_change = np.full_like(trajectory.weight_change,
                                                    np.linalg.norm(state["policy"]))
        state[obj.block] = write_view(obj, block, theta0, trajectory.deltas[-1])
        recorder.add(trajectory.frame(), index, phase, obj.name)
        trajectories.append(trajectory)
        if progress is not None:
            progress(phase.steps)
    return recorder.frames, trajectories


def run_simulation(data: PreferenceSample, phases: Sequence[Phase], *, seeds, beta: float,
                   reference: np.ndarray, eval_every: int, batch_size: int | None = None,
                   progress: Callable[[int], None] | None = None, reward_head=None,
                   pretrain=None, pretrain_n: int | None = None, reward_scales=None,
                   heldout: PreferenceSample | None = None, prompt_offset=None,
                   mlp: dict | None = None) -> tuple[list[pd.DataFrame], list]:
    """Every seed through every phase: the recorded frames and, per phase, its
    :class:`~dynamics.simulate.SimulationResult`. ``reward_head``: ``Φ`` at the
    start (default 0), the same for every seed. ``mlp`` (``hidden_units``, ``head_seed``):
    an MLP head (:mod:`dynamics.mlp_head`), whose state no later phase reads."""
    num_seeds, _, dim = data.features.shape
    vocab = reference.shape[0]
    dtype, device = data.features.dtype, data.features.device
    zeros = torch.zeros(num_seeds, 1, vocab, dim, dtype=torch.float64, device=device)
    head = torch.as_tensor(_initial_head(reward_head, (vocab, dim)), device=device)
    state = {"policy": zeros, "reward": zeros + head}
    w0 = torch.as_tensor(reference, dtype=torch.float64, device=device)
    recorder, results = _Recorder([]), []
    for index, phase in enumerate(phases):
        obj, _ = resolve_objective(phase.objective)
        block = state[obj.block]
        theta0 = read_view(obj, block)
        flip = lambda d: (None if d is None else  # noqa: E731
                          dataclasses.replace(d, signs=-d.signs, true_signs=-d.true_signs))
        sample = flip(data) if phase.flip else data
        held = flip(heldout) if phase.flip else heldout
        ref, base = _phase_reference(obj, {k: v[:, 0] for k, v in state.items()}, w0)
        result = simulate_sample(
            sample, seeds=seeds, beta=beta, lr=phase.lr, steps=phase.steps,
            reference=ref.to(dtype), objective=phase.objective,
            delta0=theta0.to(dtype), batch_size=batch_size,
            eval_every=eval_every if phase.record else phase.steps,
            train_behaviors=phase.behaviors, train_n=phase.n, progress=progress,
            reward_head=_head_for(obj, state["reward"][:, 0], index), pretrain=pretrain,
            pretrain_n=pretrain_n, reward_scales=reward_scales,
            heldout=None if held is None else dataclasses.replace(
                held, features=held.features.to(dtype)), prompt_offset=prompt_offset,
            **(mlp or {}))
        if result.final is None:  # an MLP head: one phase, no canonical state to carry
            recorder.add(result.frame(), index, phase, obj.name)
            results.append(result)
            continue
        if base is not None and bool(torch.any(base != 0)):
            _correct_simulation(result, sample, w0, base, beta)
        if obj.block == "reward":
            norms = state["policy"].flatten(-2).norm(dim=-1).cpu().numpy()  # (S, 1)
            result.weight_change = np.broadcast_to(norms, result.weight_change.shape).copy()
        final = result.final.to(torch.float64)  # θ, shaped like theta0
        state[obj.block] = write_view(obj, block, theta0, final)
        recorder.add(result.frame(), index, phase, obj.name)
        results.append(result)
    return recorder.frames, results


def _phase_reference(obj, state, reference):
    """The reference a phase runs with, and the untrained part ``B`` of a
    difference-view policy phase (see the module docstring)."""
    if obj.block == "reward":
        return reference + state["policy"], None
    base = _untrained_part(obj, state["policy"])
    if base is None:
        return reference, None
    return reference + base, base


def _qmc(flow: dict) -> dict:
    return {k: v for k, v in flow.items() if k in ("qmc_points", "qmc_seed")}


def _offset(logits0, logits_b, yes_shift):
    """``log π_B(y) − log π0(y)`` for y = Yes (= for No): ``B_Yesᵀg − (log Z_B − log Z0)``."""
    return yes_shift - (torch.logsumexp(logits_b, -1) - torch.logsumexp(logits0, -1))


def _correct_theory(trajectory, flow: PopulationFlow, reference, base, beta) -> None:
    cloud = flow._cloud()  # (C, M, d)
    w0 = torch.as_tensor(reference, dtype=torch.float64)
    b = torch.as_tensor(base, dtype=torch.float64)
    offset = _offset(cloud @ w0.T, cloud @ (w0 + b).T, cloud @ b[YES]).mean(-1)  # (C,)
    weights = flow.members * flow.pi[:, None] / flow.pi_k  # (C, K)
    per_k = (beta * offset @ weights).numpy()  # (K,)
    for name in ("rewards/chosen", "rewards/rejected"):
        trajectory.per_behavior[name] = trajectory.per_behavior[name] + per_k
    # the KL the flow took is to the phase's reference W0 + B, not to W0: not reported
    trajectory.per_behavior["objective/kl"] = np.full_like(
        trajectory.per_behavior["objective/kl"], np.nan)
    trajectory.weight_change = np.sqrt(trajectory.weight_change**2 + float((b**2).sum()))


def _correct_simulation(result, sample, w0, base, beta) -> None:
    x = sample.features.to(torch.float64)  # (S, n, d)
    b = base[:, 0] if base.dim() == 4 else base  # (S, V, d)
    offset = _offset(x @ w0.T, x @ (w0 + b).transpose(1, 2),
                     (x @ b[:, YES, :, None]).squeeze(-1))  # (S, n)
    counts = torch.bincount(sample.behavior, minlength=len(sample.names)).to(torch.float64)
    sums = torch.zeros(x.shape[0], len(sample.names), dtype=torch.float64, device=x.device)
    sums.index_add_(1, sample.behavior, offset)
    per_k = (beta * sums / counts).cpu().numpy()  # (S, K)
    for name in ("rewards/chosen", "rewards/rejected"):
        result.per_behavior[name] = result.per_behavior[name] + per_k[None, :, None, :]
    result.per_behavior["objective/kl"] = np.full_like(result.per_behavior["objective/kl"],
                                                       np.nan)  # to W0 + B, not W0
    extra = (b**2).sum((-2, -1)).cpu().numpy()  # (S,)
    result.weight_change = np.sqrt(result.weight_change**2 + extra[None, :, None])
