"""Pairwise preference data with multi-token responses (:mod:`llm_probes.pairs`).

Checked on the shared HH-RLHF harmless-base test split (2,312 real pairs, of which 5
have chosen and rejected dialogues that differ before the last assistant turn and 4 an
empty chosen response, found independently below with plain string operations), on
hand-written files in both formats, plain and gzip, and with a whitespace tokenizer for
the budgets; the real tokenizer in the ``llm`` tier."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from llm_fixtures import llm_cache_dir, loaded_model  # noqa: F401
from llm_probes.pairs import ASSISTANT, load_pairs, split_dialogue, tokenize_pairs
from synthetic.validation import ParameterError

HH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf" / \
    "harmless-base-test.jsonl.gz"
needs_hh = pytest.mark.skipif(not HH.exists(), reason="../shared/data/hh-rlhf is not here")


def naive_hh():
    """The shared file's records, and the line numbers of its bad pairs by reason,
    found with plain string operations."""
    records = [json.loads(line) for line in gzip.open(HH, "rt", encoding="utf-8")]
    differ, empty = [], []
    for number, r in enumerate(records, 1):
        c, j = r["chosen"], r["rejected"]
        ic, ij = c.rindex("\n\nAssistant:") + 12, j.rindex("\n\nAssistant:") + 12
        if c[:ic] != j[:ij]:
            differ.append(number)
        elif not c[ic:].strip() or not j[ij:].strip():
            empty.append(number)
    return records, differ, empty


@needs_hh
def test_the_shared_hh_file_loads_with_its_bad_pairs_counted():
    records, differ, empty = naive_hh()
    assert len(records) == 2312 and len(differ) == 5 and len(empty) == 4
    pairs = load_pairs(HH, skip_bad=True)
    assert len(pairs) == 2312 - 9
    assert pairs.skipped == {"prompts differ": 5, "empty response": 4}
    assert "skipped 9 (4 empty response, 5 prompts differ)" in pairs.report()
    assert not set(pairs.frame.line) & set(differ + empty)
    for row in pairs.frame.itertuples():  # prompt + response is the dialogue, exactly
        record = records[row.line - 1]
        assert row.prompt + row.chosen == record["chosen"]
        assert row.prompt + row.rejected == record["rejected"]
        assert row.prompt.endswith(ASSISTANT) and row.format == "hh"


@needs_hh
def test_a_bad_pair_stops_the_load_naming_file_and_line():
    _, differ, _ = naive_hh()
    with pytest.raises(ParameterError) as err:
        load_pairs(HH)
    first = min(differ + naive_hh()[2])
    assert err.value.name == "pairs" and err.value.value == f"{HH.name}:{first}"
    assert f"(line {first} of {HH})" in str(err.value)
    assert "(or --skip-bad)" in str(err.value)


def write(path: Path, lines, gz=False) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                   for line in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


GOOD = [{"prompt": "Is the sky blue?", "chosen": " Yes, on a clear day.", "rejected": " No."},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello there",
         "rejected": "\n\nHuman: hi\n\nAssistant: go away"}]


@pytest.mark.parametrize("gz", [False, True])
def test_both_formats_plain_or_gzip_whatever_the_name(tmp_path, gz):
    path = write(tmp_path / "pairs.txt", GOOD + [""], gz=gz)  # a blank line is ignored
    pairs = load_pairs(path)
    assert list(pairs.frame.format) == ["prompt", "hh"]
    assert list(pairs.frame.prompt) == ["Is the sky blue?", "\n\nHuman: hi\n\nAssistant:"]
    assert list(pairs.frame.chosen) == [" Yes, on a clear day.", " hello there"]
    assert list(pairs.frame.line) == [1, 2] and pairs.skipped == {}
    assert len(load_pairs(path, max_pairs=1)) == 1


@pytest.mark.parametrize("line, rule", [
    ("{not json", "must be valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "must have the key 'rejected'"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "must have a string 'chosen', not int"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"},
     "must share the dialogue up to the last assistant turn (chosen and rejected differ "
     "from character 9)"),
    ({"chosen": "Human: a", "rejected": "Human: a"}, "must hold an assistant turn"),
    ({"prompt": "p", "chosen": "  \n", "rejected": "r"}, "must have a non-empty chosen "
     "response"),
])
def test_each_bad_line_names_file_line_and_rule_or_is_skipped(tmp_path, line, rule):
    path = write(tmp_path / "p.jsonl", GOOD + [line])
    with pytest.raises(ParameterError) as err:
        load_pairs(path)
    assert err.value.value == "p.jsonl:3" and rule in str(err.value), str(err.value)
    assert f"(line 3 of {path})" in str(err.value)
    kept = load_pairs(path, skip_bad=True)
    assert len(kept) == 2 and sum(kept.skipped.values()) == 1


def test_unreadable_empty_non_utf8_and_broken_gzip_files(tmp_path):
    with pytest.raises(ParameterError, match="cannot be read"):
        load_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(ParameterError, match="must hold at least one good pair"):
        load_pairs(write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ParameterError, match=r"must hold at least one good pair \(skipped 1\)"):
        load_pairs(write(tmp_path / "bad.jsonl", ["{"]), skip_bad=True)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps(GOOD[0]).encode() + b"\n\xe9\n")
    with pytest.raises(ParameterError, match="must be UTF-8 text"):
        load_pairs(latin)
    whole = write(tmp_path / "whole.gz", GOOD * 200, gz=True).read_bytes()
    broken = tmp_path / "broken.gz"
    broken.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ParameterError, match="must be a whole gzip file"):
        load_pairs(broken)


class Words:
    """A tokenizer stand-in: one id per whitespace-separated word."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [len(word) for word in text.split()]}


def test_budgets_keep_the_prompts_end_and_the_responses_start_and_report_every_cut(tmp_path):
    lines = [{"prompt": "one two three four five", "chosen": "a bb ccc dddd",
              "rejected": "x"},
             {"prompt": "short", "chosen": "a", "rejected": "yy zzz"}]
    pairs = load_pairs(write(tmp_path / "p.jsonl", lines))
    tok = tokenize_pairs(pairs, Words(), max_prompt_tokens=3, max_response_tokens=2)
    f = tok.frame
    assert f.prompt_ids.tolist() == [[5, 4, 4], [5]]  # "three four five": its last 3
    assert f.chosen_ids.tolist() == [[1, 2], [1]] and f.rejected_ids.tolist() == [[1], [2, 3]]
    assert f.prompt_cut.tolist() == [True, False]
    assert f.chosen_cut.tolist() == [True, False] and f.rejected_cut.tolist() == [False, False]
    assert ("cut: 1 prompts (kept their last tokens), 1 chosen and 0 rejected responses"
            in tok.report())


def test_a_response_the_budget_cuts_to_nothing_is_a_bad_pair(tmp_path):
    pairs = load_pairs(write(tmp_path / "p.jsonl", GOOD))
    with pytest.raises(ParameterError) as err:
        tokenize_pairs(pairs, Words(), max_response_tokens=0)
    assert err.value.value == "p.jsonl:1" and f"(line 1 of {tmp_path / 'p.jsonl'})" in str(
        err.value)
    assert "must keep a non-empty chosen response under the budget of 0" in str(err.value)
    with pytest.raises(ParameterError, match="must keep at least one pair"):
        tokenize_pairs(pairs, Words(), max_response_tokens=0, skip_bad=True)


def test_split_dialogue_keeps_the_marker_in_the_prompt():
    prompt, response = split_dialogue("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d")
    assert prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert response == " d"


@needs_hh
@pytest.mark.llm
def test_real_tokens_decode_back_to_the_dialogue(loaded_model):  # noqa: F811
    """Byte-level BPE: prompt and response tokenized apart decode to the dialogue
    exactly, for every pair the budgets did not cut."""
    tokenizer = loaded_model.tokenizer
    pairs = load_pairs(HH, skip_bad=True, max_pairs=200)
    tok = tokenize_pairs(pairs, tokenizer, max_prompt_tokens=256, max_response_tokens=64)
    whole = tok.frame[~(tok.frame.prompt_cut | tok.frame.chosen_cut)]
    assert len(whole) > 50
    for row in whole.itertuples():
        assert tokenizer.decode(row.prompt_ids + row.chosen_ids) == row.prompt + row.chosen
    assert tok.frame.prompt_cut.any() and tok.frame.chosen_cut.any()  # budgets bite here


# ------------------------------------------------------------------ response features

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llm_probes.pair_features import length_batches, response_features  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(1, 8),
       st.integers(2, 200))
def test_length_batches_cover_every_sequence_once_within_the_budgets(lengths, size, budget):
    batches = length_batches(lengths, size, budget)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    lengths = np.array(lengths)
    assert np.all(np.diff(lengths[flat]) >= 0)  # by increasing length
    for batch in batches:
        assert len(batch) <= size
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= budget


@needs_hh
@pytest.mark.llm
def test_response_features_equal_one_unbatched_forward_per_response(loaded_model):  # noqa: F811
    """Naive reference: each prompt + response alone through the whole model, its
    log-probabilities from the full logits, its states from ``output_hidden_states``
    (the last one is after the final norm); batched and length-bucketed they agree."""
    tokenizer = loaded_model.tokenizer
    pairs = load_pairs(HH, skip_bad=True, max_pairs=6)
    tok = tokenize_pairs(pairs, tokenizer, max_prompt_tokens=48, max_response_tokens=24)
    prompts = list(tok.frame.prompt_ids) * 2
    responses = list(tok.frame.chosen_ids) + list(tok.frame.rejected_ids)
    got = response_features(loaded_model, prompts, responses, batch_size=4,
                            max_batch_tokens=256)
    model = loaded_model.model
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.as_tensor([list(p) + list(r)])
        with torch.inference_mode():
            out = model(input_ids=ids, output_hidden_states=True)
        span = slice(len(p) - 1, len(p) - 1 + len(r))
        logp = torch.log_softmax(out.logits[0, span].double(), -1)
        want = float(logp.gather(-1, torch.as_tensor(r)[:, None]).sum())
        states = out.hidden_states[-1][0, span].double().sum(0).numpy()
        assert got["tokens"][i] == len(r)
        assert abs(got["logp"][i] - want) < 1e-3 * max(1.0, abs(want)), (i, got["logp"][i], want)
        np.testing.assert_allclose(got["sum"][i], states, rtol=1e-3, atol=1e-3 * len(r))


# ------------------------------------------------------------- prefdyn probe features --pairs

from llm_probes.cli import main as probe_main  # noqa: E402


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefdyn: error: "), err
    return err[0]


@pytest.mark.parametrize("extra, fragment", [
    (["--behaviors", "agreeableness"], "--behaviors = 'agreeableness' cannot be given with "
     "--pairs"),
    (["--max-pairs", "0"], "--max-pairs = 0 must be >= 1"),
    (["--max-response-tokens", "0"], "--max-response-tokens = 0 must be >= 1"),
])
def test_pairs_options_are_checked_before_anything_is_written(tmp_path, capsys, extra,
                                                               fragment):
    data = write(tmp_path / "p.jsonl", GOOD)
    out = tmp_path / "out"
    assert probe_main(["features", "--pairs", str(data), "--out", str(out), *extra]) == 2
    assert fragment in one_line(capsys) and not out.exists()


def test_pairs_refusals_name_the_option(tmp_path, capsys):
    data = write(tmp_path / "p.jsonl", GOOD + ["{oops"])
    out = tmp_path / "out"
    assert probe_main(["features", "--pairs", str(data), "--out", str(out)]) == 2
    line = one_line(capsys)
    assert "pairs = 'p.jsonl:3' must be valid JSON" in line and not out.exists()
    assert f"(line 3 of {data})" in line
    assert probe_main(["finetune", "--pairs", str(data), "--out", str(out)]) == 2
    assert "is not taken by the finetune probe yet" in one_line(capsys)
    assert probe_main(["features", "--out", str(out)]) == 2
    assert "--behaviors = None is required (or --pairs PATH" in one_line(capsys)
    assert probe_main(["features", "--behaviors", "x", "--skip-bad", "--out", str(out)]) == 2
    assert "--skip-bad = True applies only with --pairs" in one_line(capsys)
    assert not out.exists()


@needs_hh
@pytest.mark.llm
def test_features_on_pairs_writes_tables_that_agree_with_their_arrays(tmp_path,
                                                                     loaded_model):  # noqa: F811
    out = tmp_path / "out"
    assert probe_main(["features", "--pairs", str(HH), "--skip-bad", "--max-pairs", "6",
                       "--max-prompt-tokens", "40", "--max-response-tokens", "12",
                       "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    table = pd.read_parquet(out / "pair_features.parquet")
    arrays = np.load(out / "pair_features.npz")
    summary = json.loads((out / "pair_features_summary.json").read_text())
    chosen = arrays["chosen_sum"] / arrays["chosen_tokens"][:, None]
    rejected = arrays["rejected_sum"] / arrays["rejected_tokens"][:, None]
    np.testing.assert_allclose(table.mean_distance, np.linalg.norm(chosen - rejected, axis=1),
                               rtol=1e-12)
    np.testing.assert_allclose(table.logp_margin, table.logp_chosen - table.logp_rejected)
    assert summary["reference_accuracy"] == pytest.approx(float((table.logp_margin > 0).mean()))
    want = np.linalg.norm(chosen.mean(0) - rejected.mean(0))
    assert summary["distinguishability"] == pytest.approx(want, rel=1e-10)
    assert len(table) == 6 and table.chosen_tokens.max() <= 12
    assert (out / "probe_pair_features.png").exists()
    record = json.loads((out / "probe_features.json").read_text())
    assert record["pairs"].startswith("6 pairs") and "budgets 40 prompt" in record["tokens"]
