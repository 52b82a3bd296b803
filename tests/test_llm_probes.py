"""The ``features`` and ``last-layer`` probes on the real model (issue 4).

Real-model tests (``@pytest.mark.llm``) use 2 behaviors × 64 statements; the
features are extracted once per module into the session's model cache, so the
CLI runs afterwards read them back. Fast tests (no model) check the pieces that
need none: Spearman's bootstrap, the reduced reference, the CLI's errors and that
building the ``prefdyn`` parser imports no transformers.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sstats

from conftest import CLOSED_FORM, assert_close
from llm_fixtures import llm_cache_dir, loaded_model, persona_root  # noqa: F401

BEHAVIORS = ["agreeableness", "narcissism"]
STATEMENTS = 64  # per behavior
CACHE_STATEMENTS = 12  # extracted again into a fresh cache, in chunks of CHUNK
CHUNK = 4
LM_HEAD_CHECK = 4  # statements of the lm_head identity check
DIRECT = 4  # statements compared with an un-batched forward

# Named tolerances of these tests (candidates for conftest.py):
LEFT_PADDING = 1e-4
"""Features of a prompt inside a left-padded batch against the prompt alone, relative
to the feature's largest entry: float32 attention and matmuls over a different
number of (masked) keys; THEORY §5 measured ~1.5e-5 absolute (entries up to ~20)."""
LM_HEAD_IDENTITY = 1e-4
"""max |lm_head(g) − logits at the last position| (issue 4: the identity to 1e-4)."""


def _prefdyn(*argv):
    from dynamics.cli import main

    return main([str(a) for a in argv])


# ------------------------------------------------------------------- no model needed
def test_spearman_matches_scipy_and_bootstrap_brackets_rho():
    from llm_probes.last_layer import spearman_ci

    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    y = x + rng.normal(size=12)
    result = spearman_ci(x, y, n_boot=500, seed=1)
    assert_close(result["rho"], sstats.spearmanr(x, y).statistic, CLOSED_FORM)
    assert result["ci_low"] <= result["rho"] <= result["ci_high"]
    monotone = spearman_ci(x, 3 * x + 1, n_boot=200, seed=1)
    assert monotone["rho"] == monotone["ci_low"] == monotone["ci_high"] == 1.0
    two = spearman_ci([1.0, 2.0], [3.0, 1.0], n_boot=200)
    assert two["rho"] == -1.0 and math.isnan(two["ci_low"])


def test_reference_rows_keep_yes_no_first_and_report_the_left_out_mass():
    from llm_probes.last_layer import reference_rows

    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(50, 6, generator=gen)
    x = torch.randn(9, 6, generator=gen).double()
    full, none_missing = reference_rows(x, w0, None)
    assert np.array_equal(full, w0.double().numpy()) and not none_missing.any()
    ref, missing = reference_rows(x, w0, 5)
    assert ref.shape == (7, 6)
    assert np.array_equal(ref[:2], w0[:2].double().numpy())
    probs = torch.softmax(x @ w0.double().T, dim=-1).numpy()
    rows = [int(np.flatnonzero((w0.double().numpy() == r).all(1))[0]) for r in ref]
    assert_close(missing, 1 - probs[:, rows].sum(1), CLOSED_FORM)


def _naive_limit(x: np.ndarray, beta: float) -> float:
    """4/(β² λ_max) of the second-moment matrix, by numpy (the reference)."""
    return 4.0 / (beta**2 * np.linalg.eigvalsh(x.T @ x / len(x))[-1])


@pytest.mark.parametrize("beta, fraction", [(1.0, 0.5), (0.5, 0.9), (2.0, 0.1)])
def test_auto_lr_is_the_fraction_of_the_smallest_stability_limit(beta, fraction):
    from llm_probes.last_layer import choose_lr, stability_limits

    rng = np.random.default_rng(3)
    n, d = 40, 6  # two behaviors of 20; raw-feature-like: a large shared mean
    x = rng.normal(size=(n, d)) + 5.0
    x[20:] *= 1.5  # the second behavior's limit is the smaller
    behavior = np.repeat([0, 1], 20)
    train = rng.random(n) < 0.8
    limits = stability_limits(torch.from_numpy(x), behavior, train, ["a", "b"], beta=beta,
                              together=True)
    expected = {"a": _naive_limit(x[train & (behavior == 0)], beta),
                "b": _naive_limit(x[train & (behavior == 1)], beta),
                "(together)": _naive_limit(x[train], beta)}
    assert limits.keys() == expected.keys()
    for key, value in expected.items():
        assert_close(limits[key], value, CLOSED_FORM, scale=value, err_msg=key)
    lr = choose_lr("auto", limits, fraction=fraction)
    assert_close(lr, fraction * min(expected.values()), CLOSED_FORM, scale=lr)
    assert min(limits, key=limits.get) == "b"
    below = 0.99 * limits["b"]
    assert choose_lr(below, limits) == below  # a given lr below every limit is kept


def test_a_given_lr_at_or_above_the_limit_is_refused_with_the_auto_hint():
    from llm_probes.last_layer import choose_lr
    from synthetic.validation import ParameterError

    limits = {"a": 2e-3, "b": 1e-3}
    for lr in (1e-3, 1.5e-3, 1.0):
        with pytest.raises(ParameterError) as info:
            choose_lr(lr, limits, hint="lower --lr")
        message = str(info.value)
        assert message.startswith("--lr = ") and "\n" not in message
        assert "0.001 on 'b'" in message and "lower --lr, or use --lr auto" in message
    with pytest.raises(ParameterError, match="--lr-fraction = 1.0 must be < 1"):
        choose_lr("auto", limits, fraction=1.0)


@pytest.mark.parametrize("value, parsed", [("auto", "auto"), (" Auto", "auto"),
                                           ("1e-3", 1e-3), (0.01, 0.01), (2, 2.0)])
def test_parse_lr_accepts_auto_and_positive_numbers(value, parsed):
    from llm_probes.last_layer import parse_lr

    assert parse_lr("--lr", value) == parsed


@pytest.mark.parametrize("value, rule", [("fast", "must be a number > 0 or auto"),
                                         ("0", "must be > 0, or be auto"),
                                         ("-1e-3", "must be > 0, or be auto"),
                                         ("nan", "must be finite, or be auto"),
                                         ("inf", "must be finite, or be auto"),
                                         (True, "must be a number, or be auto")])
def test_parse_lr_refuses_anything_else_in_one_line(value, rule):
    from llm_probes.last_layer import parse_lr
    from synthetic.validation import ParameterError

    with pytest.raises(ParameterError) as info:
        parse_lr("--lr", value)
    assert str(info.value).startswith("--lr = ") and str(info.value).endswith(rule)


def test_building_the_prefdyn_parser_imports_no_probe_module(monkeypatch):
    import importlib

    import llm_probes.cli as probe_cli
    from dynamics.cli import _parser

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(probe_cli.importlib, "import_module",
                        lambda name, *a: imported.append(name) or real(name, *a))
    parser = _parser()  # what `prefdyn demo` builds
    assert imported == []  # so no transformers either (llm_probes.cli imports neither)
    args = parser.parse_args(["probe", "features", "--behaviors", "a", "--out", "x"])
    assert imported == ["llm_probes.features"] and args.prompt_format == "chat"


@pytest.mark.cli
def test_cli_bad_input_is_one_line_and_exit_2(persona_root, tmp_path, capsys):  # noqa: F811
    missing = tmp_path / "no-such-dir"
    assert _prefdyn("probe", "features", "--behaviors", "agreeableness", "--out", tmp_path,
                    "--persona-dir", missing) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefdyn: error: --persona-dir") and "\n" not in err
    assert "does not exist" in err

    assert _prefdyn("probe", "last-layer", "--behaviors", "agreeablenes,narcissism",
                    "--out", tmp_path, "--persona-dir", persona_root) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefdyn: error: --behaviors") and "\n" not in err
    assert "'agreeablenes'" in err and "agreeableness" in err  # the close name is listed

    with pytest.raises(SystemExit) as exit_info:  # an unknown probe: argparse's choices
        _prefdyn("probe", "featurez", "--behaviors", "x", "--out", tmp_path)
    assert exit_info.value.code == 2
    assert "invalid choice: 'featurez'" in capsys.readouterr().err


@pytest.mark.cli
@pytest.mark.parametrize("probe, option, value, rule", [
    ("finetune", "--lr", "-1", "> 0"),
    ("finetune", "--steps", "0", ">= 1"),
    ("misalignment", "--align-steps", "0", ">= 1"),
    ("displacement", "--top-k", "0", ">= 1"),
    ("last-layer", "--beta", "0", "> 0"),
    ("last-layer", "--lr", "fast", "must be a number > 0 or auto"),
    ("last-layer", "--lr", "-1", "> 0, or be auto"),
    ("last-layer", "--lr-fraction", "1", "must be < 1"),
    ("last-layer", "--lr-fraction", "0", "must be > 0"),
    ("features", "--max-statements", "2", ">= 4"),
])
def test_cli_bad_probe_option(persona_root, tmp_path, capsys, probe, option, value,  # noqa: F811
                              rule):
    """A bad option value: one line naming the option, the value and the rule, exit 2,
    before any model is loaded, nothing written."""
    out = tmp_path / "out"
    assert _prefdyn("probe", probe, "--behaviors", "agreeableness", "--out", out,
                    "--persona-dir", persona_root, option, value) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"prefdyn: error: {option}") and "\n" not in err
    assert value in err and rule in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.cli
def test_cli_lr_fraction_with_a_given_lr_is_refused(persona_root, tmp_path,  # noqa: F811
                                                    capsys):
    out = tmp_path / "out"
    assert _prefdyn("probe", "last-layer", "--behaviors", "agreeableness", "--out", out,
                    "--persona-dir", persona_root, "--lr", "1e-3", "--lr-fraction",
                    "0.3") == 2
    err = capsys.readouterr().err.strip()
    assert err == ("prefdyn: error: --lr-fraction = 0.3 applies only with --lr auto, "
                   "not --lr 0.001")
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def statements(persona_root):  # noqa: F811
    from llm_probes.persona import load_statements

    return load_statements(persona_root, BEHAVIORS, max_per_behavior=STATEMENTS)


@pytest.fixture(scope="module")
def feature_cache(llm_cache_dir):  # noqa: F811
    """The features cache of the session's model cache (where the CLI looks too)."""
    return llm_cache_dir / "features"


class _Counter:
    """Wraps llm_probes.model.final_hidden, counting the prompts it is given."""

    def __init__(self, function):
        self.function, self.prompts = function, 0

    def __call__(self, loaded, input_ids, *args, **kwargs):
        self.prompts += input_ids.shape[0]
        return self.function(loaded, input_ids, *args, **kwargs)


@pytest.fixture(scope="module")
def features(loaded_model, statements, feature_cache):  # noqa: F811
    from llm_probes.features import statement_features

    return statement_features(loaded_model, statements, cache_dir=feature_cache,
                              progress=False)


@pytest.mark.llm
def test_extraction_matches_an_unbatched_forward(loaded_model, statements,  # noqa: F811
                                                 features):
    from llm_probes.model import final_hidden, prompt_batch

    assert features.shape == (len(statements), loaded_model.model.config.hidden_size)
    assert features.dtype == torch.float32 and torch.isfinite(features).all()
    lengths = statements["question"].str.len().to_numpy()
    picks = np.unique(np.r_[np.argsort(lengths)[[0, -1]],
                            np.linspace(0, len(statements) - 1, DIRECT - 2).astype(int)])
    for i in picks:
        alone = prompt_batch(loaded_model, [statements["question"].iloc[i]])
        with torch.inference_mode():
            g = final_hidden(loaded_model, alone["input_ids"], alone["attention_mask"])[0]
        assert_close(features[i], g, LEFT_PADDING, scale=g.abs().max(),
                     err_msg=f"statement {i} in a left-padded batch")


@pytest.mark.llm
def test_cache_is_reused_and_a_deleted_chunk_is_recomputed(
        loaded_model, statements, features, tmp_path, monkeypatch):  # noqa: F811
    import llm_probes.model as api
    from llm_probes.features import extract_features, feature_key

    subset = statements.iloc[:CACHE_STATEMENTS]
    counter = _Counter(api.final_hidden)
    monkeypatch.setattr(api, "final_hidden", counter)
    first = extract_features(loaded_model, subset, cache_dir=tmp_path, progress=False,
                             chunk_size=CHUNK, batch_size=CHUNK)
    assert counter.prompts == CACHE_STATEMENTS
    assert_close(first, features[:CACHE_STATEMENTS], LEFT_PADDING,
                 scale=features[:CACHE_STATEMENTS].abs().max())

    counter.prompts = 0
    assert torch.equal(extract_features(loaded_model, subset, cache_dir=tmp_path,
                                        progress=False), first)
    assert counter.prompts == 0  # every chunk read back, no forward

    directory = tmp_path / feature_key(loaded_model, list(subset["question"]), "chat")
    chunks = sorted(directory.glob("chunk-*.npy"))
    assert len(chunks) == CACHE_STATEMENTS // CHUNK
    victim = chunks[1]
    victim.unlink()  # as if the extraction had been interrupted before this chunk
    completed = extract_features(loaded_model, subset, cache_dir=tmp_path, progress=False)
    assert counter.prompts == CHUNK  # only the missing chunk was computed
    assert victim.exists()
    assert torch.equal(completed, first)  # same chunk, same batch: bit-identical


@pytest.mark.llm
def test_an_interrupted_extraction_keeps_its_finished_chunks(
        loaded_model, statements, features, tmp_path, monkeypatch):  # noqa: F811
    """Ctrl-C during the third chunk: the two finished chunks stay on disk, nothing
    half-written is left, and the same call again computes only what is missing."""
    import llm_probes.model as api
    from llm_probes.features import extract_features, feature_key

    subset = statements.iloc[:CACHE_STATEMENTS]
    counter = _Counter(api.final_hidden)

    def interrupted(loaded, input_ids, *args, **kwargs):
        if counter.prompts >= 2 * CHUNK:
            raise KeyboardInterrupt
        return counter(loaded, input_ids, *args, **kwargs)

    monkeypatch.setattr(api, "final_hidden", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_features(loaded_model, subset, cache_dir=tmp_path, progress=False,
                         chunk_size=CHUNK, batch_size=CHUNK)
    directory = tmp_path / feature_key(loaded_model, list(subset["question"]), "chat")
    assert len(list(directory.glob("chunk-*.npy"))) == 2
    assert not list(directory.glob(".*tmp"))
    monkeypatch.setattr(api, "final_hidden", counter)
    resumed = extract_features(loaded_model, subset, cache_dir=tmp_path, progress=False,
                               chunk_size=CHUNK, batch_size=CHUNK)
    assert counter.prompts == CACHE_STATEMENTS  # 2 chunks before, the rest now
    assert_close(resumed, features[:CACHE_STATEMENTS], LEFT_PADDING,
                 scale=features[:CACHE_STATEMENTS].abs().max())


@pytest.mark.llm
def test_lm_head_of_g_is_the_models_logits(loaded_model, statements):  # noqa: F811
    from llm_probes.features import check_lm_head

    assert check_lm_head(loaded_model, statements, LM_HEAD_CHECK) <= LM_HEAD_IDENTITY


@pytest.fixture(scope="module")
def train_data(loaded_model, statements, features):  # noqa: F811
    """Train features (float64), signs and the reference rows of the first behavior."""
    from llm_probes.features import answer_rows

    mask = ((statements["behavior"] == BEHAVIORS[0]) & (statements["split"] == "train"))
    x = features[torch.from_numpy(mask.to_numpy().copy())].double()
    s = statements.loc[mask, "sign"].to_numpy().astype(np.float64)
    return x, s, answer_rows(loaded_model)


@pytest.mark.llm
def test_last_layer_dpo_starts_at_log2_and_its_first_step_is_exact(loaded_model, train_data):  # noqa: F811,E501
    from dynamics.bounds import first_step
    from llm_probes.last_layer import train

    x, s, w0 = train_data
    assert torch.equal(w0[0], loaded_model.lm_head.weight[loaded_model.yes_id].float())
    assert torch.equal(w0[1], loaded_model.lm_head.weight[loaded_model.no_id].float())
    beta, lr = 1.0, 1e-3
    result = train(x, s, np.zeros(len(s), dtype=np.int64), [BEHAVIORS[0]],
                   reference=w0.double().numpy(), beta=beta, lr=lr, steps=1,
                   keep_deltas=True)
    loss0 = result.per_behavior["loss"][0, 0, 0, 0]
    assert_close(loss0, math.log(2), CLOSED_FORM)  # the policy is the reference: h = 0
    assert_close(result.per_behavior["reward_accuracy"][0, 0, 0, 0], 0.5, CLOSED_FORM)
    assert_close(result.deltas[1, 0, 0], first_step(x, s, beta=beta, lr=lr), CLOSED_FORM,
                 err_msg="Δ after one step")


@pytest.mark.llm
@pytest.mark.cli
def test_cli_features_and_last_layer_end_to_end(loaded_model, persona_root,  # noqa: F811
                                                llm_cache_dir, features, tmp_path,  # noqa: F811
                                                monkeypatch):
    import llm_probes.model as api

    monkeypatch.setenv("PREFDYN_CACHE", str(llm_cache_dir))  # the features cached above
    monkeypatch.setattr(api, "load_model", lambda *a, **k: loaded_model)  # load once
    common = ["--behaviors", ",".join(BEHAVIORS), "--max-statements", STATEMENTS,
              "--persona-dir", persona_root, "--quiet"]
    out = tmp_path / "features"
    assert _prefdyn("probe", "features", "--out", out, "--check-statements", LM_HEAD_CHECK,
                    *common) == 0
    stats = pd.read_parquet(out / "features_stats.parquet")
    assert list(stats["behavior"]) == BEHAVIORS
    assert (stats["distinguishability"] > 0).all() and (stats["n_train"] > 0).all()
    for name in ("features_summary.json", "probe_features.png", "probe_features.pdf",
                 "probe_features.json"):
        assert (out / name).is_file(), name

    out = tmp_path / "last-layer"
    assert _prefdyn("probe", "last-layer", "--out", out, "--steps", 40, "--eval-every", 10,
                    "--together", "--bootstrap", 50, *common) == 0
    curves = pd.read_parquet(out / "last_layer.parquet")
    assert set(curves["source"]) == {"theory", "measured"}
    assert set(curves["mode"]) == {"separate", "together"}
    start = curves[curves["step"] == 0]
    assert_close(start["loss"].to_numpy(), np.full(len(start), math.log(2)), CLOSED_FORM)
    speeds = pd.read_parquet(out / "last_layer_speed.parquet")
    assert list(speeds["behavior"]) == BEHAVIORS and (speeds["loss_drop"] > 0).all()
    summary = pd.read_parquet(out / "last_layer_summary.parquet")
    assert summary["primary"].sum() == 1
    for name in ("last_layer_priority.parquet", "last_layer_summary.json",
                 "probe_last_layer.png", "probe_last_layer_together.png",
                 "probe_last_layer.json"):
        assert (out / name).is_file(), name

    # a step above the stability limit of raw features is refused, in one line
    assert _prefdyn("probe", "last-layer", "--out", out, "--lr", 1.0, *common) == 2


@pytest.mark.llm
@pytest.mark.cli
def test_cli_last_layer_lr_auto_trains_below_the_limit(loaded_model, persona_root,  # noqa: F811
                                                       llm_cache_dir, features,  # noqa: F811
                                                       train_data, tmp_path, monkeypatch,
                                                       capsys):
    """``--lr auto``: the step is 0.5 of the smallest measured limit, recorded and
    printed, and full-batch descent at it lowers every behavior's loss at every step;
    a given step just above that limit is still refused, suggesting ``--lr auto``."""
    import json

    import llm_probes.model as api

    monkeypatch.setenv("PREFDYN_CACHE", str(llm_cache_dir))  # the features cached above
    monkeypatch.setattr(api, "load_model", lambda *a, **k: loaded_model)
    common = ["--behaviors", ",".join(BEHAVIORS), "--max-statements", STATEMENTS,
              "--persona-dir", persona_root, "--bootstrap", 20]
    out = tmp_path / "auto"
    assert _prefdyn("probe", "last-layer", "--out", out, "--lr", "auto", "--steps", 20,
                    "--eval-every", 5, "--together", *common) == 0
    err = capsys.readouterr().err
    assert "lr = auto: 0.5 × 4/(β² λ_max) = 0.5 × " in err
    record = json.loads((out / "last_layer_summary.json").read_text())
    limits = record["stability_limit_lr"]
    assert set(limits) == {*BEHAVIORS, "(together)"}
    x, _, _ = train_data  # the first behavior's raw train features, by numpy
    assert_close(limits[BEHAVIORS[0]], _naive_limit(x.numpy(), 1.0), CLOSED_FORM,
                 scale=limits[BEHAVIORS[0]])
    smallest = min(limits.values())
    assert record["lr_rule"] == "auto" and record["stability_limit_min"] == smallest
    assert_close(record["lr"], 0.5 * smallest, CLOSED_FORM, scale=smallest)
    assert record["lr"] < smallest
    options = json.loads((out / "probe_last_layer.json").read_text())["options"]
    assert options["lr"] == "auto" and options["lr_fraction"] is None
    summary = pd.read_parquet(out / "last_layer_summary.parquet")
    assert (summary["lr"] == record["lr"]).all()
    curves = pd.read_parquet(out / "last_layer.parquet")
    separate = curves[(curves["source"] == "measured") & (curves["mode"] == "separate")]
    for behavior, curve in separate.groupby("behavior", observed=True):
        loss = curve.sort_values("step")["loss"].to_numpy()
        assert (np.diff(loss) < 0).all() and loss[-1] < math.log(2), behavior
    print(f"lr auto = {record['lr']:.4g}; limits {limits}")

    refused = tmp_path / "refused"
    assert _prefdyn("probe", "last-layer", "--out", refused, "--lr", 1.01 * smallest,
                    "--steps", 20, "--together", *common, "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefdyn: error: --lr = ") and "\n" not in err
    assert "or use --lr auto" in err and f"{smallest:.3g}" in err
    assert not any(refused.iterdir())  # nothing written
