"""Small table helpers shared by the figures that read several sweeps at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["combine", "interval"]


def combine(sweeps) -> tuple[pd.DataFrame, dict]:
    """The sweeps' tidy tables in one and their configs, each point's id prefixed with
    its sweep's directory name (``constant/3f2a…``): two sweeps that grid the same key
    over the same values have the same bare point ids."""
    frames, configs = [], {}
    for sweep in sweeps:
        name = Path(sweep.path).name
        frame = sweep.frame()
        frames.append(frame.assign(point=name + "/" + frame["point"].astype(str)))
        configs.update({f"{name}/{pid}": c for pid, c in sweep.configs().items()})
    return pd.concat(frames, ignore_index=True), configs


def interval(values) -> tuple[float, float, float]:
    """``(mean, sd, half-width)`` of the seeds' values: the 95% t interval of the mean
    (sd and half-width NaN for one value)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, np.nan, np.nan
    sd = float(values.std(ddof=1))
    return mean, sd, float(stats.t.ppf(0.975, len(values) - 1) * sd / np.sqrt(len(values)))
