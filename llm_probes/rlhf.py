"""``prefdyn probe rlhf``: a reward model on the real features, RL from it, and DPO beside it.

The RLHF pipeline on a real model's frozen features, set against DPO on the same data:

1. a **Bradley–Terry reward model** ``r = ψᵀg`` on the features (the registry's
   ``reward_model``), and its held-out pair accuracy against the number of training
   samples (``--rm-sizes``, ``--rm-seeds`` random class-stratified subsets);
2. **RL** (the registry's ``rlhf``, exact policy gradient) from the frozen reward model,
   on the last layer;
3. **DPO** on the same data, at the same ``β``.

**Persona statements** (``--behaviors``): the answers are ``Yes``/``No``, the policy is
``softmax(W g)`` on ``Yes``, ``No`` and the ``--vocab`` rows of largest reference
probability (the same rows for the measurement and the theory; the left-out mass is
recorded). Trained by gradient descent with the reward model's step ``β²·lr`` and the
same steps as DPO, the reward head is exactly ``ψ_T = β Δ_DPO(T)`` (the two losses are
one function of ``βΔ``; THEORY §2), and RL's optimum ``W* = W0 + Φ/β`` then *is* DPO's
endpoint: the same optimum at equal β. The paths differ: RL's exact gradient is scaled by
the policy's own probabilities (``π(1 − π)`` on the answers), so it approaches ``W*``
slowly where the reference policy puts little mass. Measured per behavior with the
Gaussian fit's population flow (:func:`dynamics.analytic.population_descent`, each phase
from the theory's own reward head) drawn over it.

**Pairs** (``--pairs``): the reward model reads the mean scoring state of each response,
``r(x, y) = ψᵀ ḡ(x, y)`` (Bradley–Terry on ``ḡ_w − ḡ_l``); RL is
:func:`llm_probes.pair_last_layer.pair_objective`'s ``rlhf`` over each pair's two
responses with the whole output layer moving, whose optimum is the margin
``m* = (r(y_w) − r(y_l))/β``; DPO on the same pairs has no finite optimum when the
pairs can be separated (its loss keeps falling). Reported: how close RL's margins come
to ``m*``, both methods' paths, and the KL each reaches on the two responses.
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

from synthetic.validation import ParameterError, check_integer, check_number

__all__ = ["add_arguments", "check", "check_model", "run", "reward_curve", "rlhf_curvature",
           "parse_sizes"]


def add_arguments(parser) -> None:
    from llm_probes.features import add_feature_arguments
    from llm_probes.last_layer import AUTO_FRACTION

    add_feature_arguments(parser)
    group = parser.add_argument_group("reward model, RL and DPO")
    group.add_argument("--beta", type=float, default=1.0, help="β of DPO and of RL's KL "
                       "penalty (default: 1)")
    group.add_argument("--lr", default=None, metavar="LR|auto",
                       help="DPO's step (default: 1e-3 with --behaviors, where the reward "
                       "model's is β²·LR; auto with --pairs, where the reward model's is "
                       "--lr-fraction of its own limit)")
    group.add_argument("--rl-lr", default="auto", metavar="LR|auto",
                       help="RL's step (default: auto, --lr-fraction of RL's own stability "
                       "limit)")
    group.add_argument("--lr-fraction", type=float, default=AUTO_FRACTION, metavar="F",
                       help=f"fraction of a stability limit an auto step takes "
                       f"(default: {AUTO_FRACTION:g})")
    group.add_argument("--steps", type=int, default=None,
                       help="DPO and reward-model steps (default: 2000 with --behaviors, 60 "
                       "with --pairs)")
    group.add_argument("--rl-steps", type=int, default=None,
                       help="RL steps (default: 2000 with --behaviors, 60 with --pairs)")
    group.add_argument("--eval-every", type=int, default=None,
                       help="record every N steps (default: 50 with --behaviors, 5 with "
                       "--pairs)")
    group.add_argument("--vocab", type=int, default=16, metavar="K",
                       help="with --behaviors: output rows besides Yes/No, the most probable "
                       "under the reference (default: 16; the left-out mass is recorded)")
    group.add_argument("--qmc-points", type=int, default=1024, metavar="N",
                       help="with --behaviors: quasi-Monte Carlo points per component of the "
                       "theory's RL flow (default: 1024; its cost grows with N × rows)")
    group.add_argument("--rm-sizes", default="8,16,32,64,all", metavar="N,N,...",
                       help="training-set sizes of the reward model's held-out accuracy "
                       "curve (default: 8,16,32,64,all)")
    group.add_argument("--rm-seeds", type=int, default=5,
                       help="random subsets per size (default: 5)")
    group.add_argument("--test-fraction", type=float, default=0.25, metavar="F",
                       help="with --pairs: share of the pairs held out (default: 0.25)")


def parse_sizes(text: str) -> list:
    """``"8,16,all"`` → ``[8, 16, "all"]`` (each an integer >= 2, or all)."""
    sizes = []
    for part in str(text).split(","):
        part = part.strip()
        if part == "all":
            sizes.append("all")
            continue
        try:
            sizes.append(check_integer("--rm-sizes", int(part), ge=2))
        except ValueError:
            raise ParameterError("--rm-sizes", text, "must be integers >= 2 or all, "
                                 "comma-separated") from None
    if not sizes:
        raise ParameterError("--rm-sizes", text, "must name at least one size")
    return sizes


def check(args) -> None:
    """Validate every option (one line naming it) and fill the defaults that depend on
    ``--pairs``."""
    from llm_probes.last_layer import parse_lr

    pairs = getattr(args, "pairs", None) is not None
    defaults = (dict(lr="auto", steps=60, rl_steps=60, eval_every=5) if pairs else
                dict(lr=1e-3, steps=2000, rl_steps=2000, eval_every=50))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_number("--beta", args.beta, gt=0)
    args.lr = parse_lr("--lr", args.lr)
    args.rl_lr = parse_lr("--rl-lr", args.rl_lr)
    check_number("--lr-fraction", args.lr_fraction, gt=0, lt=1)
    check_integer("--steps", args.steps, ge=1)
    check_integer("--rl-steps", args.rl_steps, ge=1)
    check_integer("--eval-every", args.eval_every, ge=1, le=min(args.steps, args.rl_steps))
    check_integer("--vocab", args.vocab, ge=0)
    check_integer("--qmc-points", args.qmc_points, ge=16)
    check_integer("--rm-seeds", args.rm_seeds, ge=1)
    check_integer("--batch-size", args.batch_size, ge=1)
    args.rm_sizes = parse_sizes(args.rm_sizes) if isinstance(args.rm_sizes, str) \
        else args.rm_sizes
    check_number("--test-fraction", args.test_fraction, ge=0, lt=1)
    if not pairs and args.test_fraction != 0.25:
        raise ParameterError("--test-fraction", args.test_fraction, "applies only with --pairs "
                             "(persona statements keep their own train/test split)")
    if pairs and args.test_fraction == 0:
        raise ParameterError("--test-fraction", 0, "must be > 0 with --pairs (the reward "
                             "model's accuracy is measured on held-out pairs)")


def check_model(ctx) -> None:
    """With ``--pairs``: tokenize them under the budgets before anything is written."""
    if ctx.pairs is not None:
        from llm_probes.pair_features import check_model as check_pairs

        check_pairs(ctx)


# --------------------------------------------------------------------- building blocks


def rlhf_curvature(features: torch.Tensor, reference: np.ndarray, beta: float, *,
                   iterations: int = 60, seed: int = 0) -> float:
    """``λ_max`` of the KL penalty's Hessian at ``W0``, ``β E[(diag π0 − π0π0ᵀ) ⊗ g gᵀ]``
    (the Fisher information times β; the reward's own curvature, which the trained head
    makes small, is left out), by power iteration on ``D ↦ β E[(diag π0 − π0π0ᵀ) D g gᵀ]``
    (``D`` of shape ``(V, d)``). ``--rl-lr auto`` takes a fraction of ``2/λ_max``."""
    x = features.double()
    w0 = torch.as_tensor(reference, dtype=torch.float64)
    p = torch.softmax(x @ w0.T, dim=1)  # (n, V)
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(w0.shape, generator=g, dtype=torch.float64)
    lam = 0.0
    for _ in range(iterations):
        d = d / d.norm()
        z = x @ d.T  # (n, V): D g per statement
        cz = p * z - p * (p * z).sum(1, keepdim=True)  # (diag π − ππᵀ) D g
        hd = beta * cz.T @ x / x.shape[0]
        lam = float((hd * d).sum())
        d = hd
    return lam


def _stratified(signs: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices, the two answers' counts proportional to theirs."""
    pos, neg = np.flatnonzero(signs > 0), np.flatnonzero(signs <= 0)
    take = int(round(size * len(pos) / len(signs)))
    take = min(max(take, 1 if len(pos) else 0), len(pos), size)
    rest = min(size - take, len(neg))
    return np.sort(np.r_[rng.choice(pos, take, replace=False),
                         rng.choice(neg, rest, replace=False)]).astype(np.int64)


def reward_curve(train_x: torch.Tensor, train_s: np.ndarray, test_x: torch.Tensor,
                 test_s: np.ndarray, *, sizes, seeds: int, lr: float, steps: int,
                 seed: int = 0) -> pd.DataFrame:
    """Held-out pair accuracy of the Bradley–Terry reward model ``ψᵀg`` trained on
    ``n`` random class-stratified training samples, ``seeds`` subsets per ``n``
    (batched in one :func:`dynamics.simulate.simulate_sample` call per size; ties
    count one half). Columns: n, subset, test_accuracy, train_accuracy."""
    from dynamics.metrics import tie_half
    from dynamics.simulate import simulate_sample
    from synthetic.sampling import PreferenceSample

    total = len(train_s)
    rows = []
    rng = np.random.default_rng(seed)
    d = train_x.shape[1]
    reference = np.zeros((2, d))
    for size in sizes:
        n = total if size == "all" else min(int(size), total)
        picks = [np.arange(total) if n == total else _stratified(train_s, n, rng)
                 for _ in range(1 if n == total else seeds)]
        x = torch.stack([train_x[torch.as_tensor(p)] for p in picks])  # (S, n, d)
        s = torch.as_tensor(np.stack([train_s[p] for p in picks]), dtype=x.dtype)
        data = PreferenceSample(x, s, s, torch.zeros(n, dtype=torch.long), ("pairs",))
        result = simulate_sample(data, seeds=list(range(len(picks))), beta=1.0, lr=lr,
                                 steps=steps, reference=reference, objective="reward_model",
                                 eval_every=steps)
        psi = result.final[:, 0].double()  # (S, d)
        test = tie_half(torch.as_tensor(test_s)[None] * (psi @ test_x.double().T))
        train = tie_half(s.double() * torch.einsum("snd,sd->sn", x.double(), psi))
        for j in range(len(picks)):
            rows.append(dict(n=n, subset=j, test_accuracy=float(test[j].mean()),
                             train_accuracy=float(train[j].mean())))
    return pd.DataFrame(rows)


def _interval(values: np.ndarray) -> tuple[float, float, float]:
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def curve_table(curve: pd.DataFrame) -> pd.DataFrame:
    """Per ``n``: mean held-out accuracy and its 95% t interval over the subsets."""
    rows = []
    for n, part in curve.groupby("n"):
        mean, low, high = _interval(part.test_accuracy.to_numpy())
        rows.append(dict(n=int(n), subsets=len(part), test_accuracy=mean, ci_low=low,
                         ci_high=high, train_accuracy=float(part.train_accuracy.mean())))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------ the probe


def run(ctx) -> list[Path]:
    check(ctx.args)
    if ctx.pairs is not None:
        return _run_pairs(ctx)
    return _run_persona(ctx)


def _head(psi: np.ndarray, shape) -> np.ndarray:
    """``Φ`` with rows ``Yes = ψ/2``, ``No = −ψ/2`` and zeros elsewhere: what the reward
    model's difference view trains from zero (the two rows move equal and opposite)."""
    from dynamics.model import NO, YES

    head = np.zeros(shape)
    head[YES], head[NO] = psi / 2, -psi / 2
    return head


def _distance_rows(deltas, target: np.ndarray, full: np.ndarray, steps, lr) -> pd.DataFrame:
    """RL's distance to DPO's endpoint along its path: ``‖(D_Yes − D_No) − Δ_DPO(T)‖ /
    ‖Δ_DPO(T)‖`` and ``‖D − Φ/β‖ / ‖Φ/β‖`` (the whole policy against RL's optimum)."""
    from dynamics.model import NO, YES

    d = np.asarray(deltas, dtype=np.float64)  # (E, V, d)
    diff = d[:, YES] - d[:, NO]
    return pd.DataFrame({
        "step": steps, "t": lr * np.asarray(steps),
        "to_dpo_endpoint": np.linalg.norm(diff - target, axis=1) / np.linalg.norm(target),
        "to_rl_optimum": (np.linalg.norm((d - full).reshape(len(d), -1), axis=1)
                          / np.linalg.norm(full))})


def _run_persona(ctx) -> list[Path]:
    from dynamics.analytic import population_descent
    from dynamics.io import atomic_write, write_parquet
    from dynamics.simulate import simulate_sample
    from figures.probe_rlhf import plot
    from llm_probes.features import _progress, answer_rows, probe_features
    from llm_probes.last_layer import RowRanking, _prepared, choose_lr, stability_limit
    from synthetic.mixture import population_mixture
    from synthetic.sampling import PreferenceSample
    from synthetic.statistics import fit_gaussian

    args = ctx.args
    started = time.perf_counter()
    loaded = ctx.model
    features, extract_seconds = probe_features(ctx)
    w0 = answer_rows(loaded, args.prompt_format).double()
    x, signs, codes, train_mask, names = _prepared(ctx, features, False)
    beta = args.beta
    curves, paths, learning, rows = [], [], [], []
    bar = _progress(len(names), ctx.progress, "reward model, RL, DPO", unit="behavior")
    for i, name in enumerate(names):
        train = train_mask & (codes == i)
        test = ~train_mask & (codes == i)
        st, se = signs[train], signs[test]
        if (st > 0).sum() < 2 or (st < 0).sum() < 2:
            raise ParameterError("--behaviors", name, "needs >= 2 train statements of each "
                                 "answer to fit a Gaussian; raise --max-statements")
        xt, xe = x[torch.as_tensor(train)], x[torch.as_tensor(test)]
        reference, missing = RowRanking(xt, w0).select(args.vocab)
        limit = stability_limit(xt, beta)
        lr = choose_lr(args.lr, {name: limit}, fraction=args.lr_fraction)
        rl_limit = 2.0 / rlhf_curvature(xt, reference, beta, seed=ctx.seed)
        rl_lr = choose_lr(args.rl_lr, {name: rl_limit}, fraction=args.lr_fraction,
                          name="--rl-lr", rule="2/λ_max(RL's Hessian at W0)")
        zeros = torch.zeros(len(st), dtype=torch.long)
        s = torch.as_tensor(st)
        data = PreferenceSample(xt[None], s[None], s[None], zeros, (name,))
        held = None
        if len(se):
            e = torch.as_tensor(se)
            held = PreferenceSample(xe[None], e[None], e[None],
                                    torch.zeros(len(se), dtype=torch.long), (name,))
        common = dict(seeds=[ctx.seed], beta=beta, reference=reference, heldout=held)
        dpo = simulate_sample(data, lr=lr, steps=args.steps, objective="dpo",
                              eval_every=args.eval_every, keep_deltas=True, **common)
        rm = simulate_sample(data, lr=beta**2 * lr, steps=args.steps, objective="reward_model",
                             eval_every=args.eval_every, **common)
        psi = rm.final[0, 0].double().numpy()
        head = _head(psi, reference.shape)
        rl = simulate_sample(data, lr=rl_lr, steps=args.rl_steps, objective="rlhf",
                             reward_head=head, eval_every=args.eval_every, keep_deltas=True,
                             **common)
        mixture = population_mixture(fit_gaussian(xt, st, np.zeros(len(st), dtype=np.int64),
                                                  [name]))
        flow = dict(beta=beta, reference=reference, eval_every=args.eval_every)
        t_dpo = population_descent(mixture, lr=lr, steps=args.steps, objective="dpo", **flow)
        t_rm = population_descent(mixture, lr=beta**2 * lr, steps=args.steps,
                                  objective="reward_model", **flow)
        t_head = _head(t_rm.deltas[-1], reference.shape)
        t_rl = population_descent(mixture, lr=rl_lr, steps=args.rl_steps, objective="rlhf",
                                  reward_head=t_head, qmc_points=args.qmc_points, **flow)
        for method, result, theory, step_lr in (("dpo", dpo, t_dpo, lr),
                                                ("reward_model", rm, t_rm, beta**2 * lr),
                                                ("rlhf", rl, t_rl, rl_lr)):
            for frame in (result.frame(), theory.frame()):
                frame.insert(0, "method", method)
                curves.append(frame)
        target = dpo.final[0, 0].double().numpy()
        measured = _distance_rows(rl.deltas[:, 0, 0], target, head / beta, rl.steps, rl_lr)
        theory = _distance_rows(t_rl.deltas, t_dpo.deltas[-1], t_head / beta, t_rl.steps,
                                rl_lr)
        paths += [measured.assign(behavior=name, source="simulation"),
                  theory.assign(behavior=name, source="theory")]
        curve = reward_curve(xt, st, xe, se, sizes=args.rm_sizes, seeds=args.rm_seeds,
                             lr=beta**2 * lr, steps=args.steps, seed=ctx.seed)
        learning.append(curve_table(curve).assign(
            behavior=name, population_accuracy=float(t_rm.per_behavior["reward_accuracy"][-1,
                                                                                          0])))
        last = lambda r, key: float(r.per_behavior[key][-1, 0, 0, 0])  # noqa: E731
        rows.append(dict(
            behavior=name, n_train=int(len(st)), n_test=int(len(se)), lr=lr, rl_lr=rl_lr,
            rl_lr_fraction_of_limit=rl_lr / rl_limit, vocab=int(reference.shape[0]),
            missing_mass=float(missing.max(initial=0.0)),
            rm_equals_beta_dpo=float(np.linalg.norm(psi - beta * target)
                                     / np.linalg.norm(psi)),
            rm_train_accuracy=last(rm, "reward_accuracy"),
            rm_test_accuracy=(last(rm, "heldout/reward_accuracy") if held is not None
                              else math.nan),
            dpo_kl=last(dpo, "objective/kl"), rl_kl=last(rl, "objective/kl"),
            rl_optimum_kl=_kl_at(xt, reference, head / beta),
            rl_to_dpo_endpoint=float(measured.to_dpo_endpoint.iloc[-1]),
            rl_to_dpo_endpoint_theory=float(theory.to_dpo_endpoint.iloc[-1]),
            rl_to_optimum=float(measured.to_rl_optimum.iloc[-1]),
            dpo_reward_accuracy=last(dpo, "reward_accuracy"),
            rl_reward_accuracy=last(rl, "reward_accuracy")))
        bar.update(1)
    bar.close()
    curves = pd.concat(curves, ignore_index=True)
    paths = pd.concat(paths, ignore_index=True)
    learning = pd.concat(learning, ignore_index=True)
    summary = pd.DataFrame(rows)
    record = dict(model=loaded.name, fingerprint=loaded.fingerprint, mode="behaviors",
                  beta=beta, steps=args.steps, rl_steps=args.rl_steps,
                  eval_every=args.eval_every, seed=ctx.seed,
                  behaviors=json.loads(summary.to_json(orient="records")),
                  seconds=dict(features=extract_seconds,
                               total=time.perf_counter() - started))
    out = ctx.out
    files = [write_parquet(out / "rlhf_curves.parquet", curves),
             write_parquet(out / "rlhf_paths.parquet", paths),
             write_parquet(out / "rlhf_reward_model.parquet", learning),
             write_parquet(out / "rlhf_summary.parquet", summary),
             atomic_write(out / "rlhf_summary.json", lambda p: p.write_text(
                 json.dumps(record, indent=2, default=float) + "\n"))]
    files += plot(curves, paths, learning, summary, out / "probe_rlhf")
    if ctx.progress:
        for row in rows:
            print(f"rlhf: {row['behavior']}: reward model = β·DPO to "
                  f"{row['rm_equals_beta_dpo']:.1e}; RL at {args.rl_steps} steps is "
                  f"{row['rl_to_dpo_endpoint']:.3f} from DPO's endpoint (theory "
                  f"{row['rl_to_dpo_endpoint_theory']:.3f}); KL: DPO {row['dpo_kl']:.4f}, "
                  f"RL {row['rl_kl']:.4f}, optimum {row['rl_optimum_kl']:.4f}", file=sys.stderr)
    return files


def _kl_at(features: torch.Tensor, reference: np.ndarray, change: np.ndarray) -> float:
    """Mean ``KL(softmax((W0 + D) g) ‖ softmax(W0 g))`` over the statements."""
    w0 = torch.as_tensor(reference, dtype=torch.float64)
    x = features.double()
    logp = torch.log_softmax(x @ (w0 + torch.as_tensor(change)).T, 1)
    logq = torch.log_softmax(x @ w0.T, 1)
    return float((logp.exp() * (logp - logq)).sum(1).mean())


# ------------------------------------------------------------------------ pairs


def _bernoulli_kl(z: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """``KL(Bern(σ(z)) ‖ Bern(σ(z0)))``, elementwise: the KL on a pair's two responses."""
    ls = torch.nn.functional.logsigmoid
    p = torch.sigmoid(z)
    return p * (ls(z) - ls(z0)) + (1 - p) * (ls(-z) - ls(-z0))


def _run_pairs(ctx) -> list[Path]:
    from dynamics.io import atomic_write, write_parquet
    from dynamics.simulate import simulate_sample
    from figures.probe_rlhf import plot_pairs
    from llm_probes.features import _progress
    from llm_probes.last_layer import choose_lr, stability_limit
    from llm_probes.pair_last_layer import (WholeLayer, _states, gauss_newton_limit,
                                            pair_objective, pair_states, split_pairs)
    from synthetic.sampling import PreferenceSample

    args = ctx.args
    started = time.perf_counter()
    loaded = ctx.model
    n_pairs = len(ctx.tokenized.frame)
    train_index, test_index = split_pairs(n_pairs, args.test_fraction, ctx.seed)
    if len(test_index) < 1:
        raise ParameterError("--max-pairs", n_pairs, "must leave at least one held-out pair "
                             "at this --test-fraction")
    states, extract_seconds = _states(ctx, np.r_[train_index, test_index])
    n, m = len(train_index), len(test_index)
    means = states["sum"] / states["tokens"][:, None]  # chosen of all, then rejected of all
    gap = torch.as_tensor(means[:n + m] - means[n + m:])  # ḡ_w − ḡ_l per pair
    ones = np.ones(n + m)
    rm_lr = args.lr_fraction * stability_limit(gap[:n], 1.0)  # Bradley–Terry on ḡ_w − ḡ_l
    curve = reward_curve(gap[:n], ones[:n], gap[n:], ones[n:], sizes=args.rm_sizes,
                         seeds=args.rm_seeds, lr=rm_lr, steps=args.steps, seed=ctx.seed)
    full = curve[curve.n == n]
    if full.empty:  # the sizes did not include every train pair: train on all of them
        full = reward_curve(gap[:n], ones[:n], gap[n:], ones[n:], sizes=["all"], seeds=1,
                            lr=rm_lr, steps=args.steps, seed=ctx.seed)
    s = torch.ones((1, n), dtype=gap.dtype)
    rm = simulate_sample(PreferenceSample(gap[:n][None], s, s, torch.zeros(n, dtype=torch.long),
                                          ("pairs",)), seeds=[ctx.seed], beta=1.0, lr=rm_lr,
                         steps=args.steps, reference=np.zeros((2, gap.shape[1])),
                         objective="reward_model", eval_every=args.steps)
    psi = rm.final[0, 0].double()
    reward_gap = gap[:n].double() @ psi  # r(y_w) − r(y_l) on the train pairs

    data = pair_states(states, n, m)
    w0 = loaded.model.get_output_embeddings().weight.detach().float()
    models = {
        "dpo": WholeLayer(w0, data, beta=args.beta, objective="dpo"),
        "rlhf": WholeLayer(w0, data, beta=args.beta, objective=lambda ref: pair_objective(
            "rlhf", beta=args.beta, reward_gap=reward_gap,
            reference_margin=ref[:n] - ref[n:2 * n])),
    }
    optimum = reward_gap / args.beta
    history, settings, finals = [], {}, {}
    bar = _progress(args.steps + args.rl_steps, ctx.progress, "whole-layer DPO and RL",
                    unit="step")
    for method, model in models.items():
        limit = gauss_newton_limit(model)["limit"]
        given = args.lr if method == "dpo" else args.rl_lr
        lr = choose_lr(given, {method: limit}, fraction=args.lr_fraction,
                       name="--lr" if method == "dpo" else "--rl-lr",
                       rule="2/λ, λ the Gauss-Newton curvature at W0")
        settings[method] = dict(lr=lr, stability_limit=limit)
        z0 = model.reference[:n] - model.reference[n:2 * n]
        steps = args.steps if method == "dpo" else args.rl_steps
        for step in range(steps + 1):
            if step < steps:
                logp = model.step(lr, predict=False)["logp"]  # at W before the step
                bar.update(1)
            else:
                logp = model.logps()
                finals[method] = model.margins(logp)[0]
            if step % args.eval_every == 0 or step == steps:
                margin, _ = model.margins(logp)
                change = logp - model.reference
                history.append(dict(
                    method=method, step=step, t=lr * step, loss=model.loss(margin),
                    margin=float(margin.mean()),
                    to_rl_optimum=float((margin - optimum).norm() / optimum.norm()),
                    prob_to_rl_optimum=float((torch.sigmoid(z0 + margin)
                                              - torch.sigmoid(z0 + optimum)).abs().mean()),
                    kl=float(_bernoulli_kl(z0 + margin, z0).mean()),
                    chosen_change=float(change[:n].mean()),
                    rejected_change=float(change[n:2 * n].mean()),
                    chosen_fell=float((change[:n] < 0).double().mean())))
    bar.close()
    history = pd.DataFrame(history)
    learning = curve_table(curve)
    z0 = models["rlhf"].reference[:n] - models["rlhf"].reference[n:2 * n]
    per_pair = pd.DataFrame({
        "line": ctx.tokenized.frame.line.to_numpy()[train_index],
        "reference_margin": z0.numpy(), "reward_gap": reward_gap.numpy(),
        "rl_optimum": optimum.numpy(), "rl_margin": finals["rlhf"].numpy(),
        "dpo_margin": finals["dpo"].numpy(),
        "rl_optimum_prob": torch.sigmoid(z0 + optimum).numpy(),
        "rl_prob": torch.sigmoid(z0 + finals["rlhf"]).numpy(),
        "dpo_prob": torch.sigmoid(z0 + finals["dpo"]).numpy()})
    end = history.groupby("method").tail(1).set_index("method")
    summary = dict(
        model=loaded.name, fingerprint=loaded.fingerprint, mode="pairs", beta=args.beta,
        steps=args.steps, rl_steps=args.rl_steps, train_pairs=n, test_pairs=m,
        tokens=ctx.tokenized.report(), reward_model_lr=rm_lr,
        reward_model_train_accuracy=float(full.train_accuracy.iloc[0]),
        reward_model_test_accuracy=float(full.test_accuracy.iloc[0]),
        reward_gap_mean=float(reward_gap.mean()), optimum_kl=float(_bernoulli_kl(
            models["rlhf"].reference[:n] - models["rlhf"].reference[n:2 * n] + optimum,
            models["rlhf"].reference[:n] - models["rlhf"].reference[n:2 * n]).mean()),
        **{f"{method}_{key}": value for method, part in settings.items()
           for key, value in part.items()},
        **{f"{method}_{key}": float(end.loc[method, key]) for method in models
           for key in ("loss", "margin", "kl", "to_rl_optimum", "prob_to_rl_optimum",
                       "chosen_fell")},
        seconds=dict(states=extract_seconds, total=time.perf_counter() - started),
        note="reward r(x, y) = ψᵀ mean scoring state of y; RL and DPO move every output row on "
             "frozen states; RL's expectation is exact over each pair's two responses")
    out = ctx.out
    files = [write_parquet(out / "rlhf_pairs.parquet", history),
             write_parquet(out / "rlhf_pairs_final.parquet", per_pair),
             write_parquet(out / "rlhf_reward_model.parquet", learning),
             atomic_write(out / "rlhf_summary.json", lambda p: p.write_text(
                 json.dumps(summary, indent=2, default=float) + "\n"))]
    files += plot_pairs(history, learning, summary, out / "probe_rlhf_pairs")
    if ctx.progress:
        print(f"rlhf --pairs: reward model held-out accuracy "
              f"{summary['reward_model_test_accuracy']:.3f} on {m} pairs; RL's margins "
              f"{summary['rlhf_to_rl_optimum']:.3f} from m* = Δr/β (relative; in probability "
              f"{summary['rlhf_prob_to_rl_optimum']:.3f}); KL on the two "
              f"responses: RL {summary['rlhf_kl']:.4f} (optimum {summary['optimum_kl']:.4f}), "
              f"DPO {summary['dpo_kl']:.4f}", file=sys.stderr)
    return files
