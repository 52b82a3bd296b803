"""Likelihood displacement under DPO (Razin et al. 2024, arXiv:2410.08847), THEORY §4.5.

DPO raises the margin ``log π(y_w) − log π(y_l)`` but need not raise ``log π(y_w)``:
both can fall while the margin grows, the mass going to other tokens. This probe
trains the model by DPO (:func:`llm_probes.training.train_dpo`, the same options as
``finetune``) and measures, on the train statements:

1. ``log π(y_w)`` and ``log π(y_l)`` at every evaluation step, per behavior and per
   chosen answer, with the share of statements whose ``log π(y_w)`` is below its
   start (``displaced_fraction``) and the mass left on the two answers;
2. which tokens gain the probability mass: the change ``p_T(v|x) − p_0(v|x)`` of the
   next-token distribution at the last prompt position, averaged over statements
   (``mean_increase``), and how often ``v`` is among a statement's ``--top-k`` largest
   increases (``frequency``, Razin et al.'s count);
3. the CHES score of every statement, computed with the model before training, as a
   predictor of the change in ``log π(y_w)``: Spearman's ρ with a bootstrap interval
   (:func:`llm_probes.last_layer.spearman_ci`) and scipy's p-value.

**CHES.** Razin et al.'s Definition 2: with ``h_{x,y<k}`` the last-layer hidden state
(the vector the output layer multiplies) when the model reads ``x`` and the first
``k − 1`` tokens of ``y``,

    CHES_x(y⁺, y⁻) = ⟨Σ_k h_{x,y⁺<k}, Σ_k h_{x,y⁻<k}⟩ − ‖Σ_k h_{x,y⁺<k}‖².

For a one-token response the sums hold only ``g(x)``, the same for both answers, and
CHES is identically 0; responses in their experiments end with the end-of-text token,
so for ``y = (answer, EOS)`` the sum is ``g(x) + h(x·answer)``, with ``h(x·a)`` the
final hidden state at the answer token of the sequence ``x·a``. Two scores are
reported, both from the base model:

- ``ches`` (Definition 2, response = answer + EOS):
  ``⟨g + h_w, g + h_l⟩ − ‖g + h_w‖²``;
- ``ches_answer`` (the answer-position states alone): ``⟨h_w, h_l⟩ − ‖h_w‖²``,
  ``h_w = h(x·y_w)``, ``h_l = h(x·y_l)``.

(Their length-normalised variant divides both sums by the length, 2 here for both
answers: a constant factor 1/4, the same ranks.) Razin et al.'s single-token analysis
instead involves the output-layer rows: ``⟨W_{y_w}, W_{y_l}⟩ − ‖W_{y_w}‖²``, one value
per chosen answer here (``token_ches`` in ``displacement_run.json``).

A higher CHES predicts a larger fall of ``log π(y_w)``, i.e. ρ(CHES, change) < 0.

**Multi-token pairs** (``--pairs PATH``, :mod:`llm_probes.pair_displacement`): the
same questions on real preference data, with CHES on the responses' own hidden states.

Writes ``displacement.parquet``, ``displacement_statements.parquet``,
``displacement_tokens.parquet``, ``displacement_ches.parquet``,
``displacement_run.json`` and the figure. Shapes: ``n`` train statements, ``d``
width, ``V`` vocabulary.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from dynamics.io import write_json, write_parquet
from llm_probes.finetune import add_training_arguments, config_from_args, policy_from_args
from llm_probes.logprobs import PreferenceData, answer_logps, evaluate, preference_data
from llm_probes.objective import chosen_rejected
from llm_probes.training import peak_memory, release_policy, reset_peak_memory, train_dpo
from synthetic.validation import check_integer

__all__ = ["add_arguments", "check", "check_model", "run", "ches_scores", "answer_states",
           "token_gains", "trajectory_table", "ches_table", "TOP_TOKENS"]

TOP_TOKENS = 20
"""Tokens kept per group in ``displacement_tokens.parquet``."""
ALL = "all"


# --------------------------------------------------------------------------- CHES


def ches_scores(g: torch.Tensor, h_w: torch.Tensor, h_l: torch.Tensor) -> dict[str, np.ndarray]:
    """Both CHES scores per statement (float64) from ``g``, ``h_w``, ``h_l`` (n, d).

    ``ches = ⟨g + h_w, g + h_l⟩ − ‖g + h_w‖²`` (Razin et al.'s Definition 2 for the
    response answer + EOS) and ``ches_answer = ⟨h_w, h_l⟩ − ‖h_w‖²``.
    """
    g, h_w, h_l = g.double(), h_w.double(), h_l.double()
    a_w, a_l = g + h_w, g + h_l
    return {"ches": ((a_w * a_l).sum(-1) - (a_w * a_w).sum(-1)).numpy(),
            "ches_answer": ((h_w * h_l).sum(-1) - (h_w * h_w).sum(-1)).numpy()}


@torch.no_grad()
def answer_states(model, data: PreferenceData, index, *, eos_id: int, batch_size: int = 32):
    """``(g (n, d), h (n, 2, d))``: the final hidden state at the last prompt token and
    at the answer token of ``x·Yes`` and ``x·No``, from the prompt's key/value cache
    (:func:`llm_probes.logprobs.answer_logps` with ``eos_id``; that id only picks a
    log-probability that is discarded here)."""
    index = np.asarray(index, dtype=np.int64)
    device = next(model.parameters()).device
    g, h = [], []
    for start in range(0, len(index), batch_size):
        rows = index[start:start + batch_size]
        out = answer_logps(model, data.prompts.batch(rows, device), answers=data.answers,
                           eos_id=eos_id)
        g.append(out.hidden.float().cpu())
        h.append(out.answer_hidden.float().cpu())
    return torch.cat(g), torch.cat(h)


# --------------------------------------------------------------------------- tables


def _groups(codes: np.ndarray, names: list[str], chosen_yes: np.ndarray):
    """``(behavior, chosen, mask)`` for every behavior and all, × Yes / No / both."""
    for behavior, bmask in [(ALL, np.ones_like(chosen_yes))] + [
            (name, codes == i) for i, name in enumerate(names)]:
        for chosen, cmask in (("both", np.ones_like(chosen_yes)), ("Yes", chosen_yes),
                              ("No", ~chosen_yes)):
            mask = bmask & cmask
            if mask.any():
                yield behavior, chosen, mask


def trajectory_table(steps: list[int], logps: list[torch.Tensor], ref: torch.Tensor,
                     signs: torch.Tensor, codes: np.ndarray, names: list[str], *,
                     beta: float, lr: float) -> pd.DataFrame:
    """Per evaluation step × behavior (and ``all``) × chosen answer (Yes, No, both):
    mean ``logps/chosen``, ``logps/rejected``, ``rewards/margins``, ``answer_mass``
    (``π(y_w) + π(y_l)``) and ``displaced_fraction`` (share with ``log π(y_w)`` below
    its value at step 0). ``logps[k]`` (n, 2) at ``steps[k]``; ``ref`` (n, 2)."""
    ref_c, ref_r = (v.numpy() for v in chosen_rejected(ref.double(), signs))
    chosen_yes = signs.numpy() > 0
    start_c = None
    rows = []
    for step, values in zip(steps, logps):
        c, r = (v.numpy() for v in chosen_rejected(values.double(), signs))
        start_c = c if start_c is None else start_c
        margin = beta * ((c - ref_c) - (r - ref_r))
        for behavior, chosen, m in _groups(codes, names, chosen_yes):
            rows.append(dict(step=step, t=lr * step, behavior=behavior, chosen=chosen,
                             n=int(m.sum()), **{
                                 "logps/chosen": float(c[m].mean()),
                                 "logps/rejected": float(r[m].mean()),
                                 "rewards/margins": float(margin[m].mean()),
                                 "answer_mass": float((np.exp(c[m]) + np.exp(r[m])).mean()),
                                 "displaced_fraction": float((c[m] < start_c[m]).mean())}))
    return pd.DataFrame(rows)


def token_gains(before: torch.Tensor, after: torch.Tensor, codes: np.ndarray,
                names: list[str], tokenizer, *, top_k: int,
                keep: int = TOP_TOKENS) -> pd.DataFrame:
    """The tokens that gain the probability mass at the last prompt position.

    ``before``, ``after`` (n, V): log-distributions of the model before and after
    training. Per group (``all`` and each behavior): the ``keep`` tokens of largest
    mean ``p_T(v) − p_0(v)``, with ``frequency`` = share of the group's statements whose
    ``top_k`` largest increases include ``v``, and the mean probabilities before/after.
    """
    gain = after.float().exp() - before.float().exp()          # (n, V)
    top = gain.topk(min(top_k, gain.shape[1]), dim=-1).indices.numpy()   # (n, k)
    groups = [(ALL, np.ones(len(codes), dtype=bool))] + [
        (name, codes == i) for i, name in enumerate(names) if (codes == i).any()]
    weights = torch.tensor(np.stack([m / m.sum() for _, m in groups]), dtype=torch.float32)
    mean_gain = weights @ gain                                  # (G, V)
    del gain
    rows = []
    for (group, mask), means in zip(groups, mean_gain):
        counts = np.bincount(top[mask].ravel(), minlength=means.shape[0])
        best = means.topk(min(keep, means.shape[0])).indices
        m = torch.as_tensor(mask)
        p_before = before[:, best][m].double().exp().mean(0)
        p_after = after[:, best][m].double().exp().mean(0)
        for rank, token in enumerate(best.tolist(), start=1):
            rows.append(dict(group=group, rank=rank, token_id=int(token),
                             token=tokenizer.decode([token]),
                             mean_increase=float(means[token]),
                             frequency=float(counts[token] / mask.sum()),
                             p_before=float(p_before[rank - 1]),
                             p_after=float(p_after[rank - 1]), n=int(mask.sum())))
    return pd.DataFrame(rows)


def ches_table(statements: pd.DataFrame, *, seed: int, n_boot: int = 2000) -> pd.DataFrame:
    """Spearman ρ(score, change of log π(y_w)) per group × predictor, with a bootstrap
    interval over statements and scipy's two-sided p-value."""
    from llm_probes.last_layer import spearman_ci

    rows = []
    chosen_yes = (statements["chosen"] == "Yes").to_numpy()
    codes = pd.Categorical(statements["behavior"]).codes
    names = list(pd.Categorical(statements["behavior"]).categories)
    change = statements["logp_chosen_change"].to_numpy()
    for behavior, chosen, mask in _groups(codes, names, chosen_yes):
        for predictor in ("ches", "ches_answer"):
            x = statements[predictor].to_numpy()[mask]
            y = change[mask]
            ci = spearman_ci(x, y, n_boot=n_boot, seed=seed)
            ok = len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0
            p = float(stats.spearmanr(x, y).pvalue) if ok else float("nan")
            rows.append(dict(behavior=behavior, chosen=chosen, predictor=predictor,
                             n=int(mask.sum()), rho=ci["rho"], ci_low=ci["ci_low"],
                             ci_high=ci["ci_high"], p_value=p,
                             displaced_fraction=float((y < 0).mean())))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the probe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``prefdyn probe displacement``."""
    from llm_probes import pair_displacement

    add_training_arguments(parser, steps=20)
    parser.add_argument("--top-k", type=int, default=10,
                        help="largest per-statement probability increases counted per "
                        "token (default: 10)")
    parser.add_argument("--no-figure", action="store_true", help="write no figure")
    pair_displacement.add_arguments(parser)


def check(args) -> None:
    """Validate the options (one-line ParameterError naming the option)."""
    from llm_probes import pair_displacement
    from llm_probes.finetune import check as check_training

    check_integer("--top-k", args.top_k, ge=1)
    check_training(args)
    pair_displacement.check(args)


def check_model(ctx) -> None:
    """With ``--pairs``: the rules that need the tokenizer (:mod:`llm_probes.pair_displacement`)."""
    if ctx.pairs is not None:
        from llm_probes import pair_displacement

        pair_displacement.check_model(ctx)


def run(ctx) -> list[Path]:
    """``prefdyn probe displacement`` (trains ``ctx.model`` in place like ``finetune``;
    with ``--pairs``, :func:`llm_probes.pair_displacement.run`)."""
    if ctx.pairs is not None:
        from llm_probes import pair_displacement

        return pair_displacement.run(ctx)
    args = ctx.args
    top_k = check_integer("--top-k", args.top_k, ge=1)
    config = config_from_args(args, ctx.seed)
    loaded = ctx.model
    data = preference_data(loaded, ctx.statements, prompt_format=args.prompt_format,
                           completion=args.completion)
    train = data.train
    batch = config.eval_batch_size
    eos = loaded.tokenizer.eos_token_id
    clock = time.perf_counter()
    start = evaluate(loaded.model, data, np.arange(len(data.prompts)), batch_size=batch,
                     vocab=True)
    ref, before_vocab = start.logps, start.vocab[train]
    del start
    g, h = answer_states(loaded.model, data, train, eos_id=data.answers[0] if eos is None
                         else eos, batch_size=batch)
    signs = data.signs[train]
    positive = (signs > 0)[:, None]
    h_w = torch.where(positive, h[:, 0], h[:, 1])
    h_l = torch.where(positive, h[:, 1], h[:, 0])
    scores = ches_scores(g, h_w, h_l)
    head = loaded.lm_head.weight.detach().double()
    w_yes, w_no = head[data.answers[0]], head[data.answers[1]]
    token_ches = {"Yes": float(w_yes @ w_no - w_yes @ w_yes),
                  "No": float(w_yes @ w_no - w_no @ w_no)}
    setup_s = time.perf_counter() - clock
    trajectory: tuple[list[int], list[torch.Tensor]] = ([], [])

    def keep(step, evaluation):
        trajectory[0].append(step)
        trajectory[1].append(evaluation.logps)

    policy = policy_from_args(loaded, args, copy_model=False, seed=ctx.seed)
    reset_peak_memory(loaded.device)
    clock = time.perf_counter()
    try:
        train_dpo(policy, data, ref, config, start=ref, progress=ctx.progress, on_eval=keep)
        train_s = time.perf_counter() - clock
        after = evaluate(policy, data, train, batch_size=batch, vocab=True)
    finally:
        memory = peak_memory(loaded.device)
        release_policy(policy)
        if args.method == "full" and hasattr(ctx, "_model"):
            ctx._model = None
    codes = data.codes[train]
    curves = trajectory_table(trajectory[0], trajectory[1], ref[train], signs, codes,
                              data.names, beta=config.beta, lr=config.lr)
    c0, r0 = (v.numpy() for v in chosen_rejected(ref[train], signs))
    c1, r1 = (v.numpy() for v in chosen_rejected(after.logps, signs))
    table = ctx.statements.iloc[train][["behavior", "index", "statement", "sign"]].reset_index(
        drop=True)
    table["chosen"] = np.where(signs.numpy() > 0, "Yes", "No")
    table = table.assign(**scores, logp_chosen_start=c0, logp_chosen_end=c1,
                         logp_rejected_start=r0, logp_rejected_end=r1,
                         logp_chosen_change=c1 - c0, logp_rejected_change=r1 - r0,
                         margin_change=(c1 - r1) - (c0 - r0))
    tokens = token_gains(before_vocab, after.vocab, codes, data.names, loaded.tokenizer,
                         top_k=top_k)
    correlations = ches_table(table, seed=ctx.seed)
    out = Path(ctx.out)
    files = [write_parquet(out / "displacement.parquet", curves),
             write_parquet(out / "displacement_statements.parquet", table),
             write_parquet(out / "displacement_tokens.parquet", tokens),
             write_parquet(out / "displacement_ches.parquet", correlations),
             write_json(out / "displacement_run.json", {
                 "method": args.method, "completion": args.completion,
                 "config": config.__dict__, "train_statements": int(len(train)),
                 "token_ches": token_ches, "setup_seconds": setup_s,
                 "train_seconds": train_s, **memory})]
    if not getattr(args, "no_figure", False):
        from figures.probe_displacement import plot

        files.extend(plot(out))
    return files
