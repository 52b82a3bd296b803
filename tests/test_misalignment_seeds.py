"""Several seeds of ``prefdyn probe misalignment`` summarised (:mod:`llm_probes.misalignment`).

Hand-made curves whose crossings are known by construction, and intervals against
scipy's t quantile computed here."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from llm_probes.misalignment import seed_summary, seed_table, steps_to


def test_steps_to_interpolates_the_first_crossing():
    steps = [0, 10, 20, 30]
    assert steps_to(steps, [0.2, 0.4, 0.8, 1.0], 0.5) == pytest.approx(12.5)
    assert steps_to(steps, [0.2, 0.4, 0.8, 1.0], 0.8) == pytest.approx(20.0)
    assert steps_to(steps, [0.6, 0.4, 0.8, 1.0], 0.5) == 0.0  # already there at step 0
    assert math.isnan(steps_to(steps, [0.2, 0.3, 0.4, 0.45], 0.5))
    assert steps_to(steps, [0.2, 0.6, 0.4, 0.9], 0.5) == pytest.approx(7.5)  # the first one


def frame(slope: float, start_acc: float, start: str, split: str) -> pd.DataFrame:
    """Two behaviors whose mean accuracy is ``start_acc + slope·step`` (capped at 1)."""
    rows = []
    for step in (0, 10, 20, 30, 40):
        mean = min(1.0, start_acc + slope * step)
        for behavior, shift in (("a", -0.05), ("b", 0.05)):
            rows.append(dict(phase="flip", start=start, source=split, step=step,
                             behavior=behavior, accuracy=mean + shift,
                             reward_accuracy=mean + shift))
    return pd.DataFrame(rows)


def runs():
    """Seed k: the aligned start crosses 0.5 at step 5 + k, the base at 20 + 2k."""
    out = {}
    for k in range(4):
        parts = [frame(0.25 / (20 + 2 * k), 0.25, "base", split) for split in ("train", "test")]
        parts += [frame(0.5 / (5 + k), 0.0, "aligned", split) for split in ("train", "test")]
        parts.append(frame(0.0, 0.1, "aligned", "train").assign(phase="align"))  # ignored
        out[k] = pd.concat(parts, ignore_index=True)
    return out


def test_seed_table_and_summary_against_the_construction():
    table = seed_table(runs())
    at_half = table[(table.level == 0.5) & (table.metric == "accuracy") &
                    (table.split == "train")].set_index(["seed", "start"]).steps_to
    for k in range(4):
        assert at_half[(k, "aligned")] == pytest.approx(5 + k)
        assert at_half[(k, "base")] == pytest.approx(20 + 2 * k)
    summary = seed_summary(table)
    row = summary[(summary.split == "test") & (summary.metric == "accuracy") &
                  (summary.level == 0.5)].iloc[0]
    diff = np.array([(20 + 2 * k) - (5 + k) for k in range(4)], dtype=float)
    half = stats.t.ppf(0.975, 3) * diff.std(ddof=1) / 2
    assert row.difference == pytest.approx(diff.mean())
    assert row.difference_high - row.difference == pytest.approx(half)
    assert row.aligned_reached == row.base_reached == row.paired_seeds == row.seeds == 4
    assert row.aligned_steps == pytest.approx(6.5)


def test_a_level_never_reached_counts_only_the_seeds_that_did():
    data = runs()
    data[0] = data[0][~((data[0].start == "base") & (data[0].step > 0))]  # stuck at 0.25
    summary = seed_summary(seed_table(data))
    row = summary[(summary.split == "train") & (summary.metric == "accuracy") &
                  (summary.level == 0.5)].iloc[0]
    assert row.base_reached == 3 and row.paired_seeds == 3 and row.aligned_reached == 4
    assert row.base_steps == pytest.approx(np.mean([22, 24, 26]))
