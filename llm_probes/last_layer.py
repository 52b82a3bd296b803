"""The ``last-layer`` probe: DPO on a real LLM's cached features, only ``Yes``/``No`` moving.

THEORY §1 on real features: the policy is ``softmax(W g)`` with ``W0`` the model's
own (untied) output layer, its rows reordered so that row 0 is ``Yes`` and row 1
is ``No`` (:func:`llm_probes.features.answer_rows`), then the rest of the
vocabulary. DPO moves only those two rows, so training reduces exactly to
``Δ = u − u0`` (:func:`dynamics.simulate.simulate_sample`), and the Gaussian fit of
the train features (:func:`synthetic.statistics.fit_gaussian`) gives the
population prediction (:func:`dynamics.analytic.population_descent`) with the
same ``β``, ``lr``, steps and ``W0``: ``source = "theory"`` drawn over
``source = "measured"``.

**One run per behavior.** Training is full-batch gradient descent from ``Δ = 0``
on the behavior's whole train split: deterministic, so repeated seeds would give
the same curve. The uncertainty that matters for "are more distinguishable
behaviors learned faster?" is over *behaviors*, so the confidence interval of
Spearman's ρ is a bootstrap over behaviors (:func:`spearman_ci`). ``seed`` only
labels the run (and seeds the bootstrap).

**The vocabulary.** The measured runs use the full vocabulary in float64 (its
log-partition enters ``rewards/chosen`` and ``rewards/rejected`` only; loss and
accuracies depend on the Yes and No rows alone). When the reference logits of a
run would exceed :data:`LOGITS_BUDGET` (e.g. ``--together`` on many behaviors)
the measured run keeps as many rows of largest reference probability as fit (41,941
of 49,152 for 3,200 statements, leaving out 3e-7 of the mass), and reports the mass
it leaves out. The population prediction cannot use
49,152 rows: its quasi-Monte Carlo log-partition needs ``W0 Σ W0ᵀ`` (``V×V`` per
component, 19 GB at full size), so it keeps ``Yes``, ``No`` and the
``--theory-vocab`` rows of largest reference probability on the train
statements (default 64; the left-out mass on SmolLM2's chat prompt is at most
about 5%, and moves ``rewards/chosen`` by about 1e-5; the table records it).

**Step size.** Raw features share a large mean (``‖mean g‖ ≈ 55``), so gradient
descent diverges above ``lr = 4/(β² λ_max(E[g gᵀ]))`` (THEORY §5): the probe refuses
such a step. ``--center`` subtracts each behavior's mean train feature (no labels
used; μ⁺ − μ⁻ and Σ± are unchanged) and allows far larger steps; the reference
logits are then those of the centred features. The table says which was used.
``--lr auto`` takes ``--lr-fraction`` (default :data:`AUTO_FRACTION`) of the smallest
limit measured on the groups trained (each behavior, and all together with
``--together``), so a new model runs without trial and error (:func:`choose_lr`).

**Learning speed** of a behavior (one number per behavior, measured): the loss
drop ``L(0) − L(T)`` at the last step (primary), and also the initial slope
``(L(0) − L(t₁))/t₁``, the final training reward accuracy and, on the held-out
test split, the loss drop and the reward accuracy of the final ``Δ``. The horizon
matters: early on ``L(0) − L(t) ≈ t·(β²/2)‖m̂‖²`` with ``m̂ = (μ̂⁺ − μ̂⁻)/2`` for balanced
behaviors, so at small ``t`` the loss drop ranks behaviors exactly by distinguishability
(ρ = 1 by construction, as the initial slope always does); later the spread
``Σ̂±`` bends the curves, and only then is ρ a test of the theory's claim.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats as sstats

from dynamics.analytic import population_descent
from dynamics.bounds import initial_loss_slope, priority_scores
from dynamics.io import atomic_write, write_parquet
from dynamics.metrics import pair_metrics
from dynamics.model import NO, YES
from dynamics.objectives import dpo_margin_loss
from dynamics.simulate import SimulationResult, simulate_sample
from synthetic.mixture import empirical_mixture, population_mixture
from synthetic.sampling import PreferenceSample
from synthetic.statistics import fit_gaussian
from synthetic.validation import ParameterError, check_integer, check_number

__all__ = ["train", "predict", "RowRanking", "reference_rows", "stability_limit",
           "stability_limits", "choose_lr", "parse_lr", "AUTO_FRACTION", "curves_frame",
           "speed_table", "spearman_ci", "rank_correlations", "priority_table",
           "add_arguments", "check", "check_model", "run", "SPEEDS", "PRIMARY_SPEED",
           "LOGITS_BUDGET"]

LOGITS_BUDGET = 2 * 2**30
"""Bytes the reference logits of one measured run may take (float64, two copies)."""
SPEEDS = {
    "loss_drop": "L(0) − L(T): training-loss drop at the last step",
    "initial_slope": "(L(0) − L(t1)) / t1 at the first recorded step",
    "reward_accuracy": "training implicit-reward accuracy at the last step",
    "test_loss_drop": "log 2 − test loss of the final Δ (held-out statements)",
    "test_reward_accuracy": "test implicit-reward accuracy of the final Δ",
}
"""Definitions of a behavior's learning speed; ρ is reported for each."""
PRIMARY_SPEED = "loss_drop"
AUTO_FRACTION = 0.5
"""``--lr auto``'s default fraction of the smallest measured stability limit: half the
limit, where the step's factor ``1 − lr·(β²/2)λ_max`` along the top direction at
``Δ = 0`` is 0 (no oscillation there), a factor 2 below divergence."""
SOURCES = ["theory", "measured"]


# ------------------------------------------------------------------ building blocks
class RowRanking:
    """The reference model's probabilities on a set of features, summarised once so
    that any number of reduced references can be cut from them.

    features (n, d) · w0 (V, d) with rows YES=0, NO=1. One float64 pass over the
    ``(n, V)`` logits, in chunks, keeps ``best`` (V,): ``max_j log π0(v|g_j)`` and
    ``logz`` (n,): each statement's log-partition.
    """

    def __init__(self, features: torch.Tensor, w0: torch.Tensor):
        self.features, self.w0 = features.double(), w0.double()
        self.best = torch.full((w0.shape[0],), -torch.inf, dtype=torch.float64)
        logz = []
        for part in torch.split(self.features, 512):  # (b, d): bounded memory
            logits = part @ self.w0.T  # (b, V)
            logz.append(torch.logsumexp(logits, dim=-1))
            self.best = torch.maximum(self.best, (logits - logz[-1][:, None]).max(0).values)
        self.logz = torch.cat(logz)  # (n,)
        self.best[[YES, NO]] = torch.inf  # always kept, first
        self.order = torch.argsort(self.best, descending=True, stable=True)  # (V,)

    def select(self, keep: int | None) -> tuple[np.ndarray, np.ndarray]:
        """``W0`` restricted to Yes, No and the ``keep`` most probable other rows (all
        if None), float64 ``(2+keep, d)``, and each statement's left-out mass (n,)."""
        vocab = self.w0.shape[0]
        if keep is None or keep >= vocab - 2:
            return self.w0.numpy(), np.zeros(self.features.shape[0])
        rows = self.order[:2 + keep]
        rows = torch.cat([torch.tensor([YES, NO]),
                          rows[~torch.isin(rows, torch.tensor([YES, NO]))]])
        w = self.w0[rows]  # (2+keep, d)
        kept = torch.logsumexp(self.features @ w.T, dim=-1) - self.logz  # (n,) log kept mass
        return w.numpy(), (-torch.expm1(kept)).clamp_min(0).numpy()


def reference_rows(features: torch.Tensor, w0: torch.Tensor, keep: int | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``W0`` restricted to ``Yes``, ``No`` and the ``keep`` other rows of largest
    reference probability on ``features`` (all rows if ``keep`` is None).

    features (n, d) · w0 (V, d) with rows YES=0, NO=1 → (reference (2+keep, d)
    float64, missing (n,): the reference probability mass of the left-out rows
    per statement). A float64 ``w0`` is returned without a copy when all rows stay.
    """
    if keep is None or keep >= w0.shape[0] - 2:
        return w0.double().numpy(), np.zeros(features.shape[0])
    return RowRanking(features, w0).select(keep)


def stability_limit(features: torch.Tensor, beta: float) -> float:
    """``4/(β² λ_max(E[g gᵀ]))``: gradient descent on DPO diverges above this ``lr``
    (the Hessian at ``Δ = 0`` is ``(β²/4) E[g gᵀ]``, the step on ``Δ`` is ``2·lr``)."""
    x = features.double()
    lam = float(torch.linalg.eigvalsh(x.T @ x / x.shape[0])[-1])
    return 4.0 / (beta**2 * lam)


def stability_limits(features: torch.Tensor, behavior, train, names, *, beta: float,
                     together: bool = False) -> dict[str, float]:
    """:func:`stability_limit` of each group a run trains: each behavior's train
    features and, with ``together``, all train features (key ``"(together)"``).

    features (n, d); behavior (n,) int indices into ``names``; train (n,) bool.
    """
    behavior, train = np.asarray(behavior), np.asarray(train, dtype=bool)
    limits = {name: stability_limit(features[torch.as_tensor(train & (behavior == i))], beta)
              for i, name in enumerate(names)}
    if together:
        limits["(together)"] = stability_limit(features[torch.as_tensor(train)], beta)
    return limits


def parse_lr(name: str, value) -> float | str:
    """``value`` of a step-size option: ``"auto"``, or a finite number > 0 (a number or
    its text, as the command line gives it); else a one-line :class:`ParameterError`."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            raise ParameterError(name, value, "must be a number > 0 or auto") from None
    try:
        return check_number(name, value, gt=0)
    except ParameterError as err:
        raise ParameterError(name, err.value, f"{err.rule}, or be auto") from None


def choose_lr(lr: float | str, limits: dict[str, float], *, fraction: float = AUTO_FRACTION,
              name: str = "--lr", hint: str = "lower --lr",
              rule: str = "4/(β² λ_max(E[g gᵀ]))") -> float:
    """The step size of a run whose groups have the stability ``limits`` (group → lr).

    ``lr = "auto"``: ``fraction × min(limits)`` (``0 < fraction < 1``). A number is
    kept if it is below every limit, else refused naming the smallest (gradient
    descent diverges above it; ``rule`` is how the limit is computed), with ``hint``
    and ``--lr auto`` suggested.
    """
    worst = min(limits, key=limits.get)
    if lr == "auto":
        return check_number("--lr-fraction", fraction, gt=0, lt=1) * limits[worst]
    if lr >= limits[worst]:
        raise ParameterError(name, lr, f"must be < {rule} = "
                             f"{limits[worst]:.3g} on {worst!r} (gradient descent diverges "
                             f"above it); {hint}, or use --lr auto "
                             f"({AUTO_FRACTION:g} of the limit)")
    return float(lr)


def train(features: torch.Tensor, signs, behavior, names, *, reference: np.ndarray,
          beta: float, lr: float, steps: int, eval_every: int = 1, seed: int = 0,
          keep_deltas: bool = False) -> SimulationResult:
    """Full-batch last-layer DPO on frozen features (one run).

    features (n, d) — its dtype is the run's; signs (n,) ±1 (+1: chosen = Yes);
    behavior (n,) int indices into ``names``; reference ``W0`` (V, d), rows YES, NO first.
    """
    x = features
    s = torch.as_tensor(np.asarray(signs), dtype=x.dtype)
    b = torch.as_tensor(np.asarray(behavior), dtype=torch.int64)
    data = PreferenceSample(x[None], s[None], s[None], b, tuple(names))
    return simulate_sample(data, seeds=[seed], beta=beta, lr=lr, steps=steps,
                           reference=reference, eval_every=eval_every, keep_deltas=keep_deltas)


def predict(features: torch.Tensor, signs, behavior, names, *, reference: np.ndarray,
            beta: float, lr: float, steps: int, eval_every: int = 1):
    """Population gradient descent on the Gaussian fit of the features (the theory).

    Same arguments as :func:`train`; returns the trajectory and the fitted problem.
    """
    problem = fit_gaussian(features.double(), np.asarray(signs), np.asarray(behavior),
                           list(names))
    trajectory = population_descent(population_mixture(problem), beta=beta, lr=lr,
                                    steps=steps, reference=reference, eval_every=eval_every)
    return trajectory, problem


def curves_frame(measured: SimulationResult, theory, *, mode: str) -> pd.DataFrame:
    """Both trajectories as one tidy table: ``source`` (theory/measured), ``mode``,
    behavior, step, t, loss, accuracy, reward_accuracy, weight_change, rewards/*."""
    parts = []
    for source, result in (("measured", measured), ("theory", theory)):
        frame = result.frame()
        frame["source"] = pd.Categorical([source] * len(frame), categories=SOURCES)
        parts.append(frame)
    frame = pd.concat(parts, ignore_index=True)
    frame.insert(1, "mode", mode)
    return frame


def _test_metrics(delta: torch.Tensor, u0: torch.Tensor, x: torch.Tensor, s: torch.Tensor,
                  beta: float) -> dict[str, float]:
    """Metrics of the final ``Δ`` (d,) on held-out features x (m, d), signs s (m,), by
    :func:`dynamics.metrics.pair_metrics`. Only differences enter them: the
    log-partition cancels in ``log π(y_w) − log π(y_l) = s (u0 + Δ)ᵀg`` and in the
    reward margin ``β h``, ``h = s Δᵀg``, so no logit of the vocabulary is formed."""
    h = s * (x @ delta)  # (m,)
    zero = torch.zeros_like(h)
    values = pair_metrics(loss=dpo_margin_loss(h, beta=beta),
                          chosen_logps=s * (x @ (u0 + delta)), rejected_logps=zero,
                          chosen_rewards=beta * h, rejected_rewards=zero)
    return {f"test_{k}": float(values[k].mean()) for k in ("loss", "accuracy",
                                                            "reward_accuracy")}


def _slope(curve: pd.DataFrame) -> float:
    curve = curve.sort_values("step")
    first, second = curve.iloc[0], curve.iloc[1]
    return float((first["loss"] - second["loss"]) / (second["t"] - first["t"]))


def speed_table(curves: pd.DataFrame) -> pd.DataFrame:
    """Per behavior × source: ``loss_drop``, ``initial_slope``, ``loss``, ``accuracy``,
    ``reward_accuracy`` at the last step, from a :func:`curves_frame`."""
    rows = []
    for (source, behavior), curve in curves.groupby(["source", "behavior"], observed=True):
        curve = curve.sort_values("step")
        last = curve.iloc[-1]
        rows.append(dict(source=source, behavior=behavior,
                         loss_drop=float(curve["loss"].iloc[0] - last["loss"]),
                         initial_slope=_slope(curve), loss=float(last["loss"]),
                         accuracy=float(last["accuracy"]),
                         reward_accuracy=float(last["reward_accuracy"])))
    return pd.DataFrame(rows)


def _rank_pearson(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of ranks ``(B, K)`` (NaN for a constant row)."""
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    out = np.full(den.shape, np.nan)
    ok = den > 0
    out[ok] = (rx * ry).sum(-1)[ok] / den[ok]
    return out


def spearman_ci(x, y, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Spearman's ρ of ``x`` and ``y`` (one entry per behavior) with a percentile
    bootstrap interval over behaviors (resampled with replacement; resamples with
    constant ranks are dropped). Fewer than 3 behaviors: ρ only, the interval NaN."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    k = len(x)
    rho = float(_rank_pearson(sstats.rankdata(x)[None], sstats.rankdata(y)[None])[0]) if (
        k >= 2) else math.nan
    low = high = math.nan
    valid = 0
    if k >= 3 and n_boot > 0:
        idx = np.random.default_rng(seed).integers(0, k, size=(n_boot, k))  # (B, K)
        boot = _rank_pearson(sstats.rankdata(x[idx], axis=1), sstats.rankdata(y[idx], axis=1))
        boot = boot[np.isfinite(boot)]
        valid = int(boot.size)
        if valid:
            low, high = (float(q) for q in np.quantile(boot, [(1 - level) / 2,
                                                              (1 + level) / 2]))
    return dict(rho=rho, ci_low=low, ci_high=high, level=level, behaviors=k,
                bootstrap=int(n_boot), bootstrap_valid=valid)


def rank_correlations(speeds: pd.DataFrame, *, n_boot: int, seed: int) -> pd.DataFrame:
    """ρ(distinguishability, speed) with its bootstrap CI, one row per speed definition
    (measured, plus the theory's loss drop and initial slope)."""
    rows = []
    for name, definition in SPEEDS.items():
        rows.append(dict(speed=name, source="measured", definition=definition,
                         primary=name == PRIMARY_SPEED,
                         **spearman_ci(speeds["distinguishability"], speeds[name],
                                       n_boot=n_boot, seed=seed)))
    for name in ("loss_drop", "initial_slope"):
        rows.append(dict(speed=name, source="theory", definition=SPEEDS[name], primary=False,
                         **spearman_ci(speeds["distinguishability"],
                                       speeds[f"{name}_theory"], n_boot=n_boot, seed=seed)))
    return pd.DataFrame(rows)


def priority_table(problem, curves: pd.DataFrame, *, beta: float) -> pd.DataFrame:
    """Behaviors trained together: the predicted order (:func:`priority_scores` of the
    fitted problem, ``rank`` 1 = learned first) beside the measured and theory initial
    slopes and loss drops, and the measured rank by initial slope."""
    table = priority_scores(problem)
    table["predicted_slope"] = beta**2 / 2 * table["rate"]  # −dL_i/dt at t = 0
    speeds = speed_table(curves)
    for source in SOURCES:
        part = speeds[speeds["source"] == source].set_index("behavior")
        table[f"slope_{source}"] = table["behavior"].map(part["initial_slope"])
        table[f"loss_drop_{source}"] = table["behavior"].map(part["loss_drop"])
    table["measured_rank"] = table["slope_measured"].rank(ascending=False,
                                                          method="min").astype(int)
    return table


# ---------------------------------------------------------------------- the probe
def add_arguments(parser) -> None:
    from llm_probes.features import add_feature_arguments

    add_feature_arguments(parser)
    group = parser.add_argument_group("last-layer DPO")
    group.add_argument("--beta", type=float, default=1.0, help="DPO β (default: 1)")
    group.add_argument("--lr", default=None, metavar="LR|auto",
                       help="gradient-descent step on W (default: 1e-3 with --behaviors, "
                       "stable on SmolLM2's raw features; auto with --pairs; the probe refuses "
                       "a step above the stability limit); auto: --lr-fraction of the "
                       "smallest measured limit")
    group.add_argument("--lr-fraction", type=float, metavar="F",
                       help=f"with --lr auto, the step as a fraction 0 < F < 1 of the "
                       f"stability limit (default: {AUTO_FRACTION:g})")
    group.add_argument("--steps", type=int, default=None,
                       help="steps (default: 2000 with --behaviors, i.e. t = 2 at the default "
                       "lr; 100 with --pairs)")
    group.add_argument("--eval-every", type=int, default=None,
                       help="record metrics every N steps (default: 20 with --behaviors, 10 "
                       "with --pairs)")
    group.add_argument("--center", action="store_true",
                       help="subtract each behavior's mean train feature first")
    group.add_argument("--together", action="store_true",
                       help="also train all behaviors together on the shared Yes/No rows "
                       "(the priority effect)")
    group.add_argument("--theory-vocab", type=int, default=64, metavar="K",
                       help="rows besides Yes/No in the population prediction's "
                       "log-partition (default: 64)")
    group.add_argument("--bootstrap", type=int, default=2000,
                       help="bootstrap resamples of behaviors for the CI of ρ (default: 2000)")
    from llm_probes.pair_last_layer import add_arguments as add_pair_arguments

    add_pair_arguments(group)


def check(args) -> None:
    """Validate the probe's options (one-line ParameterError naming the option); fill
    the defaults that depend on ``--pairs``."""
    pairs = getattr(args, "pairs", None) is not None
    defaults = dict(lr="auto", steps=100, eval_every=10) if pairs else dict(
        lr=1e-3, steps=2000, eval_every=20)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_number("--beta", args.beta, gt=0)
    args.lr = parse_lr("--lr", args.lr)
    if args.lr_fraction is not None:
        check_number("--lr-fraction", args.lr_fraction, gt=0, lt=1)
        if args.lr != "auto":
            raise ParameterError("--lr-fraction", args.lr_fraction,
                                 f"applies only with --lr auto, not --lr {args.lr:g}")
    check_integer("--steps", args.steps, ge=1)
    check_integer("--eval-every", args.eval_every, ge=1, le=args.steps)
    check_integer("--theory-vocab", args.theory_vocab, ge=0)
    check_integer("--bootstrap", args.bootstrap, ge=0)
    check_integer("--batch-size", args.batch_size, ge=1)
    if pairs:
        from llm_probes.pair_last_layer import check as check_pairs

        check_pairs(args)
    elif args.test_fraction != 0.25:
        raise ParameterError("--test-fraction", args.test_fraction, "applies only with --pairs "
                             "(persona statements keep their own train/test split)")
    elif args.objective != "dpo":
        raise ParameterError("--objective", args.objective, "applies only with --pairs (the "
                             "persona last-layer probe trains DPO; other objectives: prefdyn "
                             "run on a config)")


def check_model(ctx) -> None:
    """With ``--pairs``: tokenize them under the budgets before anything is written."""
    if ctx.pairs is not None:
        from llm_probes.pair_features import check_model as check_pairs

        check_pairs(ctx)


def _measured_keep(n: int, vocab: int) -> int | None:
    """Rows (besides Yes/No) a measured run of ``n`` statements keeps: all of them
    (None) when its float64 reference logits and their copy fit :data:`LOGITS_BUDGET`,
    else as many of the most probable as fit."""
    fits = LOGITS_BUDGET // (n * 8 * 2) - 2
    return None if fits >= vocab - 2 else max(int(fits), 0)


def _prepared(ctx, features: torch.Tensor, center: bool):
    """Float64 features (centred per behavior on request), signs, behavior codes, split."""
    frame = ctx.statements
    names = ctx.behaviors
    codes = pd.Categorical(frame["behavior"], categories=names).codes.astype(np.int64)
    train = (frame["split"] == "train").to_numpy().copy()
    x = features.double().clone()
    if center:
        for i in range(len(names)):
            mask = torch.as_tensor(codes == i)
            x[mask] -= x[mask & torch.as_tensor(train)].mean(0)
    signs = frame["sign"].to_numpy().astype(np.float64)
    return x, signs, codes, train, names


def run(ctx) -> list[Path]:
    """Last-layer DPO per behavior (and together with ``--together``): writes
    ``last_layer.parquet`` (curves), ``last_layer_speed.parquet`` (per behavior),
    ``last_layer_summary.parquet``/``.json`` (ρ and CIs) and the figures."""
    from figures.probe_last_layer import plot, plot_together
    from llm_probes.features import answer_rows, probe_features

    args = ctx.args
    check(args)
    if ctx.pairs is not None:  # multi-token preference pairs, the whole output layer (issue 14)
        from llm_probes.pair_last_layer import run as run_pairs

        return run_pairs(ctx)
    loaded = ctx.model
    start = time.perf_counter()
    features, extract_seconds = probe_features(ctx)
    w0 = answer_rows(loaded, args.prompt_format).double()  # (V, d): rows Yes, No, the rest
    u0 = w0[YES] - w0[NO]
    x, signs, codes, train_mask, names = _prepared(ctx, features, args.center)
    for i, name in enumerate(names):
        group = signs[train_mask & (codes == i)]
        if (group > 0).sum() < 2 or (group < 0).sum() < 2:
            raise ParameterError("--behaviors", name, "needs >= 2 train statements of each "
                                 "answer to fit a Gaussian; raise --max-statements")
    limits = stability_limits(x, codes, train_mask, names, beta=args.beta,
                              together=args.together)
    fraction = AUTO_FRACTION if args.lr_fraction is None else args.lr_fraction
    lr = choose_lr(args.lr, limits, fraction=fraction, hint="lower --lr" if args.center
                   else "lower --lr, --center the features")
    worst = min(limits, key=limits.get)
    step_size = dict(lr_rule="auto" if args.lr == "auto" else "given",
                     lr_fraction_of_limit=lr / limits[worst],
                     stability_limit_min=limits[worst], stability_limit_on=worst)
    feature_kind = "centered" if args.center else "raw"
    settings = dict(beta=args.beta, lr=lr, steps=args.steps, eval_every=args.eval_every)

    curves, rows = [], []
    bar = _bar(len(names), ctx.progress)
    train_seconds = theory_seconds = 0.0
    for i, name in enumerate(names):
        mask = torch.as_tensor(train_mask & (codes == i))
        xt, st = x[mask], signs[mask.numpy()]
        zeros = np.zeros(len(st), dtype=np.int64)
        ranking = RowRanking(xt, w0)
        keep = _measured_keep(len(st), w0.shape[0])
        measured_ref, measured_missing = ranking.select(keep)
        theory_ref, theory_missing = ranking.select(args.theory_vocab)
        tick = time.perf_counter()
        result = train(xt, st, zeros, [name], reference=measured_ref, seed=ctx.seed, **settings)
        train_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        theory, problem = predict(xt, st, zeros, [name], reference=theory_ref, **settings)
        theory_seconds += time.perf_counter() - tick
        del measured_ref
        frame = curves_frame(result, theory, mode="separate")
        curves.append(frame)
        behavior = problem.behaviors[0]
        test = torch.as_tensor(~train_mask & (codes == i))
        row = dict(behavior=name, distinguishability=behavior.distinguishability,
                   concentration=behavior.concentration, trace=behavior.trace,
                   n_train=int(len(st)), n_test=int(test.sum()),
                   slope_closed_form=float(-initial_loss_slope(
                       empirical_mixture(xt, st, zeros, [name]), beta=args.beta)[0]),
                   measured_vocab=int(w0.shape[0] if keep is None else keep + 2),
                   measured_missing_mass=float(measured_missing.max(initial=0.0)),
                   theory_vocab=int(min(args.theory_vocab + 2, w0.shape[0])),
                   theory_missing_mass=float(theory_missing.max(initial=0.0)))
        sp = speed_table(frame).set_index("source")
        for column in ("loss_drop", "initial_slope", "loss", "accuracy", "reward_accuracy"):
            row[column] = float(sp.loc["measured", column])
            row[f"{column}_theory"] = float(sp.loc["theory", column])
        both = frame.pivot_table(index="step", columns="source", values="loss", observed=True)
        row["max_gap"] = float((both["measured"] - both["theory"]).abs().max())
        if test.any():
            test_rows = _test_metrics(result.final[0, 0].double(), u0, x[test],
                                      torch.as_tensor(signs[test.numpy()]), args.beta)
            row.update(test_rows)
            row["test_loss_drop"] = math.log(2) - test_rows["test_loss"]
        else:
            row.update(test_loss=math.nan, test_accuracy=math.nan,
                       test_reward_accuracy=math.nan, test_loss_drop=math.nan)
        rows.append(row)
        bar.update(1)
    bar.close()
    speeds = pd.DataFrame(rows)
    speeds.insert(1, "features", feature_kind)
    summary = rank_correlations(speeds, n_boot=args.bootstrap, seed=ctx.seed)

    priority = None
    together_seconds = 0.0
    if args.together:
        tick = time.perf_counter()
        mask = torch.as_tensor(train_mask)
        xt, st, bt = x[mask], signs[train_mask], codes[train_mask]
        ranking = RowRanking(xt, w0)
        keep = _measured_keep(len(st), w0.shape[0])
        measured_ref, missing = ranking.select(keep)
        theory_ref, _ = ranking.select(args.theory_vocab)
        del ranking
        result = train(xt, st, bt, names, reference=measured_ref, seed=ctx.seed, **settings)
        del measured_ref
        theory, problem = predict(xt, st, bt, names, reference=theory_ref, **settings)
        together = curves_frame(result, theory, mode="together")
        curves.append(together)
        priority = priority_table(problem, together, beta=args.beta)
        priority.insert(1, "features", feature_kind)
        priority["measured_vocab"] = int(w0.shape[0] if keep is None else keep + 2)
        priority["measured_missing_mass"] = float(missing.max(initial=0.0))
        order = spearman_ci(priority["rate"], priority["slope_measured"],
                            n_boot=args.bootstrap, seed=ctx.seed)
        summary = pd.concat([summary, pd.DataFrame([dict(
            speed="together_initial_slope", source="measured",
            definition="initial slope trained together, against the predicted rate "
                       "⟨m_i, m⟩ (not distinguishability)", primary=False, **order)])],
            ignore_index=True)
        together_seconds = time.perf_counter() - tick

    curves = pd.concat(curves, ignore_index=True)
    curves.insert(2, "features", feature_kind)
    curves["features"] = curves["features"].astype(str)
    summary.insert(0, "features", feature_kind)
    for key, value in settings.items():
        summary[key] = value
    out = ctx.out
    files = [
        write_parquet(out / "last_layer.parquet", curves),
        write_parquet(out / "last_layer_speed.parquet", speeds),
        write_parquet(out / "last_layer_summary.parquet", summary),
    ]
    if priority is not None:
        files.append(write_parquet(out / "last_layer_priority.parquet", priority))
    record = dict(model=loaded.name, fingerprint=loaded.fingerprint, features=feature_kind,
                  prompt_format=args.prompt_format, **settings, **step_size, seed=ctx.seed,
                  behaviors=names, stability_limit_lr=limits, speeds=SPEEDS,
                  primary_speed=PRIMARY_SPEED,
                  correlations=json.loads(summary.to_json(orient="records")),
                  seconds=dict(features=extract_seconds, measured=train_seconds,
                               theory=theory_seconds, together=together_seconds,
                               total=time.perf_counter() - start))
    files.append(atomic_write(out / "last_layer_summary.json", lambda p: p.write_text(
        json.dumps(record, indent=2, default=float) + "\n")))
    files += plot(curves, speeds, summary, out / "probe_last_layer")
    if priority is not None:
        files += plot_together(curves, priority, out / "probe_last_layer_together")
    if ctx.progress:
        primary = summary[summary["primary"]].iloc[0]
        print(f"last-layer: {_lr_text(args.lr, lr, step_size)}", file=sys.stderr)
        print(f"last-layer: {len(names)} behaviors; Spearman ρ(distinguishability, "
              f"{PRIMARY_SPEED}) = {primary['rho']:.3f} [{primary['ci_low']:.3f}, "
              f"{primary['ci_high']:.3f}]; max |theory − measured| loss = "
              f"{speeds['max_gap'].max():.2e}; {time.perf_counter() - start:.1f} s",
              file=sys.stderr)
    return files


def _lr_text(given, lr: float, step_size: dict) -> str:
    """``lr = auto: 0.5 × 4/(β² λ_max) = 0.5 × 0.00133 = 0.000667 (on 'x')``, or the
    given step as a fraction of the smallest limit."""
    limit, on = step_size["stability_limit_min"], step_size["stability_limit_on"]
    if given == "auto":
        fraction = lr / limit
        return (f"lr = auto: {fraction:.3g} × 4/(β² λ_max) = {fraction:.3g} × {limit:.3g} = "
                f"{lr:.3g} (smallest limit, on {on!r})")
    return (f"lr = {lr:.3g}: {step_size['lr_fraction_of_limit']:.3g} × 4/(β² λ_max), whose "
            f"smallest value is {limit:.3g} (on {on!r})")


def _bar(total: int, enabled: bool):
    from llm_probes.features import _progress

    return _progress(total, enabled, "last-layer DPO", unit="behavior")
