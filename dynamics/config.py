"""Experiment configuration: a TOML schema declared as data, validated once.

Every key is declared in :data:`SCHEMA` with its default, its rule and its
documentation; the README's config reference, the checks and the "unknown key"
suggestions all come from it. :func:`load_config` reads a file, applies
``--set KEY=VALUE`` overrides and returns a fully resolved, validated
:class:`dict`; :func:`build_problem` turns its ``[problem]`` table into a
:class:`synthetic.Problem`. Every error is a :class:`ParameterError` whose
message names the key path (``train.beta``), shows the value and states the
rule.
"""

from __future__ import annotations

import copy
import json
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynamics.objectives import OBJECTIVES, resolve_objective, show_default
from synthetic.families import FAMILIES
from synthetic.principles import principles_with_cosine, shared_principles
from synthetic.problem import Behavior, Problem, behaviors_with_angles, isotropic
from synthetic.sampling import allocate
from synthetic.validation import (
    ParameterError,
    check_choice,
    check_finite_array,
    check_integer,
    check_number,
    did_you_mean,
)

__all__ = ["Key", "SCHEMA", "BEHAVIOR_KEYS", "load_config", "read_toml", "parse_config",
           "apply_override", "descend", "build_problem", "dump_config", "config_reference",
           "objective_name", "PHASE_KEYS", "phases_of"]


@dataclass(frozen=True)
class Key:
    """One config key: default (``None`` = optional, no default), check, doc."""

    default: object
    check: Callable[[str, object], object]
    doc: str
    required: bool = False


def _num(**bounds):
    return lambda name, v: check_number(name, v, **bounds)


def _int(**bounds):
    return lambda name, v: check_integer(name, v, **bounds)


def _choice(choices):
    return lambda name, v: check_choice(name, v, choices)


def _bool(name, v):
    if not isinstance(v, bool):
        raise ParameterError(name, v, "must be true or false")
    return v


def _str(name, v):
    if not isinstance(v, str) or not v:
        raise ParameterError(name, v, "must be a non-empty string")
    return v


def _seeds(name, v):
    """An integer count ``N`` (seeds 0..N−1) or a list of distinct integers ≥ 0."""
    if isinstance(v, int) and not isinstance(v, bool):
        return list(range(check_integer(name, v, ge=1)))
    if not isinstance(v, list) or not v:
        raise ParameterError(name, v, "must be a count >= 1 or a non-empty list of integers")
    seeds = [check_integer(f"{name}.{i}", s, ge=0) for i, s in enumerate(v)]
    if len(set(seeds)) != len(seeds):
        raise ParameterError(name, v, "must not repeat a seed")
    return seeds


def _any(name, v):
    return v


def _hidden_units(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ParameterError(name, v, "must be an integer >= 1: an MLP head needs at least one "
                             "hidden unit")
    return v


def _objective(name, v):
    """A registered objective's name, or a table ``{ name = ..., <hyperparameters> }``;
    resolved to the name alone when the objective has no hyperparameters, else to
    the table with every hyperparameter filled in."""
    obj, hyper = resolve_objective(v, path=name)
    return {"name": obj.name, **hyper} if obj.hyper else obj.name


def _train_objective(name, v):
    """``train.objective``: as :func:`_objective`, a table without a name being the
    default objective's (``--set train.objective.KEY=...`` on a config that names none)."""
    if isinstance(v, dict) and "name" not in v:
        v = {"name": SCHEMA["train"]["objective"].default, **v}
    return _objective(name, v)


def objective_name(spec) -> str:
    """The objective's name in a resolved ``train.objective`` (a name or a table)."""
    return spec if isinstance(spec, str) else spec["name"]


def _objective_doc() -> str:
    parts = []
    for obj in OBJECTIVES.values():
        keys = ", ".join(f"{k} ({spec.rule()}, default {show_default(spec.default)})"
                         for k, spec in obj.hyper.items())
        parts.append(f"`{obj.name}` {obj.formula}" + (f" [keys: {keys}]" if keys else ""))
    return ("objective: a name, or an inline table with the objective's own keys, e.g. "
            "`{ name = \"cdpo\", epsilon = 0.1 }`: " + "; ".join(parts))


SCHEMA: dict[str, dict[str, Key]] = {
    "problem": {
        "dim": Key(None, _int(ge=1), "embedding dimension d", required=True),
        "family": Key("gaussian", _choice(FAMILIES), "class-conditional family: "
                      + ", ".join(FAMILIES)),
        "label_noise": Key(0.0, _num(ge=0, lt=0.5), "probability ε that an observed "
                           "preference is flipped"),
        "cosines": Key(None, _any, "cosine between the d_i of builder behaviors: one number "
                       "for every pair, or a K×K matrix (default: orthogonal)"),
        "behaviors": Key(None, _any, "array of tables [[problem.behaviors]], keys below",
                         required=True),
        "principles": Key(None, _any, "principle-driven labels (Self-Align): a table "
                          "[problem.principles], keys below; a judge labels every statement "
                          "by principle directions instead of the true preference "
                          "(clean_accuracy measures the true one)"),
    },
    "model": {
        "vocab_size": Key(2, _int(ge=2), "vocabulary size V (rows 0 = Yes, 1 = No)"),
        "init_scale": Key(1.0, _num(ge=0), "reference W0 entries ~ N(0, init_scale²/d)"),
        "init_seed": Key(0, _int(ge=0), "seed of the random reference W0"),
        "reference": Key(None, _any, "explicit W0 as a V×d nested list (overrides the "
                         "random one)"),
        "reward_head": Key(None, _any, "a reward head Φ as a V×d nested list, r(g, y) = "
                           "φ_yᵀg: the start of the reward head (default 0), which an rlhf "
                           "phase maximises when no reward_model phase trains one first"),
        "prompt_offset": Key(None, _any, "the offset c (length d) a prompt adds to the "
                             "embedding: distill trains the unprompted policy towards the "
                             "phase's starting policy seeing g + c"),
        "features": Key(None, _int(ge=1), "capacity: the head sees only the first k "
                        "coordinates of g, 1 <= k <= problem.dim (default: all); samples are "
                        "drawn at problem.dim and truncated, the theory is the marginal "
                        "problem's, the reference is W0[:, :k] (reward_head, prompt_offset and "
                        "pretrain means are truncated alike)"),
        "hidden_units": Key(None, _hidden_units, "capacity: a one-hidden-layer MLP head "
                            "f(g) = U relu(A g + a) with H hidden units (integer >= 1): rewards "
                            "f(g) for reward_model/binary, logits W0 g + f(g) for the DPO "
                            "family and sft; A ~ N(0, 1/d) per seed from init_seed, a = U = 0; "
                            "no population flow (needs theory.population = false)"),
    },
    "train": {
        "objective": Key("dpo", _train_objective, _objective_doc()),
        "beta": Key(1.0, _num(gt=0), "β > 0: inverse temperature of the objective (the KL "
                    "scale of the policy objectives; a reward head's objectives ignore it)"),
        "lr": Key(0.5, _num(gt=0), "step size η > 0 on W (t = lr·step)"),
        "steps": Key(200, _int(ge=1), "number of optimisation steps ≥ 1"),
        "n": Key(2000, _int(ge=2), "training statements per seed (≥ 2), split across "
                 "behaviors by weight"),
        "batch_size": Key(None, _int(ge=1), "minibatch size ≤ n (omit for full-batch GD)"),
        "heldout_n": Key(None, _int(ge=2), "statements per seed of a held-out sample (omit for "
                         "none): adds heldout/<metric> columns (theory: the population's)"),
        "seeds": Key(4, _seeds, "a count N (seeds 0..N−1) or a list of seeds"),
        "dtype": Key("float32", _choice(["float32", "float64"]), "simulation precision"),
        "device": Key("cpu", _choice(["cpu", "cuda", "auto"]), "cpu, cuda, or auto (cuda "
                      "when available)"),
        "eval_every": Key(1, _int(ge=1), "record metrics every this many steps (and at "
                          "the last)"),
        "flip": Key(False, _bool, "train on flipped preferences (chosen and rejected swapped; "
                    "metrics are then against the flipped labels)"),
        "start": Key("reference", _choice(["reference", "aligned"]), "starting policy: the "
                     "reference, or one aligned by align_steps of DPO on the unflipped data"),
        "align_steps": Key(200, _int(ge=1), "steps of the aligning phase when start = "
                           "\"aligned\" (same beta, lr, sample; not recorded)"),
        "phases": Key(None, _any, "array of tables [[train.phases]], keys below: an ordered "
                      "list of training phases, each from where the last left the model "
                      "(replaces objective, steps, flip, start and align_steps)"),
    },
    "pretrain": {
        "n": Key(None, _int(ge=1), "pretraining examples per seed (default: train.n); a "
                 "held-out draw of the same size measures the alignment tax"),
        "components": Key(None, _any, "array of tables [[pretrain.components]], keys below: "
                          "PPO-ptx's pretraining distribution (InstructGPT eq. 2); with it "
                          "every policy objective reports pretrain/loss, and rlhf's ptx_coef "
                          "trains on it"),
    },
    "theory": {
        "population": Key(True, _bool, "compute the population prediction (source = "
                          "\"theory\")"),
        "continuous": Key(False, _bool, "continuous-time flow instead of population GD "
                          "with the same lr"),
        "panel_width": Key(2.0, _num(gt=0, le=10), "quadrature panel width in logit units "
                           "(smaller = more nodes, more accurate)"),
        "qmc_points": Key(8192, _int(ge=256), "quasi-Monte Carlo points for "
                          "rewards/chosen|rejected and objective/kl with more than two "
                          "answers (and non-scale-mixture families)"),
        "bounds": Key(True, _bool, "add the bound columns (docs/theory.md Theorems 1-3) to "
                      "every row: population bounds on theory rows, the run's own sample on "
                      "simulation rows"),
    },
}

BEHAVIOR_KEYS: dict[str, Key] = {
    "name": Key(None, _str, "behavior name (unique)", required=True),
    "weight": Key(1.0, _num(gt=0), "mixture weight (normalised over behaviors)"),
    "pos_fraction": Key(0.5, _num(gt=0, lt=1), "share of positive statements (class "
                        "balance)"),
    "distinguishability": Key(None, _num(ge=0), "builder: ‖μ⁺ − μ⁻‖ = δ, isotropic Σ = "
                              "sigma²·I"),
    "sigma": Key(1.0, _num(ge=0), "builder: per-coordinate standard deviation"),
    "direction": Key(None, _any, "builder: direction of μ⁺ − μ⁻ (length d; default: "
                     "orthogonal basis vectors, or problem.cosines)"),
    "center": Key(None, _any, "builder: (μ⁺ + μ⁻)/2 (length d; default 0)"),
    "mu_pos": Key(None, _any, "explicit μ⁺ (length d)"),
    "mu_neg": Key(None, _any, "explicit μ⁻ (length d)"),
    "cov_pos": Key(None, _any, "explicit Σ⁺: d×d nested list, a length-d list "
                   "(diagonal) or a number (times I)"),
    "cov_neg": Key(None, _any, "explicit Σ⁻ (same forms; default: cov_pos)"),
    "reward_scale": Key(1.0, _num(gt=0), "RL: the reward of this behavior's prompts is "
                        "reward_scale × φ_yᵀg (tasks whose rewards differ in scale)"),
}

PHASE_KEYS: dict[str, Key] = {
    "objective": Key(None, _objective, "the phase's objective (a name or a table, as "
                     "train.objective)", required=True),
    "steps": Key(None, _int(ge=1), "optimisation steps of the phase", required=True),
    "lr": Key(None, _num(gt=0), "step size (default: train.lr)"),
    "behaviors": Key(None, _any, "names of the behaviors trained on (default: all; "
                     "metrics are always for all)"),
    "flip": Key(False, _bool, "train on flipped preferences (metrics against them)"),
    "record": Key(True, _bool, "keep the phase's metrics (an unrecorded phase only "
                  "prepares the next, and does not advance the step count)"),
    "n": Key(None, _int(ge=2), "statements per seed the phase trains on: the first ones of "
             "each (behavior, class) group of its behaviors' share of the sample, in "
             "proportion, so a smaller n is a subset of a larger (default: all)"),
    "pretraining": Key(False, _bool, "preference-model pre-training (PMP): the phase trains "
                       "on behaviors related to the target, the behaviors of the next phase "
                       "that is not pre-training; it must name its behaviors, and they must "
                       "not include the target's unless allow_target"),
    "allow_target": Key(False, _bool, "let a pre-training phase include target behaviors "
                        "(pre-training on the target itself is training longer)"),
}
PRINCIPLE_KEYS: dict[str, Key] = {
    "cosine": Key(None, _num(ge=-1, le=1), "builder: the cosine of every principle with its "
                  "behavior's d_i (residuals orthonormal, orthogonal to d_i, from seed)"),
    "count": Key(None, _any, "builder: principles per behavior k (integer >= 1; default 1)"),
    "seed": Key(0, _int(ge=0), "builder: seed of the principles' residual directions"),
    "directions": Key(None, _any, "explicit principle vectors p_1..p_k, a k×d nested list "
                      "shared by every behavior (instead of cosine)"),
    "combine": Key("vote", _choice(("vote", "sum")), "how k verdicts combine: majority vote "
                   "of the signs of p_jᵀ(g − c_i) (ties: the summed score), or the sign of "
                   "the summed score"),
}
COMPONENT_KEYS: dict[str, Key] = {
    "mean": Key(None, _any, "mean of the features g (length d)", required=True),
    "sigma": Key(1.0, _num(ge=0), "g ~ N(mean, sigma²·I)"),
    "token": Key(None, _int(ge=0), "the target token y (< model.vocab_size)", required=True),
    "weight": Key(1.0, _num(gt=0), "mixture weight (normalised over components)"),
}
SHORTHAND = ("objective", "steps", "flip", "start", "align_steps")
"""train keys that ``[[train.phases]]`` replaces (an error to give both)."""

EXPLICIT = ("mu_pos", "mu_neg", "cov_pos", "cov_neg")
BUILDER = ("distinguishability", "sigma", "direction", "center")


# ----------------------------------------------------------------------------- parsing


def _unknown(path: str, key: str, known: Sequence[str]) -> ParameterError:
    name = f"{path}.{key}" if path else key
    return ParameterError(name, key, f"is not a known key{did_you_mean(key, known)}")


def _fill(path: str, table, keys: dict[str, Key]) -> dict:
    if not isinstance(table, dict):
        raise ParameterError(path, table, "must be a table")
    for key in table:
        if key not in keys:
            raise _unknown(path, key, keys)
    out = {}
    for key, spec in keys.items():
        name = f"{path}.{key}"
        if key in table:
            out[key] = spec.check(name, table[key])
        elif spec.required:
            raise ParameterError(name, None, "is required")
        elif spec.default is not None:
            out[key] = spec.check(name, copy.deepcopy(spec.default))
    return out


def parse_config(raw: dict) -> dict:
    """Validate a config mapping and fill in defaults; returns a new dict."""
    for section in raw:
        if section not in SCHEMA:
            raise _unknown("", section, SCHEMA)
    if "problem" not in raw:
        raise ParameterError("problem", None, "is required (a [problem] table)")
    config = {name: _fill(name, raw.get(name, {}), keys) for name, keys in SCHEMA.items()}
    behaviors = config["problem"]["behaviors"]
    if not isinstance(behaviors, list) or not behaviors:
        raise ParameterError("problem.behaviors", behaviors,
                             "must be one or more [[problem.behaviors]] tables")
    filled = [_fill(f"problem.behaviors.{i}", b, BEHAVIOR_KEYS) for i, b in enumerate(behaviors)]
    for table, given in zip(filled, behaviors):
        if "distinguishability" not in table and "sigma" not in given:
            del table["sigma"]  # a builder default: meaningless for explicit behaviors
    config["problem"]["behaviors"] = filled
    train = config["train"]
    if "phases" in train:
        train["phases"] = _phases(train["phases"], raw.get("train", {}), behaviors)
    if "batch_size" in train and train["batch_size"] > train["n"]:
        raise ParameterError("train.batch_size", train["batch_size"],
                             f"must be <= train.n = {train['n']}")
    names = [b["name"] for b in filled]
    for j, name in enumerate(names):
        if name in names[:j]:
            raise ParameterError(f"problem.behaviors.{j}.name", name, f"must be unique "
                                 f"(problem.behaviors.{names.index(name)} has it too)")
    model = config["model"]
    for key in ("reference", "reward_head"):
        if key in model:
            check_finite_array(f"model.{key}", model[key],
                               (model["vocab_size"], config["problem"]["dim"]))
    if "prompt_offset" in model:
        model["prompt_offset"] = check_finite_array("model.prompt_offset", model["prompt_offset"],
                                                    (config["problem"]["dim"],)).tolist()
    if "principles" in config["problem"]:
        config["problem"]["principles"] = _principles(config["problem"]["principles"],
                                                      config["problem"]["dim"])
    _check_head(config)
    _check_reward_heads(config)
    _check_pretrain(config)
    problem = build_problem(config)  # every numeric check on means and covariances, with paths
    counts = allocate(train["n"], problem.weights)
    if counts.min() < 1:
        empty = problem.names[int(counts.argmin())]
        raise ParameterError("train.n", train["n"], f"must give every behavior a statement "
                             f"(behavior {empty!r} gets none; n·w = "
                             f"{train['n'] * problem.weights.min():.2g})")
    if "phases" in train:
        _check_phase_samples(train["phases"], names, counts)
    return config


def _check_phase_samples(phases: list[dict], names: list[str], counts: np.ndarray) -> None:
    """A phase's ``n`` fits in its behaviors' share of ``train.n``; a pre-training
    phase names its behaviors, which exclude the target's unless ``allow_target``."""
    for i, phase in enumerate(phases):
        path = f"train.phases.{i}"
        chosen = phase.get("behaviors", names)
        if "n" in phase:
            have = int(sum(counts[names.index(b)] for b in chosen))
            if phase["n"] > have:
                raise ParameterError(f"{path}.n", phase["n"], f"must be <= the {have} "
                                     f"statements of its behaviors in train.n")
        if phase["allow_target"] and not phase["pretraining"]:
            raise ParameterError(f"{path}.allow_target", True,
                                 "applies only to a phase with pretraining = true")
        if not phase["pretraining"]:
            continue
        if "behaviors" not in phase:
            raise ParameterError(f"{path}.behaviors", None, "is required by pretraining = "
                                 "true: the related behaviors it pre-trains on")
        later = [j for j in range(i + 1, len(phases)) if not phases[j]["pretraining"]]
        if not later:
            raise ParameterError(f"{path}.pretraining", True, "needs a later phase that is "
                                 "not pre-training (the target it prepares)")
        target = phases[later[0]].get("behaviors", names)
        shared = [b for b in chosen if b in target]
        if shared and not phase["allow_target"]:
            raise ParameterError(f"{path}.behaviors", chosen, f"must not include the target "
                                 f"behaviors of train.phases.{later[0]} ({', '.join(shared)}) "
                                 f"unless allow_target = true")


def _principles(table, dim: int) -> dict:
    """``[problem.principles]``: a builder (``cosine``, ``count``, ``seed``) or explicit
    ``directions``, never both, and never an empty set."""
    path = "problem.principles"
    out = _fill(path, table, PRINCIPLE_KEYS)
    if ("cosine" in out) == ("directions" in out):
        raise ParameterError(path, table, "needs exactly one of cosine (the builder) and "
                             "directions (explicit principle vectors)")
    if "directions" in out:
        vectors = out["directions"]
        if not isinstance(vectors, list) or not vectors:
            raise ParameterError(f"{path}.directions", vectors, "is an empty principle set: "
                                 "give at least one principle vector (a k×d list, k >= 1)")
        for j, vector in enumerate(vectors):
            row = check_finite_array(f"{path}.directions.{j}", vector, (dim,))
            if not np.any(row):
                raise ParameterError(f"{path}.directions.{j}", vector, "must not be zero")
        for key in ("count", "seed"):
            if key in table:
                raise ParameterError(f"{path}.{key}", table[key], "applies to the cosine "
                                     "builder, not to explicit directions")
        return out
    count = out.setdefault("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ParameterError(f"{path}.count", count, "is an empty principle set: the number "
                             "of principles per behavior must be an integer >= 1")
    if abs(out["cosine"]) < 1 and count > dim - 1:
        raise ParameterError(f"{path}.count", count, f"must be <= problem.dim - 1 = {dim - 1} "
                             "(orthonormal residuals orthogonal to d_i)")
    return out


def _phase_objectives(train: dict) -> list[tuple[str, object]]:
    """``(key path, objective spec)`` of every phase, in order: ``[[train.phases]]`` or
    the single ``train.objective``."""
    if "phases" in train:
        return [(f"train.phases.{i}.objective", p["objective"])
                for i, p in enumerate(train["phases"])]
    return [("train.objective", train["objective"])]


def _check_head(config: dict) -> None:
    """``model.features <= problem.dim`` (and a marginal the family keeps); an MLP head
    (``model.hidden_units``) trains one phase of an objective on pairs, labels or
    demonstrations from its own start, with no population flow."""
    model, train = config["model"], config["train"]
    if "features" in model:
        problem = build_problem(config)
        if model["features"] > problem.dim:
            raise ParameterError("model.features", model["features"],
                                 f"must be <= problem.dim = {problem.dim}")
        try:
            problem.restrict(model["features"])
        except ParameterError as err:
            raise err.at("model") from None
    if "hidden_units" not in model:
        return
    why = "with model.hidden_units (an MLP head)"
    phases = _phase_objectives(train)
    for path, spec in phases:
        obj, _ = resolve_objective(spec, path=path)
        if obj.data in ("prompts", "context"):
            raise ParameterError(path, obj.name, f"cannot train an MLP head (model.hidden_units):"
                                 f" its loss reads {obj.data}; use an objective on pairs, "
                                 "labels or demonstrations")
    if len(phases) > 1 or train.get("start") == "aligned":
        raise ParameterError("train.phases" if "phases" in train else "train.start",
                             len(phases) if "phases" in train else "aligned",
                             f"must be one phase from the reference {why}")
    if "n" in train.get("phases", [{}])[0]:
        raise ParameterError("train.phases.0.n", train["phases"][0]["n"], f"cannot be given "
                             f"{why}: vary train.n instead")
    if config["theory"]["population"]:
        raise ParameterError("theory.population", True, f"must be false {why}: there is no "
                             "population flow for it; set theory.population = false")
    for key in ("reward_head", "prompt_offset"):
        if key in model:
            raise ParameterError(f"model.{key}", "given", f"cannot be combined {why}")
    if "components" in config["pretrain"]:
        raise ParameterError("pretrain.components", "given", f"cannot be combined {why}")


def _check_pretrain(config: dict) -> None:
    """``[pretrain]``: components with a mean of length d and a token < V; ``n``
    only with components; ``ptx_coef > 0`` only with them."""
    table = config["pretrain"]
    if "components" not in table:
        if "n" in table:
            raise ParameterError("pretrain.n", table["n"], "needs [[pretrain.components]]")
        for path, spec in _phase_objectives(config["train"]):
            if isinstance(spec, dict) and spec.get("ptx_coef", 0) > 0:
                raise ParameterError(f"{path}.ptx_coef", spec["ptx_coef"],
                                     "needs a pretraining distribution: [[pretrain.components]]")
        return
    items = table["components"]
    if not isinstance(items, list) or not items:
        raise ParameterError("pretrain.components", items, "must be one or more "
                             "[[pretrain.components]] tables")
    dim, vocab = config["problem"]["dim"], config["model"]["vocab_size"]
    filled = []
    for i, item in enumerate(items):
        path = f"pretrain.components.{i}"
        entry = _fill(path, item, COMPONENT_KEYS)
        entry["mean"] = check_finite_array(f"{path}.mean", entry["mean"], (dim,)).tolist()
        if entry["token"] >= vocab:
            raise ParameterError(f"{path}.token", entry["token"],
                                 f"must be < model.vocab_size = {vocab}")
        filled.append(entry)
    table["components"] = filled


def reward_scales_of(config: dict) -> np.ndarray:
    """Each behavior's ``reward_scale`` (RL's task reward is it times ``φ_yᵀg``)."""
    return np.array([b["reward_scale"] for b in config["problem"]["behaviors"]])


def pretraining_of(config: dict):
    """The config's pretraining distribution (:class:`synthetic.pretrain.Pretraining`)
    and its sample size, or ``(None, None)``."""
    from synthetic.pretrain import Pretraining

    table = config["pretrain"]
    if "components" not in table:
        return None, None
    items = table["components"]
    return (Pretraining(np.array([c["mean"] for c in items], dtype=np.float64),
                        np.array([c["sigma"] for c in items]),
                        np.array([c["token"] for c in items]),
                        np.array([c["weight"] for c in items])),
            table.get("n", config["train"]["n"]))


def _check_reward_heads(config: dict) -> None:
    """An RL phase needs a reward head: ``model.reward_head`` or an earlier phase that
    trains one."""
    train = config["train"]
    have = config["model"].get("reward_head") is not None
    for path, spec in _phase_objectives(train):
        obj, hyper = resolve_objective(spec, path=path)
        have = have or obj.block == "reward"
        if hyper.get("rollout_size", 0) > train["n"]:
            raise ParameterError(f"{path}.rollout_size", hyper["rollout_size"],
                                 f"must be <= train.n = {train['n']} (the prompts of a seed)")
        if obj.data == "prompts" and not have:
            raise ParameterError(path, obj.name, "needs a reward head: a reward_model (or "
                                 "binary) phase before it, or model.reward_head")
        if obj.data == "context" and "prompt_offset" not in config["model"]:
            raise ParameterError(path, obj.name, "needs model.prompt_offset: the offset c "
                                 "(length problem.dim) a prompt adds to the embedding")


def _phases(phases, given: dict, behaviors: list) -> list[dict]:
    """Validate ``[[train.phases]]``: a non-empty list of tables of PHASE_KEYS whose
    behaviors name behaviors of the problem."""
    if not isinstance(phases, list) or not phases:
        raise ParameterError("train.phases", phases, "must be one or more [[train.phases]] "
                             "tables")
    both = [k for k in SHORTHAND if k in given]
    if both:
        raise ParameterError(f"train.{both[0]}", given[both[0]], "cannot be given together "
                             "with [[train.phases]] (set it in each phase)")
    names = [b.get("name") for b in behaviors]
    out = []
    for i, table in enumerate(phases):
        path = f"train.phases.{i}"
        phase = _fill(path, table, PHASE_KEYS)
        if "behaviors" in phase:
            chosen = phase["behaviors"]
            if not isinstance(chosen, list) or not chosen:
                raise ParameterError(f"{path}.behaviors", chosen,
                                     "must be a non-empty list of behavior names")
            for j, name in enumerate(chosen):
                check_choice(f"{path}.behaviors.{j}", name, names)
        out.append(phase)
    return out


def read_toml(path: str | Path | None, text: str | None = None) -> dict:
    """The TOML table in ``text``, or in the file ``path`` when ``text`` is None; an
    unreadable file or invalid TOML is a ParameterError on ``config`` (with TOML's line)."""
    source = str(path) if path is not None else "<config>"
    if text is None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise ParameterError("config", source, f"cannot be read ({err.strerror})") from None
        except UnicodeDecodeError as err:
            line = err.object[:err.start].count(b"\n") + 1
            raise ParameterError("config", source, f"must be UTF-8 text (byte "
                                 f"0x{err.object[err.start]:02x} on line {line} is not)") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ParameterError("config", source, f"is not valid TOML: {err}") from None


def load_config(path: str | Path | None, overrides: Sequence[str] = (), *,
                text: str | None = None) -> dict:
    """Read TOML from ``path`` (or ``text``), apply ``KEY=VALUE`` overrides, validate."""
    raw = read_toml(path, text)
    for item in overrides:
        apply_override(raw, item)
    return parse_config(raw)


def apply_override(raw: dict, item: str) -> None:
    """Apply ``KEY=VALUE`` in place; ``KEY`` is a dotted path (list indices as
    numbers: ``problem.behaviors.0.distinguishability``), ``VALUE`` a TOML value
    (a bare word is taken as a string)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ParameterError("--set", item, "must look like KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    parts = key.split(".")
    node, path = raw, []
    for part in parts[:-1]:
        path.append(part)
        if isinstance(node, list):
            index = _index(".".join(path), part, node)
            node = node[index]
        else:
            node = descend(node, part)
    last = parts[-1]
    if isinstance(node, list):
        node[_index(key, last, node)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ParameterError("--set", item, f"cannot set a key inside {'.'.join(path)}")


def descend(node: dict, part: str):
    """``node[part]``, created as a table if missing; a name given where a table
    may stand (``objective = "cdpo"``) becomes ``{ name = "cdpo" }``, so that
    ``train.objective.epsilon=0.1`` extends it."""
    child = node.setdefault(part, {})
    if isinstance(child, str):
        child = node[part] = {"name": child}
    return child


def _index(name: str, part: str, node: list) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ParameterError(name, part, f"must be an index in 0..{len(node) - 1}")
    return int(part)


# ----------------------------------------------------------------------------- problem


def _cov(name: str, value, dim: int) -> np.ndarray:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return check_number(name, value, ge=0) * np.eye(dim)
    array = np.asarray(value, dtype=object)
    if array.ndim == 1 and len(value) == dim:
        try:
            diag = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise ParameterError(name, value, "must contain numbers") from None
        return np.diag(diag)
    return value  # a full matrix: validated by Behavior


def _vector(name: str, value, dim: int):
    if value is None:
        return None
    try:
        vec = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ParameterError(name, value, f"must be a list of {dim} numbers") from None
    if vec.shape != (dim,):
        raise ParameterError(name, value, f"must have length dim = {dim}, not {vec.size}")
    if not np.all(np.isfinite(vec)):
        raise ParameterError(name, value, "must have finite entries (no NaN or inf)")
    return vec


def build_problem(config: dict) -> Problem:
    """The :class:`Problem` described by a validated config's ``[problem]``."""
    spec = config["problem"]
    dim = spec["dim"]
    tables = spec["behaviors"]
    builders = [i for i, b in enumerate(tables) if "distinguishability" in b]
    if "cosines" in spec and builders:
        deltas = [tables[i]["distinguishability"] for i in builders]
        try:
            dirs = behaviors_with_angles(dim, deltas, spec["cosines"])
        except ParameterError as err:
            raise err.at("problem") from None
        except (TypeError, ValueError):  # a ragged or non-numeric matrix
            raise ParameterError("problem.cosines", spec["cosines"], f"must be one number or "
                                 f"a {len(deltas)}×{len(deltas)} matrix of numbers") from None
        directions = {i: b.direction for i, b in zip(builders, dirs)}
    else:
        if len(builders) > dim and not all("direction" in tables[i] for i in builders):
            raise ParameterError("problem.dim", dim, f"must be >= the {len(builders)} builder "
                                 "behaviors to give each an orthogonal direction")
        directions = {i: np.eye(dim)[k] for k, i in enumerate(builders)}
    behaviors = []
    for i, table in enumerate(tables):
        path = f"problem.behaviors.{i}"
        try:
            behaviors.append(_behavior(path, table, dim, directions.get(i)))
        except ParameterError as err:
            raise (err if err.name.startswith(path) else err.at(path)) from None
    try:
        problem = Problem(tuple(behaviors), family=spec["family"],
                          label_noise=spec["label_noise"])
        if "principles" not in spec:
            return problem
        table = spec["principles"]
        if "directions" in table:
            judge = shared_principles(table["directions"], len(behaviors), problem.centers,
                                      combine=table["combine"])
        else:
            judge = principles_with_cosine(problem.directions, problem.centers,
                                           table["cosine"], table["count"],
                                           seed=table["seed"], combine=table["combine"])
        return problem.replace(principles=judge)
    except ParameterError as err:
        raise err.at("problem") from None


def _behavior(path: str, table: dict, dim: int, default_direction) -> Behavior:
    explicit = [k for k in EXPLICIT if k in table]
    builder = [k for k in ("sigma", "direction", "center") if k in table]
    common = dict(weight=table["weight"], pos_fraction=table["pos_fraction"])
    if "distinguishability" in table:
        if explicit:
            raise ParameterError(f"{path}.{explicit[0]}", table[explicit[0]],
                                 "cannot be given together with distinguishability")
        direction = _vector(f"{path}.direction", table.get("direction"), dim)
        center = _vector(f"{path}.center", table.get("center"), dim)
        if direction is None and np.any(default_direction != 0):
            direction = default_direction / np.linalg.norm(default_direction)
        return isotropic(table["name"], dim, table["distinguishability"], sigma=table["sigma"],
                         direction=direction, center=center, **common)
    if builder:
        raise ParameterError(f"{path}.{builder[0]}", table[builder[0]],
                             "needs distinguishability (builder keys)")
    missing = [k for k in ("mu_pos", "mu_neg", "cov_pos") if k not in table]
    if missing:
        raise ParameterError(f"{path}.{missing[0]}", None,
                             "is required (or give distinguishability to use the builder)")
    mu_pos = _vector(f"{path}.mu_pos", table["mu_pos"], dim)
    mu_neg = _vector(f"{path}.mu_neg", table["mu_neg"], dim)
    cov_pos = _cov(f"{path}.cov_pos", table["cov_pos"], dim)
    cov_neg = _cov(f"{path}.cov_neg", table.get("cov_neg", table["cov_pos"]), dim)
    return Behavior(table["name"], mu_pos, mu_neg, cov_pos, cov_neg, **common)


# ----------------------------------------------------------------------------- output


def dump_config(config: dict) -> str:
    """The resolved config as TOML text (defaults filled in), behaviors as
    ``[[problem.behaviors]]`` tables; reading it back gives the same config."""
    out = []
    for section, table in config.items():
        out.append(f"[{section}]")
        out += [f"{k} = {_toml(v)}" for k, v in table.items()
                if k not in ("behaviors", "phases", "components")]
        out.append("")
        for key in ("behaviors", "phases", "components"):
            for item in table.get(key, []):
                out.append(f"[[{section}.{key}]]")
                out += [f"{k} = {_toml(v)}" for k, v in item.items()]
                out.append("")
    return "\n".join(out)


def _toml(value) -> str:
    """A TOML literal for the scalars and (nested) lists a config holds."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def config_reference() -> str:
    """The config reference as a Markdown table, generated from the schema."""
    lines = ["| key | default | meaning |", "|---|---|---|"]

    def row(name, spec):
        default = "required" if spec.required else (
            "—" if spec.default is None else f"`{_toml(spec.default)}`")
        lines.append(f"| `{name}` | {default} | {spec.doc} |")

    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            row(f"{section}.{key}", spec)
            if key == "objective":
                for obj in OBJECTIVES.values():
                    for hkey, hspec in obj.hyper.items():
                        lines.append(f"| `train.objective.{hkey}` ({obj.name}) | "
                                     f"`{_toml(hspec.default)}` | {hspec.doc}; {hspec.rule()} |")
            if key in _NESTED:
                prefix, nested = _NESTED[key]
                for nkey, nspec in nested.items():
                    row(f"{prefix}.{nkey}", nspec)
    return "\n".join(lines)


_NESTED = {"behaviors": ("problem.behaviors[]", BEHAVIOR_KEYS),
           "phases": ("train.phases[]", PHASE_KEYS),
           "principles": ("problem.principles", PRINCIPLE_KEYS),
           "components": ("pretrain.components[]", COMPONENT_KEYS)}
"""A key whose value is a table (or array of tables) → its rows' prefix and keys."""


def phases_of(config: dict) -> list:
    """The training phases of a resolved config (:class:`dynamics.phases.Phase`):
    ``[[train.phases]]`` as given, or the shorthand ``objective``/``steps``/``flip``
    with ``start = "aligned"`` as an unrecorded DPO phase of ``align_steps`` first."""
    from dynamics.phases import Phase

    train = config["train"]
    names = [b["name"] for b in config["problem"]["behaviors"]]
    if "phases" in train:
        return [Phase(p["objective"], p["steps"], p.get("lr", train["lr"]),
                      tuple(names.index(b) for b in p["behaviors"]) if "behaviors" in p
                      else None, p["flip"], p["record"], p.get("n"))
                for p in train["phases"]]
    phases = []
    if train["start"] == "aligned":
        phases.append(Phase("dpo", train["align_steps"], train["lr"], record=False))
    phases.append(Phase(train["objective"], train["steps"], train["lr"], flip=train["flip"]))
    return phases
