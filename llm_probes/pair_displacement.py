"""``prefdyn probe displacement --pairs PATH``: likelihood displacement on real
multi-token preference pairs (Razin et al. 2024, arXiv:2410.08847; THEORY §4.5).

1. **CHES** (their Definition 2) of every pair from the model *before* training, on
   the hidden states that score the responses' tokens
   (:func:`llm_probes.pair_features.shared_prompt_features` gives the sums
   ``S_w = Σ_k h_{x,y_w<k}`` and ``S_l = Σ_k h_{x,y_l<k}``):

       CHES_x(y_w, y_l)    = ⟨S_w, S_l⟩ − ‖S_w‖²,
       CHES_x^norm(y_w, y_l) = ⟨S_w/|y_w|, S_l/|y_l|⟩ − ‖S_w/|y_w|‖²

   (the second is their length-normalised variant).
2. **DPO** of the model on all the pairs (:func:`llm_probes.pair_dpo.train_pair_dpo`,
   ``--method full|lora``): ``log π(y_w)`` and ``log π(y_l)`` of every pair at each
   evaluation step; the share of pairs whose ``log π(y_w)`` ends below its start
   (``displaced_fraction``); Spearman ρ(CHES, change of ``log π(y_w)``) with a
   percentile bootstrap interval over pairs
   (:func:`llm_probes.last_layer.spearman_ci`) and scipy's p-value. Their finding is
   ρ < 0: the higher the CHES, the larger the fall.
3. **Mitigation**: drop the ``--drop-fraction`` of pairs with the highest CHES and
   retrain on the rest, against dropping as many pairs drawn at random, for each of
   ``--seeds`` seeds (the seed draws the batches, the LoRA start and the random drop);
   per run, on the pairs it trained on: the displaced fraction and the mean change of
   ``log π(y_w)``, and the same two for those pairs in the run on all pairs (the
   control); per rule, their mean over seeds with a t interval (95%), and the paired
   difference random − CHES over seeds.

Writes ``pair_displacement.parquet`` (per evaluation step: means and the displaced
fraction), ``pair_displacement_pairs.parquet`` (per pair), ``pair_displacement_ches.parquet``
(the correlations), ``pair_displacement_mitigation.parquet`` (per seed × rule) and
``pair_displacement_mitigation_summary.parquet``, ``pair_displacement_run.json`` and
the figure. Shapes: ``n`` pairs, ``d`` width.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from synthetic.validation import ParameterError, check_integer, check_number

__all__ = ["DROP_RULES", "add_arguments", "check", "check_model", "run", "pair_ches",
           "dropped_pairs", "drop_count", "mean_interval", "correlation_table",
           "trajectory_table", "mitigation_summary", "MITIGATION_METRICS"]

DROP_RULES = {"ches": "the pairs of highest CHES (ties: the earlier pair first)",
              "random": "pairs drawn uniformly without replacement (seeded)"}
PREDICTORS = ("ches", "ches_normalized")
DEFAULT_SEEDS, DEFAULT_DROP = 3, 0.1
BOOTSTRAP = 2000
LEVEL = 0.95


# --------------------------------------------------------------------------- CHES


def pair_ches(chosen_sum, rejected_sum, chosen_tokens, rejected_tokens) -> dict[str, np.ndarray]:
    """Per pair (float64): ``ches = ⟨S_w, S_l⟩ − ‖S_w‖²`` and ``ches_normalized``, the
    same with ``S_w/|y_w|`` and ``S_l/|y_l|``. ``*_sum`` ``(n, d)``: the summed scoring
    states of each response; ``*_tokens`` ``(n,)``: its length."""
    s_w = np.asarray(chosen_sum, dtype=np.float64)
    s_l = np.asarray(rejected_sum, dtype=np.float64)
    m_w = s_w / np.asarray(chosen_tokens, dtype=np.float64)[:, None]
    m_l = s_l / np.asarray(rejected_tokens, dtype=np.float64)[:, None]
    return {"ches": np.einsum("nd,nd->n", s_w, s_l) - np.einsum("nd,nd->n", s_w, s_w),
            "ches_normalized": np.einsum("nd,nd->n", m_w, m_l)
            - np.einsum("nd,nd->n", m_w, m_w)}


def drop_count(n: int, fraction: float) -> int:
    """Pairs to drop: ``round(fraction · n)`` (half up)."""
    return int(np.floor(fraction * n + 0.5))


def dropped_pairs(ches: np.ndarray, k: int, rule: str, *, seed: int) -> np.ndarray:
    """Sorted indices of the ``k`` pairs ``rule`` drops (:data:`DROP_RULES`)."""
    ches = np.asarray(ches, dtype=np.float64)
    if rule == "ches":
        return np.sort(np.argsort(-ches, kind="stable")[:k])
    if rule == "random":
        return np.sort(np.random.default_rng(seed).choice(len(ches), size=k, replace=False))
    raise ParameterError("rule", rule, f"must be one of {', '.join(DROP_RULES)}")


def mean_interval(values, level: float = LEVEL) -> dict[str, float]:
    """Mean of ``values`` with Student's t interval (NaN for fewer than 2 values)."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean()) if len(x) else float("nan")
    if len(x) < 2:
        return {"mean": mean, "ci_low": float("nan"), "ci_high": float("nan"), "n": len(x)}
    half = stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return {"mean": mean, "ci_low": mean - float(half), "ci_high": mean + float(half),
            "n": len(x)}


# --------------------------------------------------------------------------- tables


def trajectory_table(evals: dict, *, lr: float) -> pd.DataFrame:
    """Per evaluation step: mean ``logps/chosen``, ``logps/rejected``, the mean change of
    each since step 0 and ``displaced_fraction`` (``log π(y_w)`` below its step-0 value).
    ``evals``: step → ``(n, 2)`` log π(y_w), log π(y_l)."""
    start = evals[min(evals)].numpy()
    rows = []
    for step, values in sorted(evals.items()):
        v = values.numpy()
        rows.append({"step": step, "t": lr * step, "logps/chosen": float(v[:, 0].mean()),
                     "logps/rejected": float(v[:, 1].mean()),
                     "chosen_change": float((v[:, 0] - start[:, 0]).mean()),
                     "rejected_change": float((v[:, 1] - start[:, 1]).mean()),
                     "displaced_fraction": float((v[:, 0] < start[:, 0]).mean())})
    return pd.DataFrame(rows)


def correlation_table(pairs: pd.DataFrame, *, seed: int, n_boot: int = BOOTSTRAP) -> pd.DataFrame:
    """Spearman ρ(predictor, ``logp_chosen_change``) per predictor, with the bootstrap
    interval over pairs and scipy's two-sided p-value."""
    from llm_probes.last_layer import spearman_ci

    y = pairs["logp_chosen_change"].to_numpy()
    rows = []
    for predictor in PREDICTORS:
        x = pairs[predictor].to_numpy()
        ci = spearman_ci(x, y, n_boot=n_boot, seed=seed, level=LEVEL)
        ok = len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0
        rows.append({"predictor": predictor, "n": len(x), "rho": ci["rho"],
                     "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
                     "p_value": float(stats.spearmanr(x, y).pvalue) if ok else float("nan"),
                     "displaced_fraction": float((y < 0).mean())})
    return pd.DataFrame(rows)


MITIGATION_METRICS = ("displaced_fraction", "chosen_change", "displaced_fraction_all",
                      "chosen_change_all")
"""Per mitigation run, on the pairs it kept: after retraining without the dropped
pairs, and (``_all``) the same pairs in the run on all pairs (the control: a rule
that merely dropped pairs that were going to be displaced scores low there too)."""
PAIRED = "random - ches"


def mitigation_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per rule × metric (:data:`MITIGATION_METRICS` present in ``runs``): mean over
    seeds with its t interval (:func:`mean_interval`); and, when both rules ran, the
    paired difference random minus CHES over the seeds both have (rule
    ``"random - ches"``) of the retrained ``displaced_fraction`` and ``chosen_change``."""
    rows = []
    metrics = [m for m in MITIGATION_METRICS if m in runs]
    for rule, group in runs.groupby("rule", sort=False):
        for metric in metrics:
            rows.append({"rule": rule, "metric": metric, **mean_interval(group[metric])})
    if {"ches", "random"} <= set(runs["rule"]):
        for metric in ("displaced_fraction", "chosen_change"):
            wide = runs.pivot(index="seed", columns="rule", values=metric).dropna()
            rows.append({"rule": PAIRED, "metric": metric,
                         **mean_interval(wide["random"] - wide["ches"])})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the probe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that apply only with ``--pairs``."""
    group = parser.add_argument_group("with --pairs: the mitigation (drop high-CHES pairs)")
    group.add_argument("--seeds", type=int, default=None, metavar="N",
                       help=f"seeds of the mitigation runs, --seed … --seed+N−1; 0 skips the "
                       f"mitigation (default: {DEFAULT_SEEDS})")
    group.add_argument("--drop-fraction", type=float, default=None, metavar="F",
                       help="share of the pairs dropped before retraining (rounded half up; "
                       f"default: {DEFAULT_DROP})")


def check(args) -> None:
    """The pair options' rules that need no model; refused without ``--pairs``."""
    if getattr(args, "pairs", None) is None:
        for option in ("seeds", "drop_fraction"):
            if getattr(args, option, None) is not None:
                raise ParameterError(f"--{option.replace('_', '-')}", getattr(args, option),
                                     "applies only with --pairs")
        return
    if args.seeds is not None:
        check_integer("--seeds", args.seeds, ge=0)
    if args.drop_fraction is not None:
        check_number("--drop-fraction", args.drop_fraction, gt=0, lt=1)


def _resolved(args) -> tuple[int, float]:
    seeds = DEFAULT_SEEDS if args.seeds is None else args.seeds
    fraction = DEFAULT_DROP if args.drop_fraction is None else args.drop_fraction
    return seeds, fraction


def check_model(ctx) -> None:
    """Tokenize under the budgets (:func:`llm_probes.pair_features.check_model`) and
    check that the drop leaves something to compare: at least one pair dropped and
    two kept."""
    from llm_probes.pair_features import check_model as tokenize

    tokenize(ctx)
    seeds, fraction = _resolved(ctx.args)
    n = len(ctx.tokenized.frame)
    k = drop_count(n, fraction)
    if seeds and not 1 <= k <= n - 2:
        raise ParameterError("--drop-fraction", fraction, f"must drop at least 1 of the {n} "
                             f"pairs and keep at least 2 (it drops {k}; or --seeds 0)")


def _train(loaded, args, data, ref, config, index, seed: int, progress: bool):
    """One DPO run from the start model on the pairs ``index``; the model is left as it
    was (full: a copy is trained; LoRA: the adapters are removed)."""
    from llm_probes.finetune import policy_from_args
    from llm_probes.pair_dpo import train_pair_dpo
    from llm_probes.training import release_policy

    full = args.method == "full"
    policy = policy_from_args(loaded, args, copy_model=full, seed=seed)
    try:
        return train_pair_dpo(policy, data, ref, dataclasses.replace(config, seed=seed),
                              index=index, start=ref[index], progress=progress)
    finally:
        if not full:
            release_policy(policy)
        del policy


def run(ctx) -> list[Path]:
    """``prefdyn probe displacement --pairs PATH`` (see the module docstring)."""
    from dynamics.io import write_json, write_parquet
    from llm_probes.finetune import config_from_args
    from llm_probes.pair_dpo import pair_data, pair_logps
    from llm_probes.pair_features import shared_prompt_features

    args = ctx.args
    seeds, fraction = _resolved(args)
    config = config_from_args(args, ctx.seed)
    loaded, tok = ctx.model, ctx.tokenized
    data = pair_data(tok, loaded.tokenizer)
    n = len(data)
    everything = np.arange(n)
    clock = time.perf_counter()
    features = shared_prompt_features(loaded, data.prompts, data.chosen, data.rejected,
                                      batch_size=config.eval_batch_size)
    scores = pair_ches(features["sum"][:n], features["sum"][n:], features["tokens"][:n],
                       features["tokens"][n:])
    ref = pair_logps(loaded.model, data)
    setup_s = time.perf_counter() - clock
    clock = time.perf_counter()
    main = _train(loaded, args, data, ref, config, everything, ctx.seed, ctx.progress)
    train_s = time.perf_counter() - clock
    end = main.evals[max(main.evals)].numpy()
    f = tok.frame
    pairs = pd.DataFrame({
        "line": f.line.to_numpy(), "prompt_tokens": f.prompt_ids.map(len).to_numpy(),
        "chosen_tokens": features["tokens"][:n], "rejected_tokens": features["tokens"][n:],
        **scores, "logp_chosen_start": ref[:, 0].numpy(), "logp_chosen_end": end[:, 0],
        "logp_rejected_start": ref[:, 1].numpy(), "logp_rejected_end": end[:, 1]})
    pairs["logp_chosen_change"] = pairs.logp_chosen_end - pairs.logp_chosen_start
    pairs["logp_rejected_change"] = pairs.logp_rejected_end - pairs.logp_rejected_start
    pairs["margin_change"] = pairs.logp_chosen_change - pairs.logp_rejected_change
    curves = trajectory_table(main.evals, lr=config.lr)
    correlations = correlation_table(pairs, seed=ctx.seed)
    k = drop_count(n, fraction)
    all_change = pairs["logp_chosen_change"].to_numpy()
    runs = []
    end_only = dataclasses.replace(config, eval_every=config.steps)
    for seed in range(ctx.seed, ctx.seed + seeds):
        for rule in DROP_RULES:
            dropped = dropped_pairs(scores["ches"], k, rule, seed=seed)
            keep = np.setdiff1d(everything, dropped)
            result = _train(loaded, args, data, ref, end_only, keep, seed, ctx.progress)
            change = result.evals[max(result.evals)][:, 0].numpy() - ref[keep, 0].numpy()
            runs.append({"seed": seed, "rule": rule, "dropped": k, "kept": len(keep),
                         "dropped_lines": ",".join(map(str, f.line.to_numpy()[dropped])),
                         "displaced_fraction": float((change < 0).mean()),
                         "chosen_change": float(change.mean()),
                         "displaced_fraction_all": float((all_change[keep] < 0).mean()),
                         "chosen_change_all": float(all_change[keep].mean()),
                         "final_loss": float(result.steps.loss.iloc[-1])})
    mitigation = pd.DataFrame(runs, columns=["seed", "rule", "dropped", "kept", "dropped_lines",
                                             *MITIGATION_METRICS, "final_loss"])
    summary = mitigation_summary(mitigation) if len(mitigation) else pd.DataFrame(
        columns=["rule", "metric", "mean", "ci_low", "ci_high", "n"])
    out = Path(ctx.out)
    files = [write_parquet(out / "pair_displacement.parquet", curves),
             write_parquet(out / "pair_displacement_pairs.parquet", pairs),
             write_parquet(out / "pair_displacement_ches.parquet", correlations),
             write_parquet(out / "pair_displacement_mitigation.parquet", mitigation),
             write_parquet(out / "pair_displacement_mitigation_summary.parquet", summary),
             write_json(out / "pair_displacement_run.json", {
                 "method": args.method, "config": config.__dict__, "pairs": n,
                 "tokens": tok.report(), "seeds": list(range(ctx.seed, ctx.seed + seeds)),
                 "drop_fraction": fraction, "dropped": k, "setup_seconds": setup_s,
                 "train_seconds": train_s, "level": LEVEL, "bootstrap": BOOTSTRAP,
                 "drop_rules": DROP_RULES,
                 "note": "CHES on the base model's final-norm states that score each response "
                         "token (Razin et al. Def. 2); changes are end minus step 0"})]
    if not getattr(args, "no_figure", False):
        from figures.probe_pair_displacement import plot

        files.extend(plot(out))
    if ctx.progress:
        row = correlations.iloc[0]
        print(f"displacement: {n} pairs, {args.method}, {config.steps} steps: displaced "
              f"{curves.displaced_fraction.iloc[-1]:.0%}; rho(CHES, change) = {row.rho:.2f} "
              f"[{row.ci_low:.2f}, {row.ci_high:.2f}]", file=sys.stderr)
    return files
