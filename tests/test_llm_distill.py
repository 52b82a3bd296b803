"""The ``distill`` probe: context distillation on the real model (issue 13, experiment 3).

Fast tests (no model) check the pure pieces against naive NumPy references in
float64 — the KL over {Yes, No}, the surviving fraction — the last-layer training's
limits on synthetic features (no prompt effect: nothing moves; a constant shift of
the gap with a constant feature: absorbed exactly), and the bad input that needs no
model. Real-model tests (``@pytest.mark.llm``) run the probe on 2 behaviors × 10
statements (16 train, 4 held out), in both modes, and the bad preambles that need
the tokenizer.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import CLOSED_FORM, FINITE_DIFFERENCE, assert_close
from llm_fixtures import llm_cache_dir, loaded_model, persona_root  # noqa: F401

BEHAVIORS = ["agreeableness", "narcissism"]
STATEMENTS = 10  # per behavior: 8 train, 2 held out
GD_CONVERGED = 1e-6
"""Gradient descent on a convex loss run long past its time scale, against the exact
minimiser (the residual decays geometrically; measured ~1e-12 at these sizes)."""
HELD_OUT_MARGIN = 0.5
"""The held-out KL after training must be below this fraction of the KL before."""


def _prefdyn(*argv):
    from dynamics.cli import main

    return main([str(a) for a in argv])


def _naive_kl(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """KL(Bernoulli(p_T) ‖ Bernoulli(p_S)), p = P(Yes) among {Yes, No}, term by term."""
    p = 1.0 / (1.0 + np.exp(-(teacher[:, 0] - teacher[:, 1])))
    q = 1.0 / (1.0 + np.exp(-(student[:, 0] - student[:, 1])))
    return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


# ------------------------------------------------------------------- no model needed
def test_answer_kl_is_the_renormalised_kl_over_yes_and_no():
    from llm_probes.distill import answer_kl

    rng = np.random.default_rng(0)
    teacher, student = rng.normal(scale=3, size=(64, 2)), rng.normal(scale=3, size=(64, 2))
    kl = answer_kl(torch.tensor(teacher), torch.tensor(student)).numpy()
    assert kl.shape == (64,)
    assert_close(kl, _naive_kl(teacher, student), CLOSED_FORM)
    # log-probabilities over a larger vocabulary differ from the logits by a per-row
    # constant: the renormalisation removes it
    shift = rng.normal(scale=10, size=(64, 1))
    shifted = answer_kl(torch.tensor(teacher + shift), torch.tensor(student - 2 * shift))
    assert_close(shifted.numpy(), kl, CLOSED_FORM)
    assert (kl >= 0).all()
    assert answer_kl(torch.tensor(teacher), torch.tensor(teacher)).abs().max() == 0


def test_answer_kl_gradient_is_student_minus_teacher_probabilities():
    from llm_probes.distill import answer_kl

    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(16, 2, generator=gen, dtype=torch.float64)
    student = torch.randn(16, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(answer_kl(teacher, student).sum(), student)
    assert_close(grad, torch.softmax(student, -1) - torch.softmax(teacher, -1), CLOSED_FORM)
    eps = 1e-7  # one-sided difference quotient of the first statement's Yes logit
    moved = student.detach().clone()
    moved[0, 0] += eps
    quotient = (answer_kl(teacher, moved) - answer_kl(teacher, student)).sum() / eps
    assert_close(quotient.detach(), grad[0, 0], FINITE_DIFFERENCE)


def test_surviving_fraction_against_naive_formulas():
    from llm_probes.distill import surviving_fraction

    rng = np.random.default_rng(2)
    base, prompted = rng.normal(size=20), rng.normal(size=20) - 1.0
    student = base + 0.3 * (prompted - base)  # 30% of the effect on every statement
    result = surviving_fraction(base, prompted, student)
    assert_close(result["survived"], 0.3, CLOSED_FORM)
    assert_close(result["survived_ls"], 0.3, CLOSED_FORM)
    assert result["sign_agreement"] == 1.0
    student = rng.normal(size=20)
    result = surviving_fraction(base, prompted, student)
    dp, ds = prompted - base, student - base
    assert_close(result["effect_prompted"], np.mean(prompted) - np.mean(base), CLOSED_FORM)
    assert_close(result["survived"], (np.mean(student) - np.mean(base))
                 / (np.mean(prompted) - np.mean(base)), CLOSED_FORM)
    assert_close(result["survived_ls"], np.dot(ds, dp) / np.dot(dp, dp), CLOSED_FORM)
    assert result["sign_agreement"] == np.mean(np.sign(ds) == np.sign(dp))
    none = surviving_fraction(base, base, student)  # a prompt that changes nothing
    assert math.isnan(none["survived"]) and math.isnan(none["survived_ls"])
    assert none["effect_prompted"] == 0 and math.isnan(none["sign_agreement"])


def _synthetic(seed: int, n: int = 40, d: int = 6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[:, 0] = 1.0  # a constant feature
    rows = torch.randn(2, d, generator=gen, dtype=torch.float64)
    return x, rows


def test_last_layer_without_a_prompt_effect_moves_nothing():
    """Teacher = the student's own start: KL 0 and gradient 0 at every step (up to
    rounding: log_softmax's gradient sums π_T, which is 1 up to an ulp)."""
    from llm_probes.distill import answer_kl, train_last_layer

    x, rows = _synthetic(3)
    teacher = x @ rows.T
    w, steps, logits = train_last_layer(x, teacher, rows, train=np.arange(30), lr=0.1,
                                        steps=5)
    assert list(steps) == [0, 1, 2, 3, 4, 5]
    assert_close(w, rows, CLOSED_FORM)  # the gradient π − π_T is 0 up to rounding
    assert_close(answer_kl(teacher, logits), torch.zeros(6, len(x)), CLOSED_FORM)


def test_last_layer_absorbs_a_constant_shift_through_a_constant_feature():
    """The synthetic distill's limit: a prompt that shifts every gap by c is matched
    exactly by a linear student with a constant feature (KL → 0, all of it survives)."""
    from llm_probes.distill import answer_kl, logit_gap, surviving_fraction, train_last_layer

    x, rows = _synthetic(4)
    c = -1.2
    teacher = x @ rows.T + torch.tensor([c, 0.0], dtype=torch.float64)
    train, test = np.arange(30), np.arange(30, 40)
    _, _, logits = train_last_layer(x, teacher, rows, train=train, lr=1.0, steps=3000,
                                    eval_every=3000)
    kl = answer_kl(teacher, logits)  # (E, N)
    assert kl[0].mean() > 0.01
    assert_close(kl[-1, test].numpy(), np.zeros(len(test)), GD_CONVERGED)
    gaps = [logit_gap(v)[test].numpy() for v in (x @ rows.T, teacher, logits[-1])]
    assert_close(surviving_fraction(*gaps)["survived"], 1.0, GD_CONVERGED)


def _args(**kwargs):
    base = dict(preamble=None, preamble_file=None)
    return SimpleNamespace(**{**base, **kwargs})


def test_resolve_preamble(tmp_path):
    from llm_probes.distill import DEFAULT_PREAMBLE, resolve_preamble
    from synthetic.validation import ParameterError

    assert resolve_preamble(_args()) == ("--preamble", DEFAULT_PREAMBLE)
    assert resolve_preamble(_args(preamble=" Be kind. ")) == ("--preamble", "Be kind.")
    file = tmp_path / "p.txt"
    file.write_text("Be honest.\n", encoding="utf-8")
    assert resolve_preamble(_args(preamble_file=file)) == ("--preamble-file", "Be honest.")
    file.write_bytes(b"caf\xe9\n")
    for args, option, rule in ((_args(preamble=" \n"), "--preamble", "non-empty"),
                               (_args(preamble_file=file), "--preamble-file", "UTF-8"),
                               (_args(preamble_file=tmp_path / "none"), "--preamble-file",
                                "cannot be read")):
        with pytest.raises(ParameterError) as info:
            resolve_preamble(args)
        assert info.value.name == option and rule in str(info.value)


class _CharTokenizer:
    """A stand-in tokenizer: one id per character of ``alphabet`` (else the unknown
    token 0), ``<s>`` special, and a decoder that drops the unknown token."""

    all_special_tokens = ["<s>"]
    unk_token_id = 0

    def __init__(self, alphabet: str):
        self.alphabet = alphabet

    def __call__(self, text, add_special_tokens=False):
        def encode(t):
            if "\x00" in t:
                raise ValueError("NUL")
            return [self.alphabet.index(ch) + 1 if ch in self.alphabet else 0 for ch in t]

        ids = [encode(t) for t in text] if isinstance(text, list) else encode(text)
        return {"input_ids": ids}

    def decode(self, ids):
        return "".join(self.alphabet[i - 1] for i in ids if i)


@pytest.mark.parametrize("preamble, rule", [
    ("Be kind\x00", "cannot be encoded by the tokenizer"),
    ("Be <s> kind", "special token '<s>'"),
    ("Be kind!", "encodes to the unknown token"),
])
def test_a_preamble_the_tokenizer_cannot_encode_is_refused(preamble, rule):
    from llm_probes.distill import check_preamble
    from synthetic.validation import ParameterError

    tokenizer = _CharTokenizer("abcdefghijklmnopqrstuvwxyzBAYN<>s?. \n:")
    check_preamble("Be kind.", tokenizer, ["a?"], prompt_format="plain", max_length=None)
    with pytest.raises(ParameterError) as info:
        check_preamble(preamble, tokenizer, ["a?"], prompt_format="plain", max_length=None)
    assert info.value.name == "--preamble" and rule in str(info.value)
    assert "\n" not in str(info.value)


def test_a_preamble_that_overflows_the_context_is_refused():
    from llm_probes.distill import SEPARATOR, check_preamble
    from llm_probes.model import INSTRUCTION
    from synthetic.validation import ParameterError

    tokenizer = _CharTokenizer("abcdefghijklmnopqrstuvwxyzABNY<>s?. \n:")
    questions = ["a?", "a longer question?"]
    prompt = f"Be kind.{SEPARATOR}{questions[1]}{INSTRUCTION}\nAnswer:"  # the plain format
    check_preamble("Be kind.", tokenizer, questions, prompt_format="plain",
                   max_length=len(prompt))
    with pytest.raises(ParameterError) as info:
        check_preamble("Be kind.", tokenizer, questions, prompt_format="plain",
                       max_length=len(prompt) - 1, option="--preamble-file")
    assert info.value.name == "--preamble-file"
    assert f"{len(prompt)} tokens long" in str(info.value)
    assert f"context of {len(prompt) - 1} tokens" in str(info.value)


@pytest.mark.cli
@pytest.mark.parametrize("option, value, rule", [
    ("--preamble", "   ", "must hold a non-empty preamble"),
    ("--preamble-file", "no-such-file.txt", "cannot be read"),
    ("--steps", "0", ">= 1"),
    ("--train-batch", "0", ">= 1"),
    ("--lr", "fast", "must be a number > 0 or auto"),
    ("--lr-fraction", "0.3", "applies only with --lr auto, not --lr 0.001"),
])
def test_cli_bad_distill_option(persona_root, tmp_path, capsys, option, value,  # noqa: F811
                                rule):
    """One line naming the option, exit 2, before the model is loaded, nothing written."""
    out = tmp_path / "out"
    if option == "--preamble-file":
        value = tmp_path / value
    assert _prefdyn("probe", "distill", "--behaviors", ",".join(BEHAVIORS), "--out", out,
                    "--persona-dir", persona_root, option, value) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"prefdyn: error: {option}") and "\n" not in err
    assert rule in err
    assert not out.exists()


@pytest.mark.cli
def test_cli_lr_auto_is_for_the_last_layer_only(persona_root, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert _prefdyn("probe", "distill", "--behaviors", BEHAVIORS[0], "--out", out,
                    "--persona-dir", persona_root, "--mode", "lora", "--lr", "auto") == 2
    err = capsys.readouterr().err.strip()
    assert "--lr = 'auto' applies to --mode last-layer only" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.cli
def test_cli_preamble_and_preamble_file_exclude_each_other(persona_root, tmp_path,  # noqa: F811
                                                           capsys):
    with pytest.raises(SystemExit) as info:
        _prefdyn("probe", "distill", "--behaviors", BEHAVIORS[0], "--out", tmp_path / "o",
                 "--persona-dir", persona_root, "--preamble", "Be kind.",
                 "--preamble-file", tmp_path / "p.txt")
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


# ------------------------------------------------------------------- the real model
@pytest.fixture
def cli(loaded_model, persona_root, llm_cache_dir, monkeypatch):  # noqa: F811
    """``prefdyn probe distill`` on the session's model (loaded once) and cache."""
    import llm_probes.model as api

    monkeypatch.setenv("PREFDYN_CACHE", str(llm_cache_dir))
    monkeypatch.setattr(api, "load_model", lambda *a, **k: loaded_model)

    def run(out, *options):
        return _prefdyn("probe", "distill", "--behaviors", ",".join(BEHAVIORS),
                        "--max-statements", STATEMENTS, "--persona-dir", persona_root,
                        "--out", out, "--quiet", *options)

    return run


def _check_outputs(out):
    """The reported KLs equal a naive recomputation from the saved pairs; returns the
    curves and the summary."""
    statements = pd.read_parquet(out / "distill_statements.parquet")
    summary = pd.read_parquet(out / "distill_summary.parquet")
    curves = pd.read_parquet(out / "distill.parquet")
    pairs = {k: statements[[f"{k}_yes", f"{k}_no"]].to_numpy() for k in
             ("base", "teacher", "student")}
    before = _naive_kl(pairs["teacher"], pairs["base"])
    after = _naive_kl(pairs["teacher"], pairs["student"])
    last = curves[curves["step"] == curves["step"].max()]
    for row in summary.itertuples():
        mask = ((statements["behavior"] == row.behavior) & (statements["split"] == row.split))
        assert row.n == mask.sum()
        assert_close(row.kl_before, before[mask].mean(), CLOSED_FORM)
        assert_close(row.kl_after, after[mask].mean(), CLOSED_FORM)
        curve = last[(last["behavior"] == row.behavior) & (last["split"] == row.split)]
        assert_close(curve["kl"].item(), row.kl_after, CLOSED_FORM)
    start = curves[curves["step"] == 0].set_index(["split", "behavior"])
    for row in summary.itertuples():
        assert_close(start.loc[(row.split, row.behavior), "kl"], row.kl_before, CLOSED_FORM)
    return curves, summary


@pytest.mark.llm
@pytest.mark.cli
def test_last_layer_distillation_on_the_real_model(cli, tmp_path):
    out = tmp_path / "last-layer"
    assert cli(out, "--steps", 30) == 0
    curves, summary = _check_outputs(out)
    test = summary[summary["split"] == "test"]
    assert len(test) == len(BEHAVIORS) and (test["n"] == 2).all()
    assert (test["kl_before"] > 0.01).all()  # the preamble moves the answers
    assert (test["kl_after"] < HELD_OUT_MARGIN * test["kl_before"]).all()
    assert (test["effect_prompted"] != 0).all() and (test["survived"] > 0.5).all()
    train = curves[curves["split"] == "train"].pivot_table(index="step", columns="behavior",
                                                           values="kl", observed=True)
    assert list(train.index) == list(range(31))  # every step recorded
    loss = train.mean(axis=1).to_numpy()  # the full-batch train loss
    assert (np.diff(loss) < 0).all()      # decreases at every step (below the stability limit)
    for name in ("distill_run.json", "probe_distill.json"):
        assert (out / name).is_file()
    run = json.loads((out / "distill_run.json").read_text())
    assert run["lr_rule"] == "given" and run["lr"] == 1e-3

    auto = tmp_path / "auto"  # --lr auto: a stated fraction of the measured limit
    assert cli(auto, "--steps", 3, "--lr", "auto", "--lr-fraction", 0.25) == 0
    run = json.loads((auto / "distill_run.json").read_text())
    assert run["lr_rule"] == "auto"
    assert run["lr"] == pytest.approx(0.25 * run["stability_limit_lr"], rel=1e-12)


@pytest.mark.llm
def test_real_features_without_a_prompt_effect_move_nothing(loaded_model,  # noqa: F811
                                                            persona_root):  # noqa: F811
    """Teacher = the student (the unprompted features): KL 0 and gradient 0."""
    from llm_probes.distill import answer_kl, train_last_layer
    from llm_probes.features import answer_rows, statement_features
    from llm_probes.persona import load_statements

    frame = load_statements(persona_root, BEHAVIORS[:1], max_per_behavior=4)
    x = statement_features(loaded_model, frame, progress=False).double()
    rows = answer_rows(loaded_model)[:2].double().requires_grad_(True)
    loss = answer_kl(x @ rows.detach().T, x @ rows.T).mean()
    (grad,) = torch.autograd.grad(loss, rows)
    # π − π_T is rounding only: log_softmax's gradient carries Σ π_T = 1 up to an ulp
    assert loss.item() == 0
    assert_close(grad, torch.zeros_like(grad), CLOSED_FORM)
    w, _, logits = train_last_layer(x, x @ rows.detach().T, rows.detach(),
                                    train=np.arange(len(x)), lr=1e-3, steps=3)
    assert_close(w, rows.detach(), CLOSED_FORM)
    assert_close(answer_kl(x @ rows.detach().T, logits), torch.zeros(4, len(x)), CLOSED_FORM)


@pytest.mark.llm
@pytest.mark.cli
def test_lora_distillation_on_the_real_model(cli, loaded_model, tmp_path):  # noqa: F811
    before = [p.detach().clone() for p in loaded_model.model.parameters()]
    out = tmp_path / "lora"
    assert cli(out, "--mode", "lora", "--steps", 4, "--eval-every", 2, "--train-batch", 4,
               "--lr", 3e-3) == 0
    after = list(loaded_model.model.parameters())
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
    curves, summary = _check_outputs(out)
    test = summary[summary["split"] == "test"]
    assert (test["kl_after"] < HELD_OUT_MARGIN * test["kl_before"]).all()
    train = summary[summary["split"] == "train"]
    assert train["kl_after"].mean() < train["kl_before"].mean()  # the loss decreased
    assert set(curves["split"]) == {"train", "test", "batch"}
    assert sorted(set(curves[curves["split"] == "test"]["step"])) == [0, 2, 4]


@pytest.mark.llm
@pytest.mark.cli
@pytest.mark.parametrize("preamble, rule", [
    ("Be helpful.<|im_end|>", "special token '<|im_end|>'"),
    ("Be helpful.\udcff", "cannot be encoded by the tokenizer"),  # an argv byte not UTF-8
    ("Be helpful. " * 3000, "tokens long; it must fit the model's context of 8192 tokens"),
])
def test_cli_a_preamble_the_model_cannot_take(cli, tmp_path, capsys, preamble, rule):
    out = tmp_path / "out"
    assert cli(out, "--preamble", preamble) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefdyn: error: --preamble") and "\n" not in err
    assert rule in err
    assert not out.exists()


@pytest.mark.llm
@pytest.mark.cli
def test_cli_a_behavior_without_held_out_statements(cli, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(out, "--max-statements", 4) == 2  # 2 of each answer: no test statement
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefdyn: error: --max-statements = 4") and "\n" not in err
    assert "0 held-out statements" in err and not out.exists()
