"""``prefdyn preflight``: features from the model (cached), the analysis, one HTML page.

Order of work: every option is checked, the data loaded and (for pairs) tokenized
under the budgets before the model's features are computed; every table and figure
is then computed in memory, and only when all succeeded are the files written, all
or none (:func:`dynamics.io.atomic_write_all`), so a run that fails leaves no partial
report. Feature caches are written as they are computed, so a rerun does not repeat
the forward passes: persona statements use the probes' cache
(:func:`llm_probes.features.statement_features`); pairs are cached by this module in
chunks of :data:`PAIR_CHUNK` pairs under ``cache_root()/pair_features/``, keyed by the
model fingerprint and the chunk's token ids.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dynamics.io import atomic_write, atomic_write_all, environment
from llm_probes.preflight import analysis as an
from llm_probes.preflight import core
from synthetic.validation import ParameterError

__all__ = ["pair_response_features", "persona_examples", "pair_examples", "choose_lr",
           "build_report", "render_html", "run", "PAIR_CHUNK"]

PAIR_CHUNK = 64
"""Pairs per cache file of the pair features. Chunks are cut from the first pair, so a
run on more pairs (a larger ``--max-pairs``) reuses every whole chunk of a smaller one
and an interruption loses at most one chunk; 64 pairs (128 sequences) still fill the
length-bucketed batches."""
AUTO_FRACTION = 0.5
"""``--lr auto``: this fraction of the stability limit ``1/(ℓ''(0) λ_max(E[g gᵀ]))``."""
CACHE_VERSION = 2
"""Part of every cached chunk's key: 2 since the prompt is read once per pair."""
TOP_CHES = 25
"""Rows of the CHES table shown on the page (the table file holds every pair)."""


# ------------------------------------------------------------------ features, cached
def _chunk_key(loaded, prompts, chosen, rejected) -> str:
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, loaded.fingerprint]).encode())
    for ids in (prompts, chosen, rejected):
        for seq in ids:
            digest.update(np.asarray(seq, dtype=np.int64).tobytes())
            digest.update(b"|")
    return digest.hexdigest()[:24]


def pair_response_features(loaded, tokenized, *, batch_size: int = 16, progress: bool = True,
                           cache_dir=None) -> dict[str, np.ndarray]:
    """``chosen_sum``, ``rejected_sum`` (n, d) float64 and ``chosen_tokens``,
    ``rejected_tokens`` (n,) of every tokenized pair
    (:func:`llm_probes.pair_features.shared_prompt_features`), cached per chunk."""
    from llm_probes.features import _progress
    from llm_probes.model import cache_root
    from llm_probes.pair_features import shared_prompt_features

    f = tokenized.frame
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "pair_features"
    n = len(f)
    parts, todo = {}, []
    for start in range(0, n, PAIR_CHUNK):
        rows = f.iloc[start:start + PAIR_CHUNK]
        key = _chunk_key(loaded, rows.prompt_ids, rows.chosen_ids, rows.rejected_ids)
        path = root / f"{key}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                parts[start] = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError):
            todo.append((start, rows, path))
    bar = _progress(sum(len(r) for _, r, _ in todo), progress, "pair features", unit="pair")
    try:
        for start, rows, path in todo:
            prompts = list(rows.prompt_ids)
            every = shared_prompt_features(loaded, prompts, list(rows.chosen_ids),
                                           list(rows.rejected_ids), batch_size=batch_size,
                                           progress=lambda k: bar.update(k / 2))
            m = len(rows)
            part = {"chosen_sum": every["sum"][:m], "rejected_sum": every["sum"][m:],
                    "chosen_tokens": every["tokens"][:m], "rejected_tokens": every["tokens"][m:]}

            def write(tmp, part=part):
                with open(tmp, "wb") as handle:
                    np.savez(handle, **part)

            atomic_write(path, write, option="the feature cache (PREFDYN_CACHE)")
            parts[start] = part
    finally:
        bar.close()
    return {k: np.concatenate([parts[s][k] for s in sorted(parts)]) for k in parts[0]}


def persona_examples(loaded, statements: pd.DataFrame, *, prompt_format: str,
                     batch_size: int, progress: bool) -> an.Examples:
    """Every statement's ``g(x)`` (raw, float64; the probes' cache), its sign and
    behavior; reference ``W0`` = the model's Yes and No rows."""
    from llm_probes.features import answer_rows, statement_features

    g = statement_features(loaded, statements, prompt_format=prompt_format,
                           batch_size=batch_size, progress=progress)
    names = tuple(dict.fromkeys(statements["behavior"]))
    b = pd.Categorical(statements["behavior"], categories=list(names)).codes.astype(np.int64)
    reference = answer_rows(loaded, prompt_format)[:2].double().numpy()  # (2, d): Yes, No
    return an.Examples(g.double().numpy(), statements["sign"].to_numpy(np.float64), b, names,
                       reference)


def pair_examples(features: dict, clusters: int, seed: int) -> tuple[an.Examples, np.ndarray]:
    """The pairs as examples of the margin model (:mod:`core`): response-mean feature
    differences, clustered by k-means into ``clusters`` groups; returns the examples
    and each pair's cluster label (n,)."""
    chosen = features["chosen_sum"] / features["chosen_tokens"][:, None]
    rejected = features["rejected_sum"] / features["rejected_tokens"][:, None]
    diffs = chosen - rejected  # (n, d)
    labels, centres, _ = core.kmeans(diffs, clusters, seed=seed)
    x, s, b = core.symmetrised(diffs, labels)
    names = tuple(f"cluster-{i + 1}" for i in range(clusters))
    return an.Examples(x, s, b, names, np.zeros((2, diffs.shape[1]))), labels, diffs, centres


def _snippet(text, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 1] + "…"


def cluster_table(frame: pd.DataFrame, names, labels: np.ndarray, diffs: np.ndarray,
                  centres: np.ndarray, *, examples: int = 2) -> pd.DataFrame:
    """Per cluster: its size and the ``examples`` pairs nearest its centre (file line,
    the last human turn of the prompt, the starts of both responses), to read what a
    cluster holds."""
    rows = []
    for i, name in enumerate(names):
        members = np.flatnonzero(labels == i)
        near = members[np.argsort(((diffs[members] - centres[i]) ** 2).sum(1),
                                  kind="stable")[:examples]]
        for j in near:
            row = frame.iloc[j]
            prompt = str(row.get("prompt", ""))
            turn = prompt.rsplit("Human:", 1)[-1].rsplit("\n\nAssistant:", 1)[0]
            rows.append(dict(cluster=name, pairs=int(len(members)), line=int(row["line"]),
                             prompt=_snippet(turn, 110),
                             chosen=_snippet(row.get("chosen", ""), 70),
                             rejected=_snippet(row.get("rejected", ""), 70)))
    return pd.DataFrame(rows)


def choose_lr(ex: an.Examples, lr, objective: str, beta: float) -> tuple[float, float]:
    """``(lr, limit)``: gradient descent on the margin loss diverges along the top
    direction of ``E[g gᵀ]`` above ``limit = 1/(ℓ''(0) λ_max)`` (the Hessian at ``Δ = 0``
    is ``ℓ''(0) E[g gᵀ]`` and the step on ``Δ`` is ``2·lr``; DPO: ``4/(β² λ_max)``, as
    :func:`llm_probes.last_layer.stability_limit`). ``lr = "auto"`` takes
    :data:`AUTO_FRACTION` of it; a number at or above it is refused. For the hinge,
    whose ``ℓ''(0)`` is 0, DPO's curvature ``β²/4`` stands in."""
    from dynamics.objectives import resolve_objective

    obj, hyper = resolve_objective(objective)
    eps = 1e-4
    h = torch.tensor([-eps, 0.0, eps], dtype=torch.float64)
    value = obj.loss(h, beta=beta, **hyper)
    curvature = float((value[0] - 2 * value[1] + value[2]) / eps**2)
    if curvature <= 1e-8:
        curvature = beta**2 / 4
    lam = float(np.linalg.eigvalsh(ex.x.T @ ex.x / len(ex.x))[-1])
    limit = 1.0 / (curvature * lam)
    if lr == "auto":
        return AUTO_FRACTION * limit, limit
    if lr >= limit:
        raise ParameterError("--lr", lr, f"must be < 1/(ℓ''(0) λ_max(E[g gᵀ])) = {limit:.3g} "
                             "(gradient descent diverges above it); lower it or use --lr auto")
    return float(lr), limit


# ------------------------------------------------------------------ the report
def build_report(ex: an.Examples, st: an.Settings, *, progress: bool = True) -> dict:
    """Every table of the report from the examples (no model, no files)."""
    from llm_probes.features import _progress

    tick = time.perf_counter()
    means = core.signed_means(ex.x, ex.s, ex.b, ex.k)
    weights, exact = core.equalising_weights(means)
    bar = _progress(3 + 2 * st.seeds, progress, "preflight", unit="run")
    theory = an.predict(ex, st)
    bar.update(1)
    theory_w = an.predict(ex, st, weights)
    bar.update(1)
    measured = an.measure(ex, st)
    bar.update(1)
    predict_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    rows, summary = an.reweighting_check(ex, st, weights,
                                         progress=None)
    bar.update(2 * st.seeds)
    bar.close()
    behaviors = an.behavior_table(ex, st, theory, measured, weights, exact, theory_w)
    curves = an.curves_table(ex, st, {("theory", "natural"): theory,
                                      ("measured", "natural"): measured,
                                      ("theory", "suggested"): theory_w})
    return dict(behaviors=behaviors, curves=curves, reweighting=rows,
                reweighting_summary=summary,
                seconds=dict(predict_and_check=predict_seconds,
                             reweighting=time.perf_counter() - tick))


def _img(data: bytes, alt: str) -> str:
    return (f'<img alt="{html.escape(alt)}" src="data:image/png;base64,'
            f'{base64.b64encode(data).decode("ascii")}">')


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, escape=True, float_format=lambda v: f"{v:.4g}",
                         na_rep="—", border=0, classes="t")


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;
color:#222;line-height:1.45}h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;
border-bottom:1px solid #ccc}table.t{border-collapse:collapse;font-size:.82em;margin:.6em 0}
table.t td,table.t th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}
img{max-width:100%}.note{color:#555;font-size:.9em}code{background:#f4f4f4;padding:0 3px}"""


def render_html(meta: dict, report: dict, figures: dict, ches: pd.DataFrame | None,
                clusters: pd.DataFrame | None = None) -> str:
    """The self-contained page: inline CSS, figures as base64 PNG, no external link."""
    e = html.escape
    b = report["behaviors"]
    unit = meta["unit"]
    flagged = b[b["status"] != "ok"]
    gap = float(b["gap"].max())
    summ = report["reweighting_summary"]
    order = " → ".join(b.sort_values(["predicted_rank", "behavior"])["behavior"])
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>prefdyn preflight</title><style>{_STYLE}</style></head><body>",
             "<h1>Pre-flight report: how this dataset is predicted to train</h1>",
             f"<p>{e(meta['data'])}<br>model {e(meta['model'])}; objective "
             f"<code>{e(meta['objective'])}</code>, β = {meta['beta']:g}, lr = {meta['lr']:.4g} "
             f"({e(meta['lr_rule'])}), {meta['steps']} steps (t = lr·step up to "
             f"{meta['lr'] * meta['steps']:.4g}).</p>",
             f"<p class='note'>{e(meta['model_text'])}</p>",
             f"<h2>1. Predicted learning curves and order (per {unit})</h2>",
             f"<p>Predicted order when trained together (initial rate ⟨m_i, m⟩, first = "
             f"learned first): <b>{e(order)}</b>.</p>",
             _img(figures["curves"], "learning curves"),
             _table(b[["behavior", "examples", "distinguishability", "weight", "rate",
                       "predicted_slope", "predicted_rank", "predicted_loss_drop",
                       "predicted_t_learned", "measured_loss_drop", "measured_rank",
                       "measured_t_learned"]]),
             f"<p class='note'>rate = ⟨m_i, Σ_j w_j m_j⟩ with m_i = E_i[s g]; predicted_slope "
             f"= −dL_i/dt at t = 0 = 2ℓ'(0)²·rate; t_learned: first t with implicit-reward "
             f"accuracy ≥ {an.ACCURACY_LEARNED:g}.</p>",
             f"<h2>2. Neglected or unlearned {unit}s, and a reweighting</h2>"]
    if clusters is not None:
        parts[-1:-1] = ["<p>What each cluster holds: the pairs nearest its centre "
                        "(preflight_clusters.csv).</p>", _table(clusters)]
    if len(flagged):
        parts.append("<p>" + "; ".join(f"<b>{e(r.behavior)}</b>: {r.status} (rate "
                                       f"{r.rate:.3g}, predicted loss drop "
                                       f"{r.predicted_loss_drop:.3g})"
                                       for r in flagged.itertuples()) + "</p>")
    else:
        parts.append(f"<p>None: every {unit}'s initial rate is at least "
                     f"{core.NEGLECT_FRACTION:g} of the largest.</p>")
    parts += [f"<p class='note'>neglected: rate &lt; {core.NEGLECT_FRACTION:g} × the largest; "
              "pushed back first: rate ≤ 0 (the shared direction raises its loss at the start); "
              "unlearned: no predicted loss drop over the horizon. The suggested weights "
              "solve G w ∝ 1, G_ij = ⟨m_i, m_j⟩, so "
              "every predicted initial rate is equal"
              + ("" if bool(b["reweighting_exact"].iloc[0]) else
                 " as nearly as nonnegative weights allow (G⁻¹1 has a negative entry)")
              + ".</p>",
              _table(b[["behavior", "weight", "suggested_weight", "rate", "rate_reweighted",
                        "predicted_loss_drop", "predicted_loss_drop_reweighted", "status"]]),
              "<h2>3. Check of the predictions: a short last-layer run on the same data</h2>",
              f"<p>Largest |measured − predicted| training loss over the run: <b>{gap:.3g}</b> "
              f"(per {unit}: " + ", ".join(f"{e(r.behavior)} {r.gap:.2g}"
                                           for r in b.itertuples()) + "). "
              "Measured order by loss drop: "
              + e(" → ".join(b.sort_values(["measured_rank", "behavior"])["behavior"]))
              + ".</p>",
              "<h2>4. Does the reweighting do what it claims? (measured)</h2>",
              f"<p>{int(summ['seeds'].iloc[0])} bootstrap samples of the data, each trained "
              "with the data's own weights and with the suggested ones; spread = sd/|mean| of "
              "the measured speeds across " + unit + "s; shrink = natural − suggested, "
              "mean and 95% t-interval over seeds.</p>",
              _img(figures["reweighting"], "reweighting check"), _table(summ)]
    parts.append("<h2>5. Pairs at risk of likelihood displacement (CHES)</h2>")
    if ches is None:
        parts.append("<p>Does not apply: with single-token Yes/No answers both response "
                     "sums in CHES (Razin et al. arXiv:2410.08847, Def. 2) are the same g(x), "
                     "so CHES is identically 0. <code>prefdyn probe displacement</code> scores "
                     "the answer + end-of-text responses instead.</p>")
    else:
        parts += ["<p>CHES = ⟨S_w, S_l⟩ − ‖S_w‖², S = sum over the response's tokens of the "
                  "final hidden states that score them (Razin et al. arXiv:2410.08847, "
                  "Def. 2); higher = log π(y_w) more likely to fall under DPO. "
                  f"Top {min(TOP_CHES, len(ches))} of {len(ches)} (all in "
                  "preflight_ches.csv):</p>", _img(figures["ches"], "CHES"),
                  _table(ches.head(TOP_CHES))]
    parts.append(f"<p class='note'>{e(meta['footer'])}</p></body></html>")
    return "\n".join(parts)


def run(args, *, loaded, statements=None, tokenized=None, pairs=None) -> list[Path]:
    """Compute the report and write it (all files or none). ``args`` checked already."""
    from figures.preflight import ches_figure, curves_figure, reweighting_figure

    start = time.perf_counter()
    progress = not args.quiet
    tick = time.perf_counter()
    cluster_info = None
    ches = clusters = None
    if tokenized is not None:
        features = pair_response_features(loaded, tokenized, batch_size=args.batch_size,
                                          progress=progress)
        k = args.clusters or core.default_clusters(len(tokenized.frame))
        ex, labels, diffs, centres = pair_examples(features, k, args.seed)
        clusters = cluster_table(tokenized.frame, ex.names, labels, diffs, centres)
        ches = core.ches_table(features["chosen_sum"], features["rejected_sum"],
                               features["chosen_tokens"], features["rejected_tokens"],
                               line=tokenized.frame["line"].to_numpy())
        ches.insert(2, "cluster", np.asarray(ex.names)[labels[ches["pair"].to_numpy()]])
        cluster_info = k
        data = f"{pairs.report()}; {tokenized.report()}; {k} clusters (k-means on φ_w − φ_l)"
        model_text = ("Model: for each pair g = φ(x, y_w) − φ(x, y_l), the difference of the "
                      "two responses' mean final hidden states; the linear log-ratio Δᵀφ is "
                      "trained from Δ = 0 on the margin h = Δᵀg (each pair entered as (g, +1) "
                      "and (−g, −1)), the reference margin taken as 0 (accuracies are "
                      "implicit-reward accuracies). Clusters: k-means on g, seeded by --seed.")
        unit = "cluster"
    else:
        ex = persona_examples(loaded, statements, prompt_format=args.prompt_format,
                              batch_size=args.batch_size, progress=progress)
        data = (f"{len(statements)} persona statements of {ex.k} behaviors from "
                f"{args.persona_dir or '$PREFDYN_PERSONA_DIR'}")
        model_text = ("Model: THEORY §1, the last layer's Yes/No rows on the raw final hidden "
                      "state g(x) of each statement (prompt format " + args.prompt_format
                      + "), s = +1 when the behavior answers Yes; all statements of the "
                      "behaviors trained together from the model's own rows.")
        unit = "behavior"
    feature_seconds = time.perf_counter() - tick
    for i, name in enumerate(ex.names):
        for sign in (1.0, -1.0):
            if ((ex.b == i) & (ex.s == sign)).sum() >= 2:
                continue
            if tokenized is not None:
                raise ParameterError("--clusters", cluster_info, f"leaves {name} with fewer "
                                     "than 2 pairs to fit a Gaussian; use fewer clusters")
            raise ParameterError("--max-statements", args.max_statements, f"leaves {name} "
                                 "with fewer than 2 statements of one answer; raise it")
    lr, limit = choose_lr(ex, args.lr, args.objective, args.beta)
    eval_every = args.eval_every or max(1, args.steps // 50)
    st = an.Settings(objective=args.objective, beta=args.beta, lr=lr, steps=args.steps,
                     eval_every=eval_every, seeds=args.seeds, seed=args.seed)
    report = build_report(ex, st, progress=progress)
    model_name = getattr(loaded, "name", "?")
    meta = dict(data=data, model=model_name, objective=args.objective, beta=args.beta, lr=lr,
                lr_rule=(f"auto: {AUTO_FRACTION:g} × the stability limit {limit:.3g}"
                         if args.lr == "auto" else f"given; stability limit {limit:.3g}"),
                steps=args.steps, unit=unit, model_text=model_text,
                footer=f"prefdyn preflight; tables beside this page; seed {args.seed}; "
                       f"{time.perf_counter() - start:.0f} s")
    figures = {"curves": curves_figure(report["curves"], report["behaviors"],
                                       title=f"{args.objective}, β = {args.beta:g}, "
                                             f"lr = {lr:.3g}, per {unit}"),
               "reweighting": reweighting_figure(report["reweighting"],
                                                 report["reweighting_summary"])}
    if ches is not None:
        figures["ches"] = ches_figure(ches)
    page = render_html(meta, report, figures, ches, clusters)
    record = dict(meta, seed=args.seed, seeds=args.seeds, eval_every=eval_every,
                  stability_limit=limit, clusters=cluster_info,
                  max_gap=float(report["behaviors"]["gap"].max()),
                  reweighting=json.loads(report["reweighting_summary"].to_json(
                      orient="records")),
                  options={k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items() if k not in ("func", "command")},
                  seconds=dict(features=feature_seconds, **report["seconds"],
                               total=time.perf_counter() - start),
                  environment=environment("cuda" if getattr(loaded, "device", None) is not None
                                          and loaded.device.type == "cuda" else "cpu"))
    out = Path(args.out)
    files = {
        out / "preflight.html": lambda p: p.write_text(page, encoding="utf-8"),
        out / "preflight_behaviors.parquet":
            lambda p: report["behaviors"].to_parquet(p, index=False),
        out / "preflight_behaviors.csv": lambda p: report["behaviors"].to_csv(p, index=False),
        out / "preflight_curves.parquet": lambda p: report["curves"].to_parquet(p, index=False),
        out / "preflight_reweighting.parquet":
            lambda p: report["reweighting"].to_parquet(p, index=False),
        out / "preflight_reweighting_summary.csv":
            lambda p: report["reweighting_summary"].to_csv(p, index=False),
        out / "preflight.json": lambda p: p.write_text(json.dumps(record, indent=2,
                                                                  default=_json) + "\n"),
    }
    if clusters is not None:
        files[out / "preflight_clusters.csv"] = lambda p: clusters.to_csv(p, index=False)
    if ches is not None:
        files[out / "preflight_ches.parquet"] = lambda p: ches.to_parquet(p, index=False)
        files[out / "preflight_ches.csv"] = lambda p: ches.to_csv(p, index=False)
    written = atomic_write_all(files)
    if progress:
        summ = report["reweighting_summary"].set_index("speed")
        print(f"preflight: {ex.k} {unit}s; max |measured − predicted| loss "
              f"{record['max_gap']:.2e}; reweighting shrinks the spread of initial speeds by "
              f"{summ.loc['initial', 'shrink']:.3f} [{summ.loc['initial', 'shrink_low']:.3f}, "
              f"{summ.loc['initial', 'shrink_high']:.3f}]; {record['seconds']['total']:.1f} s",
              file=sys.stderr)
    return written


def _json(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)
