"""Synthetic preference data with controllable class-conditional moments."""

from synthetic.families import FAMILIES, Family, get_family
from synthetic.mixture import Mixture, empirical_mixture, population_mixture
from synthetic.problem import (
    Behavior,
    Problem,
    behaviors_with_angles,
    diagonal,
    isotropic,
    low_rank_plus_diagonal,
    with_distinguishability,
)
from synthetic.sampling import PreferenceSample, allocate, sample, sample_batch
from synthetic.statistics import behavior_statistics, fit_gaussian, problem_statistics
from synthetic.validation import ParameterError

__all__ = [
    "FAMILIES", "Family", "get_family", "Mixture", "empirical_mixture", "population_mixture",
    "Behavior", "Problem", "behaviors_with_angles", "diagonal", "isotropic",
    "low_rank_plus_diagonal", "with_distinguishability", "PreferenceSample", "allocate",
    "sample", "sample_batch", "behavior_statistics", "fit_gaussian", "problem_statistics",
    "ParameterError",
]
