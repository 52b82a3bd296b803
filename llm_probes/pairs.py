"""Pairwise preference data with multi-token responses, from a path the user names.

Two line formats, one JSON object a line, the file plain or gzip (recognised by its
first bytes, not its name); a file may mix them:

* **HH-RLHF** (Bai et al. 2022): ``chosen`` and ``rejected`` are whole dialogues of
  ``\\n\\nHuman: …`` / ``\\n\\nAssistant: …`` turns that share everything up to the
  last assistant turn. The prompt is that shared dialogue through the last
  ``\\n\\nAssistant:``; each response is the rest of its dialogue, so prompt +
  response is the dialogue exactly.
* **prompt / chosen / rejected**: three strings (the prompt is used as given).

A bad line stops the load with one line naming the file, the line number and the
rule: not JSON, not an object, a key missing or not a string, dialogues whose prompts
differ, an HH dialogue without an assistant turn, an empty (whitespace-only)
response. With ``skip_bad`` such pairs are skipped instead and counted by reason
(:attr:`Pairs.skipped`), never silently.

:func:`tokenize_pairs` applies token budgets: a prompt longer than its budget keeps
its *last* tokens (the turns nearest the answer), a response longer than its budget
keeps its first; every cut is counted per pair and in the report. A response the
budget (or the tokenizer) leaves empty is a bad pair like the others.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from synthetic.validation import ParameterError, check_integer

__all__ = ["ASSISTANT", "Pairs", "TokenizedPairs", "load_pairs", "split_dialogue",
           "tokenize_pairs"]

ASSISTANT = "\n\nAssistant:"
"""The marker of an assistant turn in the HH-RLHF format."""

_GZIP_MAGIC = b"\x1f\x8b"


class _BadPair(ValueError):
    """One pair that breaks a rule: ``reason`` (a short key) and the rule's text."""

    def __init__(self, reason: str, rule: str):
        super().__init__(rule)
        self.reason, self.rule = reason, rule


@dataclass
class Pairs:
    """Loaded pairs: ``frame`` (columns ``line``, ``prompt``, ``chosen``, ``rejected``,
    ``format``), the ``source`` path, and ``skipped``: reason → count."""

    frame: pd.DataFrame
    source: str
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)

    def report(self) -> str:
        """One line: how many pairs were read, and what was skipped and why."""
        kept = f"{len(self)} pairs from {self.source}"
        if not self.skipped:
            return kept
        why = ", ".join(f"{count} {reason}" for reason, count in sorted(self.skipped.items()))
        return f"{kept}; skipped {sum(self.skipped.values())} ({why})"


def split_dialogue(text: str) -> tuple[str, str]:
    """``(prompt, response)`` of an HH-RLHF dialogue: the prompt through the last
    ``\\n\\nAssistant:``, the response after it (``prompt + response == text``)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise _BadPair("no assistant turn", "must hold an assistant turn ('\\n\\nAssistant:')")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def _pair(record) -> tuple[str, str, str, str]:
    """``(prompt, chosen, rejected, format)`` of one parsed line."""
    if not isinstance(record, dict):
        raise _BadPair("not an object", "must be a JSON object")
    keys = ("prompt", "chosen", "rejected") if "prompt" in record else ("chosen", "rejected")
    for key in keys:
        if key not in record:
            raise _BadPair("missing key", f"must have the key {key!r} (keys: "
                           f"{', '.join(map(repr, record)) or 'none'})")
        if not isinstance(record[key], str):
            raise _BadPair("not a string", f"must have a string {key!r}, not "
                           f"{type(record[key]).__name__}")
    if "prompt" in record:
        prompt, chosen, rejected, form = (record["prompt"], record["chosen"],
                                          record["rejected"], "prompt")
    else:
        prompt, chosen = split_dialogue(record["chosen"])
        other, rejected = split_dialogue(record["rejected"])
        if other != prompt:
            at = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b),
                      min(len(prompt), len(other)))
            raise _BadPair("prompts differ", f"must share the dialogue up to the last "
                           f"assistant turn (chosen and rejected differ from character {at})")
        form = "hh"
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise _BadPair("empty response", f"must have a non-empty {name} response")
    return prompt, chosen, rejected, form


def _at(path, line: int, rule: str) -> ParameterError:
    """A bad line: ``pairs = NAME:LINE must RULE (line LINE of PATH)`` (the value is kept
    short, so the whole path goes in the rule, which is never cut)."""
    path = Path(path)
    return ParameterError("pairs", f"{path.name}:{line}", f"{rule} (line {line} of {path})")


def _lines(path: Path):
    """The file's lines as text (gzip or plain), or a ParameterError on ``pairs``."""
    try:
        with open(path, "rb") as handle:
            gz = handle.read(2) == _GZIP_MAGIC
        handle = gzip.open(path, "rt", encoding="utf-8") if gz else open(
            path, encoding="utf-8")
    except OSError as err:
        raise ParameterError("pairs", str(path), f"cannot be read ({err.strerror})") from None
    with handle:
        number = 0
        try:
            for number, line in enumerate(handle, 1):
                yield number, line
        except UnicodeDecodeError:
            raise _at(path, number + 1, "must be UTF-8 text") from None
        except (OSError, EOFError) as err:  # a truncated or corrupt gzip stream
            raise _at(path, number + 1, f"must be a whole gzip file ({err})") from None


def load_pairs(path: str | Path, *, skip_bad: bool = False,
               max_pairs: int | None = None) -> Pairs:
    """Read the pairs of ``path`` (see the module docstring). ``max_pairs`` keeps the
    first that many good pairs. Blank lines are ignored."""
    path = Path(path)
    if max_pairs is not None:
        max_pairs = check_integer("max_pairs", max_pairs, ge=1)
    rows, skipped = [], Counter()
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise _BadPair("not JSON", f"must be valid JSON ({err.msg} at column "
                               f"{err.colno})") from None
            prompt, chosen, rejected, form = _pair(record)
        except _BadPair as bad:
            if not skip_bad:
                raise _at(path, number, bad.rule + " (or --skip-bad)") from None
            skipped[bad.reason] += 1
            continue
        rows.append((number, prompt, chosen, rejected, form))
        if max_pairs is not None and len(rows) == max_pairs:
            break
    if not rows:
        raise ParameterError("pairs", str(path), "must hold at least one good pair"
                             + (f" (skipped {sum(skipped.values())})" if skipped else ""))
    frame = pd.DataFrame(rows, columns=["line", "prompt", "chosen", "rejected", "format"])
    return Pairs(frame, str(path), dict(skipped))


@dataclass
class TokenizedPairs:
    """Token ids per pair (lists of ints) and the cuts the budgets made.

    ``frame``: the kept pairs' rows of :attr:`Pairs.frame` with ``prompt_ids``,
    ``chosen_ids``, ``rejected_ids`` and the booleans ``prompt_cut``, ``chosen_cut``,
    ``rejected_cut``; ``skipped``: reason → count (the load's and the budgets')."""

    frame: pd.DataFrame
    skipped: dict[str, int]
    max_prompt_tokens: int
    max_response_tokens: int

    def report(self) -> str:
        """One line: the budgets, how many prompts and responses they cut, and skips."""
        f = self.frame
        parts = [f"{len(f)} pairs; budgets {self.max_prompt_tokens} prompt / "
                 f"{self.max_response_tokens} response tokens",
                 f"cut: {int(f.prompt_cut.sum())} prompts (kept their last tokens), "
                 f"{int(f.chosen_cut.sum())} chosen and {int(f.rejected_cut.sum())} rejected "
                 f"responses (kept their first tokens)"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{c} {r}" for r, c in
                                                  sorted(self.skipped.items())))
        return "; ".join(parts)


def tokenize_pairs(pairs: Pairs, tokenizer, *, max_prompt_tokens: int = 256,
                   max_response_tokens: int = 128, skip_bad: bool = False) -> TokenizedPairs:
    """Token ids of every pair under the budgets (see the module docstring). Prompt and
    responses are tokenized apart (no special tokens added) and concatenated, so a
    response's tokens are the same whatever its prompt. A response the tokenizer or
    its budget leaves empty stops the run (one line: file and line) unless
    ``skip_bad``."""
    max_prompt_tokens = check_integer("max_prompt_tokens", max_prompt_tokens, ge=1)
    max_response_tokens = check_integer("max_response_tokens", max_response_tokens, ge=0)
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa
    skipped = Counter(pairs.skipped)
    rows = []
    for row in pairs.frame.itertuples(index=False):
        prompt = encode(row.prompt)
        ids = {"chosen": encode(row.chosen), "rejected": encode(row.rejected)}
        empty = [name for name, tokens in ids.items()
                 if not tokens[:max_response_tokens]]
        if empty:
            if not skip_bad:
                raise _at(pairs.source, row.line, f"must keep a non-empty {empty[0]} response "
                          f"under the budget of {max_response_tokens} response tokens (or "
                          "--skip-bad)")
            skipped["response cut to nothing"] += 1
            continue
        rows.append({**row._asdict(),
                     "prompt_ids": prompt[-max_prompt_tokens:],
                     "chosen_ids": ids["chosen"][:max_response_tokens],
                     "rejected_ids": ids["rejected"][:max_response_tokens],
                     "prompt_cut": len(prompt) > max_prompt_tokens,
                     "chosen_cut": len(ids["chosen"]) > max_response_tokens,
                     "rejected_cut": len(ids["rejected"]) > max_response_tokens})
    if not rows:
        raise ParameterError("pairs", pairs.source, "must keep at least one pair under the "
                             "token budgets")
    frame = pd.DataFrame(rows)
    return TokenizedPairs(frame, dict(skipped), max_prompt_tokens, max_response_tokens)
