"""One experiment from a resolved config: theory and simulation, written to disk.

:func:`run_experiment` computes; :func:`write_run` writes ``metrics.parquet``
(atomically: a run that fails leaves no half-written file), the resolved
``config.toml`` and ``env.json``. Both are used by ``prefdyn run`` and
``prefdyn demo`` and are importable for notebooks.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from dynamics.bounds import accuracy_lower_bound, loss_envelope, weight_change_bound
from dynamics.config import (build_problem, dump_config, objective_name, phases_of,
                             pretraining_of, reward_scales_of)
from dynamics.io import atomic_write_all, environment, resolve_device
from dynamics.model import NO, YES, reference_weights
from dynamics.phases import flipped_mixture, run_simulation, run_theory
from synthetic.mixture import empirical_mixture, population_mixture
from synthetic.sampling import sample_batch
from synthetic.validation import ParameterError

__all__ = ["BOUND_COLUMNS", "available_memory", "check_memory", "estimate_memory",
           "run_experiment", "summary_table", "write_run"]


BOUND_COLUMNS = ("weight_change_bound", "loss_lower", "loss_upper", "accuracy_lower",
                 "reward_accuracy_lower")
"""Columns :func:`run_experiment` adds when ``theory.bounds``: Theorem 1's bound on
``‖W − W0‖_F``, Theorem 2's loss envelope and Theorem 3's lower bounds on the ranking
and implicit-reward accuracies. On theory rows they are computed from the population,
on simulation rows from that run's own sample (so each row's bound holds for that
row's trajectory); NaN where no theorem applies (a run not started at the reference,
minibatch SGD, an objective other than DPO)."""


def _bounds(mixture, *, beta, lr, steps, reference, record, continuous=False) -> np.ndarray:
    """The bound columns at the ``record`` steps, shape ``(E, K, 5)``."""
    kwargs = dict(beta=beta, lr=lr, steps=steps, continuous=continuous)
    u0 = reference[YES] - reference[NO]
    weight = weight_change_bound(mixture, **kwargs)[:, None]
    lower, upper = loss_envelope(mixture, **kwargs)
    acc = accuracy_lower_bound(mixture, reference_direction=u0, **kwargs)
    reward = accuracy_lower_bound(mixture, **kwargs)
    columns = np.broadcast_arrays(weight, lower, upper, acc, reward)
    return np.stack(columns, -1)[record]


_FRAME_BYTES_PER_ROW = 1024
"""A row of the tidy metrics table at its peak (about 24 columns, some of them Python
objects, held by the per-phase frames and their concatenation at once): measured
about 1 KiB (tests/test_bad_input.py)."""


def _memory_terms(config: dict) -> dict[str, int]:
    """The simulation's memory by part, in bytes (see :func:`estimate_memory`)."""
    from dynamics.objectives import resolve_objective

    problem, model, train = config["problem"], config["model"], config["train"]
    seeds, n, dim = len(train["seeds"]), train["n"], problem["dim"]
    behaviors, vocab = len(problem["behaviors"]), model["vocab_size"]
    item = 8 if train["dtype"] == "float64" else 4
    phases = phases_of(config)
    pretrain, pretrain_n = pretraining_of(config)
    rows = max((resolve_objective(p.objective)[0].rows or vocab) for p in phases)
    batch = train.get("batch_size") or n
    recorded = sum(p.steps // train["eval_every"] + 2 for p in phases if p.record)
    features = seeds * n * dim
    subset = any(p.behaviors is not None for p in phases)
    rl = any(resolve_objective(p.objective)[0].data == "prompts" for p in phases)
    return {
        # numpy draws (float64), their stack, and the tensor in the run's dtype
        "sampling": features * (8 + 8 + item),
        # the features and their signed copy (and a training subset's), the (S, P·R, B)
        # margins, the evaluator's (6, S, P, n) buffer and its scratch
        "training": features * item * (2 + 2 * subset) + seeds * (rows * batch + 7 * n) * item
        # PPO-ptx's training and held-out pretraining draws (float64, then the run's dtype)
        + (0 if pretrain is None else 2 * seeds * pretrain_n * dim * (8 + item))
        # RL: reference logits and rewards on the training prompts, task and trained
        # rewards on the evaluated ones, and the rollout's logits and returns
        + (6 * seeds * vocab * n * item if rl else 0)
        # an MLP head: its (S, H, B) pre-activations, activations and their gradients held
        # by autograd, and the (S, H, n) hidden layer of an evaluation
        + seeds * model.get("hidden_units", 0) * (4 * batch + n) * item
        # a held-out sample: its draws, features and signed copy, and its evaluator's rows
        + seeds * train.get("heldout_n", 0) * (dim * (8 + 8 + 2 * item) + 7 * item),
        # the recorded (E, S, P, K, 7) metrics and the tidy table built from them
        "metrics": recorded * seeds * behaviors * (7 * 8 + _FRAME_BYTES_PER_ROW),
    }


def estimate_memory(config: dict) -> int:
    """Peak memory of the simulation of a resolved config, in bytes (an estimate).

    Counts the big arrays: the ``S × n × d`` features (drawn in float64, then held
    in the run's dtype with a signed copy), the ``(S, P·R, n)`` margin buffer, the
    evaluator's ``(6, S, P, n)`` buffer and the recorded metrics (``E × S × P × K × 7``
    and the tidy table), with ``P = 1`` configuration per run. The population flow
    (:mod:`dynamics.analytic`) is not counted.
    """
    terms = _memory_terms(config)
    return int(max(terms["sampling"], terms["training"]) + terms["metrics"])


def available_memory(device: str = "cpu") -> int | None:
    """Bytes free for a run on ``device``: ``MemAvailable`` of ``/proc/meminfo`` on
    the CPU, the free memory of the GPU for CUDA; None when unknown."""
    if device != "cpu":
        try:
            dev = resolve_device(device)
        except ParameterError:
            return None
        if dev.type == "cuda":
            try:
                return int(torch.cuda.mem_get_info(dev)[0])
            except RuntimeError:
                return None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _size(count: int) -> str:
    return f"{count / (1 << 30):.1f} GiB" if count >= 1 << 30 else f"{count / (1 << 20):.0f} MiB"


def check_memory(config: dict, *, jobs: int = 1) -> None:
    """Refuse a config whose :func:`estimate_memory` (times ``jobs`` runs at once)
    exceeds :func:`available_memory`, naming the keys that reduce it; no check when
    the available memory is unknown."""
    terms = _memory_terms(config)
    need = estimate_memory(config) * jobs
    available = available_memory(config["train"]["device"])
    if available is None or need <= available:
        return
    sizes = (f"the run needs about {_size(need)} of memory"
             f"{f' ({jobs} at once)' if jobs > 1 else ''} and {_size(available)} are "
             f"available")
    also = ", or --jobs" if jobs > 1 else ""
    train = config["train"]
    if terms["metrics"] > max(terms["sampling"], terms["training"]):
        raise ParameterError("train.eval_every", train["eval_every"],
                             f"must be larger: {sizes}; raise train.eval_every or reduce "
                             f"train.steps or train.seeds{also}")
    raise ParameterError("train.n", train["n"], f"must be smaller: {sizes}; reduce train.n, "
                         f"train.seeds or problem.dim{also}")


def run_experiment(config: dict, *, progress: bool = True) -> pd.DataFrame:
    """Theory (if ``theory.population``) and simulation for a validated config.

    Returns the tidy metrics table (see :mod:`dynamics.metrics`) with a ``phase``
    and an ``objective`` column, and the :data:`BOUND_COLUMNS` when
    ``theory.bounds``. The training is the config's phases
    (:func:`dynamics.config.phases_of`, :mod:`dynamics.phases`): both solvers run
    every phase from where the previous one left the model, the population on the
    population and each seed on its own sample. With ``flip`` a phase trains on
    swapped preferences and reports metrics against the swapped labels; the
    shorthand ``train.start = "aligned"`` is an unrecorded phase of
    ``train.align_steps`` DPO steps on the unflipped data first (step 0 = the
    aligned policy).

    Capacity (``model.features = k``, ``model.hidden_units = H``): the head sees the
    first ``k`` coordinates of samples drawn at ``problem.dim`` (the theory: the
    marginal problem, :meth:`synthetic.problem.Problem.restrict`); an MLP head
    (:mod:`dynamics.mlp_head`) has simulation rows only, and no bound columns.
    """
    drawn = build_problem(config)  # samples are drawn here, then truncated to k coordinates
    model, train, theory = config["model"], config["train"], config["theory"]
    w0 = reference_weights(drawn.dim, vocab_size=model["vocab_size"],
                           scale=model["init_scale"], seed=model["init_seed"],
                           given=model.get("reference"))
    phases = phases_of(config)
    pretrain, pretrain_n = pretraining_of(config)
    problem, w0, head0, offset, pretrain = _restricted(model.get("features", drawn.dim), drawn,
                                                       w0, model, pretrain)
    mlp = ({"hidden_units": model["hidden_units"], "head_seed": model["init_seed"]}
           if "hidden_units" in model else None)
    # Theorems 1-3 are about DPO (a linear head) from the reference on the whole training set
    only = phases[0]
    bounded = (theory["bounds"] and len(phases) == 1 and only.behaviors is None
               and objective_name(only.objective) == "dpo" and mlp is None)
    beta, every = train["beta"], train["eval_every"]
    total = sum(p.steps for p in phases)
    frames = []
    bar = tqdm(total=total * (1 + theory["population"]), desc="prefdyn",
               unit="step", disable=not progress, leave=False, file=sys.stderr)
    try:
        if theory["population"]:
            mixture = population_mixture(problem)
            flow = dict(panel_width=theory["panel_width"], qmc_points=theory["qmc_points"],
                        continuous=theory["continuous"])
            recorded, trajectories = run_theory(mixture, phases, beta=beta, reference=w0,
                                                eval_every=every, progress=bar.update,
                                                reward_head=head0, pretrain=pretrain,
                                                reward_scales=reward_scales_of(config),
                                                prompt_offset=offset, **flow)
            if theory["bounds"]:
                for frame, trajectory in zip(recorded, _recorded(trajectories, phases)):
                    values = np.full((len(trajectory.steps), len(problem.names),
                                      len(BOUND_COLUMNS)), np.nan)
                    # a judge's per-point labels are no component's: no population bound
                    if bounded and problem.principles is None:
                        target = flipped_mixture(mixture) if only.flip else mixture
                        values = _bounds(target, beta=beta, lr=only.lr, steps=only.steps,
                                         reference=w0, record=trajectory.steps,
                                         continuous=theory["continuous"])
                    for j, name in enumerate(BOUND_COLUMNS):
                        frame[name] = values[:, :, j].reshape(-1)  # rows are (step, behavior)
            frames += recorded
        dtype = torch.float64 if train["dtype"] == "float64" else torch.float32
        seeds = train["seeds"]
        data = sample_batch(drawn, train["n"], seeds, dtype=dtype,
                            device=resolve_device(train["device"])).restrict(problem.dim)
        heldout = _heldout(drawn, train, dtype)
        heldout = None if heldout is None else heldout.restrict(problem.dim)
        recorded, results = run_simulation(data, phases, seeds=seeds, beta=beta, reference=w0,
                                           eval_every=every, batch_size=train.get("batch_size"),
                                           progress=lambda k: bar.update(1),
                                           reward_head=head0,
                                           pretrain=pretrain, pretrain_n=pretrain_n,
                                           reward_scales=reward_scales_of(config),
                                           heldout=heldout,
                                           prompt_offset=offset, mlp=mlp)
        if theory["bounds"]:
            full_batch = train.get("batch_size", train["n"]) == train["n"]
            for frame, result in zip(recorded, _recorded(results, phases)):
                values = np.full((len(result.steps), len(seeds), len(problem.names),
                                  len(BOUND_COLUMNS)), np.nan)
                if bounded and full_batch:
                    signs = -data.signs if only.flip else data.signs
                    for i in range(len(seeds)):
                        sample = empirical_mixture(data.features[i], signs[i], data.behavior,
                                                   data.names)
                        values[:, i] = _bounds(sample, beta=beta, lr=only.lr,
                                               steps=only.steps, reference=w0,
                                               record=result.steps)
                for j, name in enumerate(BOUND_COLUMNS):
                    frame[name] = values[..., j].reshape(-1)  # rows are (step, seed, behavior)
        frames += recorded
    finally:
        bar.close()
    return pd.concat(frames, ignore_index=True)


def _restricted(k: int, problem, w0, model: dict, pretrain):
    """What the head sees with ``model.features = k``: the marginal problem, ``W0[:, :k]``,
    and the reward head, prompt offset and pretraining means cut to their first ``k``
    coordinates (``k = d``: all as given)."""
    head, offset = model.get("reward_head"), model.get("prompt_offset")
    if k == problem.dim:
        return problem, w0, head, offset, pretrain
    cut = lambda v: None if v is None else np.asarray(v, dtype=np.float64)[..., :k]  # noqa
    if pretrain is not None:
        pretrain = dataclasses.replace(pretrain, means=cut(pretrain.means))
    return problem.restrict(k), w0[:, :k], cut(head), cut(offset), pretrain


_HELDOUT_TAG = 0x68656c64  # "held": the held-out sample's stream, apart from the training one


def _heldout(problem, train: dict, dtype):
    """Each seed's held-out sample (``train.heldout_n``), or None."""
    if "heldout_n" not in train:
        return None
    streams = [np.random.default_rng([int(seed), _HELDOUT_TAG]) for seed in train["seeds"]]
    return sample_batch(problem, train["heldout_n"], streams, dtype=dtype,
                        device=resolve_device(train["device"]))


def _recorded(items: list, phases) -> list:
    return [item for item, phase in zip(items, phases) if phase.record]


def write_run(out: str | Path, config: dict, frame: pd.DataFrame) -> Path:
    """Write ``metrics.parquet``, ``config.toml`` and ``env.json`` under ``out``, all
    or none: the three are written to temporaries first and renamed into place
    together (metrics first), so a write that fails (a full disk) leaves ``out`` as
    it was, and a run directory never holds a config and env without metrics."""
    out = Path(out)
    env = environment(config["train"]["device"])
    atomic_write_all({
        out / "metrics.parquet": lambda p: frame.to_parquet(p, index=False),
        out / "config.toml": lambda p: p.write_text(dump_config(config)),
        out / "env.json": lambda p: p.write_text(json.dumps(env, indent=2) + "\n"),
    })
    return out


def _half_life(curve: pd.Series) -> float:
    """First step at which a loss curve has fallen half-way from its start to its end."""
    start, end = curve.iloc[0], curve.iloc[-1]
    if not end < start:
        return float("nan")
    reached = curve.index[curve <= start - (start - end) / 2]
    return float(reached[0])


def summary_table(frame: pd.DataFrame, problem) -> pd.DataFrame:
    """Per behavior: distinguishability, predicted priority rank, the step at which
    the loss is half-way down (theory; simulation mean), final loss and accuracy
    (theory; simulation mean ± sd over seeds), and max |theory − simulation| of
    the mean loss curve."""
    from dynamics.bounds import priority_scores

    rows = priority_scores(problem).set_index("behavior")[["distinguishability", "rank"]]
    sim = frame[frame["source"] == "simulation"]
    sim_curve = sim.groupby(["behavior", "step"], observed=True)["loss"].mean()
    last = sim[sim["step"] == sim["step"].max()].groupby("behavior", observed=True)
    rows["half_step_sim"] = sim_curve.groupby(level=0, observed=True).apply(
        lambda c: _half_life(c.droplevel(0)))
    rows["loss_sim"] = last["loss"].mean()
    rows["loss_sim_sd"] = last["loss"].std(ddof=1)
    rows["accuracy_sim"] = last["accuracy"].mean()
    theory = frame[frame["source"] == "theory"]
    if len(theory):
        th_curve = theory.set_index(["behavior", "step"])["loss"]
        final = theory[theory["step"] == theory["step"].max()].set_index("behavior")
        rows["half_step_theory"] = th_curve.groupby(level=0, observed=True).apply(
            lambda c: _half_life(c.droplevel(0)))
        rows["loss_theory"] = final["loss"]
        rows["accuracy_theory"] = final["accuracy"]
        rows["max_gap"] = (sim_curve - th_curve).abs().groupby(level=0, observed=True).max()
    return rows.reset_index()
