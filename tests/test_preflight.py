"""``prefdyn preflight`` (issue 14): the report before training.

Fast tests run on synthetic features (no model): the reweighting against hand
computations, k-means, CHES against a naive loop, the measured reweighting check,
the page's self-containment, refusals and the all-or-nothing write. The two
``llm`` tests run the real model at tiny sizes.
"""

from __future__ import annotations

import argparse
import re
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLOSED_FORM, FINITE_DIFFERENCE, assert_close

from llm_probes.preflight import OBJECTIVES, add_arguments, core
from llm_probes.preflight import analysis as an

pytest_plugins = ["llm_fixtures"]
PAIRS = "harmless-base-test.jsonl.gz"


def synthetic(magnitudes=(0.5, 1.5, 3.0), n=120, d=16, noise=0.5, seed=0) -> an.Examples:
    """Balanced Gaussian behaviors along orthogonal axes, ``‖μ⁺ − μ⁻‖`` = magnitudes."""
    rng = np.random.default_rng(seed)
    x, s, b = [], [], []
    for i, mag in enumerate(magnitudes):
        direction = np.zeros(d)
        direction[i] = mag
        for j in range(n):
            sign = 1.0 if j % 2 == 0 else -1.0
            x.append(sign * direction / 2 + noise * rng.normal(size=d))
            s.append(sign)
            b.append(i)
    names = tuple(f"b{i}" for i in range(len(magnitudes)))
    return an.Examples(np.array(x), np.array(s), np.array(b), names, np.zeros((2, d)))


# ------------------------------------------------------------------ the reweighting
def test_equalising_weights_orthogonal_by_hand():
    # m1 = (2, 0), m2 = (0, 1): G = diag(4, 1), w ∝ (1/4, 1) = (0.2, 0.8), rates 0.8 each
    means = np.array([[2.0, 0.0], [0.0, 1.0]])
    w, exact = core.equalising_weights(means)
    assert exact
    assert_close(w, [0.2, 0.8], CLOSED_FORM)
    assert_close(core.initial_rates(means, w), [0.8, 0.8], CLOSED_FORM)


def test_equalising_weights_correlated_by_hand():
    # m1 = (2, 0), m2 = (1, 2): G = [[4, 2], [2, 5]], G⁻¹1 = (3, 2)/16 → w = (0.6, 0.4);
    # m = (1.6, 0.8), ⟨m1, m⟩ = 3.2 = ⟨m2, m⟩
    means = np.array([[2.0, 0.0], [1.0, 2.0]])
    w, exact = core.equalising_weights(means)
    assert exact
    assert_close(w, [0.6, 0.4], CLOSED_FORM)
    assert_close(core.initial_rates(means, w), [3.2, 3.2], CLOSED_FORM)


def test_equalising_weights_without_a_positive_solution_against_a_grid():
    # m1 = (3, 0), m2 = (1, 1): G⁻¹1 = (−1, 6)/9 has a negative entry, so no mixture
    # equalises; the weights minimise ‖G w − 1‖ over w ≥ 0 (checked on a grid).
    means = np.array([[3.0, 0.0], [1.0, 1.0]])
    w, exact = core.equalising_weights(means)
    assert not exact and np.all(w >= 0) and abs(w.sum() - 1) < CLOSED_FORM
    gram = means @ means.T
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 1001), np.linspace(0, 1, 1001)), -1)
    residual = np.linalg.norm(grid @ gram.T - 1, axis=-1)  # (1001, 1001)
    best = grid[np.unravel_index(residual.argmin(), residual.shape)]
    assert_close(w, best / best.sum(), 2e-3)


def test_predicted_slopes_with_the_suggested_weights_are_equal():
    """The flow's own initial slope (dynamics.bounds.initial_loss_slope on the fitted
    mixture with the suggested weights) is equal across behaviors, and is
    −2ℓ'(0)²·rate with the rate of core.initial_rates."""
    from dynamics.bounds import initial_loss_slope
    from synthetic.mixture import population_mixture

    ex = synthetic()
    means = core.signed_means(ex.x, ex.s, ex.b, ex.k)
    w, exact = core.equalising_weights(means)
    assert exact
    slope = initial_loss_slope(population_mixture(an.fit(ex, w)), beta=0.5)
    assert_close(slope, np.full(3, slope[0]), CLOSED_FORM)
    assert_close(-slope, 2 * (0.5 / 2) ** 2 * core.initial_rates(means, w), CLOSED_FORM)


@pytest.mark.parametrize("objective,beta,expected", [
    ("dpo", 0.7, -0.35), ("ipo", 0.5, -2.0), ("hinge", 0.7, -0.7),
    ("reward_model", 3.0, -0.5), ("cdpo", 1.0, None)])
def test_loss_slope_at_zero(objective, beta, expected):
    from dynamics.objectives import resolve_objective

    if objective == "cdpo":  # ℓ'(0) = −β(1 − 2ε)/2 at its default ε
        eps = resolve_objective("cdpo")[1]["epsilon"]
        expected = -beta * (1 - 2 * eps) / 2
    assert_close(core.loss_slope_at_zero(objective, beta), expected, FINITE_DIFFERENCE)


def test_the_objective_choices_are_the_registered_margin_objectives():
    assert OBJECTIVES == core.MARGIN_OBJECTIVES


def test_the_prompt_format_choices_are_the_models():
    from llm_probes import PROMPT_FORMATS, preflight

    assert preflight.PROMPT_FORMATS == tuple(PROMPT_FORMATS)


def test_resample_counts_by_hand():
    s = np.array([1, 1, -1, -1, 1, -1, -1, -1.0])
    b = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    # behavior 0 balanced, behavior 1 one quarter positive; w = (0.25, 0.75), total 16:
    # (2, 2) and (3, 9)
    assert core.resample_counts(s, b, [0.25, 0.75], 16).tolist() == [[2, 2], [3, 9]]
    # a weight of 0 keeps one example of each sign
    assert core.resample_counts(s, b, [0.0, 1.0], 8).tolist() == [[1, 1], [2, 6]]


# ------------------------------------------------------------------ clusters and CHES
def test_kmeans_recovers_separated_clusters_and_its_inertia():
    rng = np.random.default_rng(3)
    centres = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    sizes = [30, 20, 10]
    x = np.concatenate([c + rng.normal(size=(m, 3)) for c, m in zip(centres, sizes)])
    truth = np.repeat([0, 1, 2], sizes)
    labels, fitted, inertia = core.kmeans(x, 3, seed=0)
    assert labels.tolist() == truth.tolist()  # numbered by decreasing size
    naive = sum(float(((x[j] - fitted[labels[j]]) ** 2).sum()) for j in range(len(x)))
    assert_close(inertia, naive, CLOSED_FORM)
    for i in range(3):
        assert_close(fitted[i], x[truth == i].mean(0), CLOSED_FORM)
    again = core.kmeans(x[::-1], 3, seed=5)[0][::-1]
    assert again.tolist() == truth.tolist()


def test_default_clusters():
    assert [core.default_clusters(n) for n in (10, 200, 500, 2312, 10**6)] == [2, 3, 5, 8, 8]


def test_ches_ranking_against_a_naive_loop():
    rng = np.random.default_rng(7)
    n, d = 40, 6
    sw, sl = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    lw, ll = rng.integers(1, 9, n), rng.integers(1, 9, n)
    table = core.ches_table(sw, sl, lw, ll, line=np.arange(n) + 100)
    naive = []
    for j in range(n):
        inner = sum(sw[j, k] * sl[j, k] for k in range(d))
        norm = sum(sw[j, k] ** 2 for k in range(d))
        naive.append((inner - norm, inner / (lw[j] * ll[j]) - norm / lw[j] ** 2, j))
    naive.sort(key=lambda row: -row[0])
    assert table["pair"].tolist() == [row[2] for row in naive]
    assert table["rank"].tolist() == list(range(1, n + 1))
    assert_close(table["ches"], [row[0] for row in naive], CLOSED_FORM)
    assert_close(table["ches_normalised"], [row[1] for row in naive], CLOSED_FORM)
    assert table["line"].tolist() == [row[2] + 100 for row in naive]


def test_symmetrised_pairs_train_as_the_pairs():
    """(g, +1) and (−g, −1) per pair: the same margins, so the same loss as the pairs."""
    rng = np.random.default_rng(1)
    diffs = rng.normal(size=(10, 4))
    x, s, b = core.symmetrised(diffs, np.zeros(10, dtype=int))
    delta = rng.normal(size=4)
    margins = s * (x @ delta)
    assert_close(margins[:10], diffs @ delta, CLOSED_FORM)
    assert_close(margins[10:], diffs @ delta, CLOSED_FORM)


# ------------------------------------------------------------------ prediction and checks
def test_prediction_tracks_the_measured_run_and_the_order():
    ex = synthetic()
    st = an.Settings(lr=0.1, steps=60, eval_every=5, seeds=4)
    theory, measured = an.predict(ex, st), an.measure(ex, st)
    means = core.signed_means(ex.x, ex.s, ex.b, ex.k)
    w, exact = core.equalising_weights(means)
    table = an.behavior_table(ex, st, theory, measured, w, exact, an.predict(ex, st, w))
    assert table["predicted_rank"].tolist() == [3, 2, 1]  # the most distinguishable first
    assert table["measured_rank"].tolist() == [3, 2, 1]
    assert table["gap"].max() < 5e-3  # Gaussian data: the fit is its law up to sampling
    # predicted_slope is −dL/dt at 0 = (β²/2)·rate for DPO, and the theory curve's first
    # interval approaches it
    assert_close(table["predicted_slope"], 0.5 * table["rate"], CLOSED_FORM)
    assert table.loc[0, "status"] != "ok" and table.loc[2, "status"] == "ok"


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_predicted_slope_is_the_flows_own_initial_slope(objective):
    """predicted_slope = 2ℓ'(0)²·⟨m_i, m⟩ against the population flow's first step
    (lr small: the difference quotient is the slope up to O(lr)), for every objective."""
    ex = synthetic(n=40)
    st = an.Settings(objective=objective, beta=0.8, lr=1e-4, steps=2, eval_every=1,
                     seeds=2)
    theory, measured = an.predict(ex, st), an.measure(ex, st)
    w, exact = core.equalising_weights(core.signed_means(ex.x, ex.s, ex.b, ex.k))
    table = an.behavior_table(ex, st, theory, measured, w, exact, an.predict(ex, st, w))
    assert_close(table["predicted_slope_theory_curve"], table["predicted_slope"], 1e-2,
                 scale=table["predicted_slope"].abs().max())


def test_reweighting_shrinks_the_measured_spread():
    """The claim of the report, measured: trained with the suggested weights, the
    spread of the measured learning speeds across behaviors shrinks (8 bootstrap seeds,
    the 95% interval of the shrink above 0)."""
    ex = synthetic()
    st = an.Settings(lr=0.1, steps=40, eval_every=4, seeds=8)
    w, _ = core.equalising_weights(core.signed_means(ex.x, ex.s, ex.b, ex.k))
    rows, summary = an.reweighting_check(ex, st, w)
    initial = summary.set_index("speed").loc["initial"]
    assert initial["shrink_low"] > 0 and initial["shrinks"]
    assert initial["spread_suggested"] < 0.5 * initial["spread_natural"]
    # the interval is the t-interval of the per-seed differences
    spread = rows[rows["speed"] == "initial"].pivot(index="seed", columns="weights",
                                                    values="spread")
    diff = (spread["natural"] - spread["suggested"]).to_numpy()
    assert_close(initial["shrink"], diff.mean(), CLOSED_FORM)
    from scipy import stats

    half = stats.t.ppf(0.975, 7) * diff.std(ddof=1) / np.sqrt(8)
    assert_close(initial["shrink_low"], diff.mean() - half, CLOSED_FORM)


# ------------------------------------------------------------------ the command
def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--out", str(tmp_path / "out"), "--quiet", *extra])


def _fake_run(monkeypatch, tmp_path, *extra, pairs=False):
    """report.run end to end on synthetic features (no model)."""
    from llm_probes import preflight
    from llm_probes.preflight import report

    ex = synthetic(n=40)
    if pairs:
        rng = np.random.default_rng(2)
        n = 48
        diffs = np.concatenate([np.eye(16)[i % 3] * (1 + i % 3) + 0.3 * rng.normal(size=16)
                                for i in range(n)]).reshape(n, 16)
        rejected = rng.normal(size=(n, 16))
        tokens_w, tokens_l = rng.integers(1, 5, n), rng.integers(1, 5, n)
        features = {"chosen_sum": (rejected + diffs) * tokens_w[:, None],
                    "rejected_sum": rejected * tokens_l[:, None],
                    "chosen_tokens": tokens_w, "rejected_tokens": tokens_l}
        monkeypatch.setattr(report, "pair_response_features", lambda *a, **k: features)
        frame = pd.DataFrame({"line": np.arange(n) + 1,
                              "prompt": [f"\n\nHuman: question {i}\n\nAssistant:"
                                         for i in range(n)],
                              "chosen": [" yes"] * n, "rejected": [" no"] * n})
        tokenized = SimpleNamespace(frame=frame,
                                    report=lambda: f"{n} pairs")
        source = SimpleNamespace(report=lambda: f"{n} pairs from fake")
        args = _args(tmp_path, "--pairs", "fake.jsonl", "--steps", "20", "--seeds", "3",
                     "--clusters", "3", "--lr", "0.05", *extra)
        preflight.check(args)
        return report.run(args, loaded=SimpleNamespace(name="fake", device=None),
                          tokenized=tokenized, pairs=source)
    monkeypatch.setattr(report, "persona_examples", lambda *a, **k: ex)
    args = _args(tmp_path, "--behaviors", "b0,b1,b2", "--steps", "20", "--seeds", "3",
                 "--lr", "0.1", *extra)
    preflight.check(args)
    return report.run(args, loaded=SimpleNamespace(name="fake", device=None),
                      statements=pd.DataFrame({"x": range(len(ex.b))}))


def test_pair_feature_cache_is_reused_by_a_larger_run(tmp_path, monkeypatch):
    """Chunks of PAIR_CHUNK pairs from the first: 100 pairs then 150 computes the
    chunks [0, 64) and [64, 100), then only [64, 128) and [128, 150); the cached
    values come back unchanged (a fake model: each sum is the sequence's token ids)."""
    from llm_probes import pair_features
    from llm_probes.preflight import report

    calls = []

    def fake(loaded, prompts, chosen, rejected, **kwargs):
        calls.append(len(prompts))
        responses, prompts = list(chosen) + list(rejected), list(prompts) * 2
        sums = np.array([[sum(p) + sum(r), len(r)] for p, r in zip(prompts, responses)], float)
        return {"sum": sums, "logp": np.zeros(len(prompts)),
                "tokens": np.array([len(r) for r in responses])}

    monkeypatch.setattr(pair_features, "shared_prompt_features", fake)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"prompt_ids": [list(rng.integers(0, 99, 3)) for _ in range(150)],
                          "chosen_ids": [list(rng.integers(0, 99, 2)) for _ in range(150)],
                          "rejected_ids": [list(rng.integers(0, 99, 4)) for _ in range(150)]})
    loaded = SimpleNamespace(fingerprint="fake")
    small = report.pair_response_features(
        loaded, SimpleNamespace(frame=frame.iloc[:100]), progress=False, cache_dir=tmp_path)
    assert calls == [64, 36]
    large = report.pair_response_features(loaded, SimpleNamespace(frame=frame), progress=False,
                                          cache_dir=tmp_path)
    assert calls == [64, 36, 64, 22]
    for key in small:
        assert np.array_equal(large[key][:100], small[key])
    expected = [sum(p) + sum(c) for p, c in zip(frame.prompt_ids, frame.chosen_ids)]
    assert large["chosen_sum"][:, 0].tolist() == expected
    assert large["rejected_tokens"].tolist() == [4] * 150


def _self_contained(page: str) -> None:
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page and "url(" not in page
    sources = re.findall(r"""src\s*=\s*["']([^"']*)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


@pytest.mark.parametrize("pairs", [False, True], ids=["behaviors", "pairs"])
def test_report_is_self_contained_with_its_tables(monkeypatch, tmp_path, pairs):
    files = _fake_run(monkeypatch, tmp_path, pairs=pairs)
    names = sorted(p.name for p in files)
    expected = {"preflight.html", "preflight.json", "preflight_behaviors.csv",
                "preflight_behaviors.parquet", "preflight_curves.parquet",
                "preflight_reweighting.parquet", "preflight_reweighting_summary.csv"}
    if pairs:
        expected |= {"preflight_ches.csv", "preflight_ches.parquet", "preflight_clusters.csv"}
    assert set(names) == expected
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == names  # nothing else, no temporaries
    page = (out / "preflight.html").read_text(encoding="utf-8")
    _self_contained(page)
    assert ("Does not apply" in page) != pairs
    table = pd.read_csv(out / "preflight_behaviors.csv")
    assert len(table) == 3 and abs(table["suggested_weight"].sum() - 1) < CLOSED_FORM
    if pairs:
        ches = pd.read_csv(out / "preflight_ches.csv")
        assert ches["rank"].tolist() == list(range(1, 49))
        assert ches["ches"].is_monotonic_decreasing
        clusters = pd.read_csv(out / "preflight_clusters.csv")
        assert clusters.groupby("cluster")["pairs"].first().sum() == 48
        assert clusters["prompt"].str.fullmatch(r"question \d+").all()
        # pair i was drawn along axis i mod 3: a cluster's examples share it
        axis = clusters["prompt"].str.split().str[1].astype(int) % 3
        assert (axis.groupby(clusters["cluster"]).nunique() == 1).all()


def test_a_failing_run_leaves_no_partial_report(monkeypatch, tmp_path):
    from llm_probes.preflight import report

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(report, "render_html", broken)
    with pytest.raises(RuntimeError):
        _fake_run(monkeypatch, tmp_path)
    out = tmp_path / "out"
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("argv,option", [
    ([], "--behaviors"),
    (["--behaviors", "a,b", "--pairs", "p.jsonl"], "--behaviors"),
    (["--behaviors", "a,b", "--clusters", "3"], "--clusters"),
    (["--pairs", "p.jsonl", "--max-statements", "8"], "--max-statements"),
    (["--behaviors", "a,b", "--objective", "rlhf"], "--objective"),
    (["--behaviors", "a,b", "--beta", "0"], "--beta"),
    (["--behaviors", "a,b", "--lr", "-1"], "--lr"),
    (["--behaviors", "a,b", "--lr", "fast"], "--lr"),
    (["--behaviors", "a,b", "--steps", "1"], "--steps"),
    (["--behaviors", "a,b", "--seeds", "1"], "--seeds"),
    (["--behaviors", "a,b", "--max-statements", "2"], "--max-statements"),
    (["--behaviors", "a,b", "--eval-every", "150"], "--eval-every"),
    (["--pairs", "p.jsonl", "--clusters", "1"], "--clusters"),
])
def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, argv, option):
    from dynamics.cli import main

    out = tmp_path / "out"
    assert main(["preflight", *argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"prefdyn: error: {option} ") and "\n" not in err
    assert not out.exists()


def test_persona_refusals_come_before_the_model(tmp_path, capsys, monkeypatch):
    """One behavior, an unknown one, a persona directory that does not exist: one line,
    exit 2, before any model is loaded or anything written."""
    import json

    from dynamics.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("llm_probes.model.load_model", no_model)
    persona = tmp_path / "persona"
    persona.mkdir()
    for name in ("alpha", "beta"):
        lines = [json.dumps({"question": f"Is {name} {i}?", "statement": f"{name} {i}",
                             "answer_matching_behavior": " Yes" if i % 2 else " No"})
                 for i in range(8)]
        (persona / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    for argv, start in ((["--behaviors", "alpha"], "--behaviors = 'alpha' must name at least"),
                        (["--behaviors", "alpha,gamma"], "--behaviors"),
                        (["--behaviors", "alpha,beta", "--persona-dir", str(tmp_path / "no")],
                         "--persona-dir")):
        if "--persona-dir" not in argv:
            argv = [*argv, "--persona-dir", str(persona)]
        assert main(["preflight", *argv, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"prefdyn: error: {start}") and "\n" not in err, err
    assert not out.exists()


def test_refusals_that_read_the_data_come_before_the_model(tmp_path, capsys):
    """A malformed pairs file, or more clusters than a quarter of the pairs, is refused
    (exit 2, one line) before any model is loaded or anything written."""
    import gzip
    import json

    from dynamics.cli import main

    good = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}
    path = tmp_path / "p.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join([json.dumps(good)] * 8 + ["{not json"]) + "\n")
    out = tmp_path / "out"
    assert main(["preflight", "--pairs", str(path), "--out", str(out), "--quiet"]) == 2
    assert "p.jsonl.gz:9" in capsys.readouterr().err
    assert main(["preflight", "--pairs", str(path), "--skip-bad", "--clusters", "3",
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefdyn: error: --clusters = 3 must be <= 2") and not out.exists()


# ------------------------------------------------------------------ the real model
@pytest.mark.llm
def test_pair_features_are_cached_and_ches_matches_the_model(loaded_model, tmp_path,
                                                              monkeypatch):
    """Real pairs: the cached sums (the prompt read once per pair) equal
    response_features' own (one sequence per response); a second call reads
    the cache (the model is not run); CHES from them equals Definition 2 by hand."""
    from llm_fixtures import REPO_ROOT

    from llm_probes import pair_features
    from llm_probes.pairs import load_pairs, tokenize_pairs
    from llm_probes.preflight import report

    source = REPO_ROOT.parent / "shared" / "data" / "hh-rlhf" / PAIRS
    if not source.exists():
        pytest.skip(f"{source} not found")
    pairs = load_pairs(source, skip_bad=True, max_pairs=6)
    tok = tokenize_pairs(pairs, loaded_model.tokenizer, max_prompt_tokens=48,
                         max_response_tokens=12, skip_bad=True)
    cache = tmp_path / "cache"
    first = report.pair_response_features(loaded_model, tok, progress=False, cache_dir=cache)
    f = tok.frame
    direct = pair_features.response_features(loaded_model, list(f.prompt_ids),
                                             list(f.chosen_ids))
    # float32 states summed over a dozen tokens, computed in another batch layout (the
    # prompt read once): equal to float32 rounding of the row's largest entry
    assert_close(first["chosen_sum"], direct["sum"], 1e-5,
                 scale=np.abs(direct["sum"]).max(axis=1, keepdims=True))

    def refuse(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(pair_features, "shared_prompt_features", refuse)
    again = report.pair_response_features(loaded_model, tok, progress=False, cache_dir=cache)
    for key in first:
        assert np.array_equal(first[key], again[key])
    table = core.ches_table(first["chosen_sum"], first["rejected_sum"],
                            first["chosen_tokens"], first["rejected_tokens"])
    sw, sl = torch.as_tensor(first["chosen_sum"]), torch.as_tensor(first["rejected_sum"])
    by_hand = (sw * sl).sum(1) - (sw * sw).sum(1)
    assert_close(table.sort_values("pair")["ches"], by_hand, CLOSED_FORM)


@pytest.mark.llm
def test_persona_report_on_the_real_model(loaded_model, persona_root, tmp_path, monkeypatch):
    """Two behaviors × 8 statements end to end (the loaded model is reused): the
    page is self-contained, and the predicted rates equal ⟨m_i, m⟩ computed here from
    the model's own g(x)."""
    from llm_probes import final_hidden, load_statements, prompt_batch
    from llm_probes.preflight import main

    monkeypatch.setattr("llm_probes.model.load_model", lambda *a, **k: loaded_model)
    names = ["agreeableness", "desire-for-acquiring-power"]
    args = _args(tmp_path, "--behaviors", ",".join(names), "--persona-dir", str(persona_root),
                 "--max-statements", "8", "--steps", "10", "--seeds", "2", "--device", "cpu")
    assert main(args) == 0
    out = tmp_path / "out"
    _self_contained((out / "preflight.html").read_text(encoding="utf-8"))
    table = pd.read_csv(out / "preflight_behaviors.csv")
    statements = load_statements(persona_root, names, max_per_behavior=8, seed=0)
    batch = prompt_batch(loaded_model, list(statements["question"]))
    with torch.inference_mode():
        g = final_hidden(loaded_model, batch["input_ids"], batch["attention_mask"]).double()
    s = torch.as_tensor(statements["sign"].to_numpy(np.float64))
    m = torch.stack([(s[:, None] * g)[torch.as_tensor(
        (statements["behavior"] == n).to_numpy().copy())].mean(0) for n in names])  # (2, d)
    rates = (m @ m.mean(0)).numpy()
    assert_close(table["rate"], rates, 1e-3)  # float32 features, left-padded batch
    assert table["gap"].max() < 1e-2
