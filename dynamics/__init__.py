"""DPO learning dynamics in the last-layer model: analytic and simulated."""

from dynamics.analytic import (
    PopulationFlow,
    PopulationTrajectory,
    population_descent,
    population_descent_many,
)
from dynamics.bounds import (
    Tube,
    accuracy_lower_bound,
    certified_order,
    drift_tube,
    first_step,
    initial_loss_slope,
    loss_envelope,
    priority_scores,
    weight_change_bound,
)
from dynamics.metrics import BEHAVIOR_METRICS, METRICS, tidy_frame
from dynamics.model import NO, YES, answer_logps, policy_weights, reference_weights
from dynamics.objectives import OBJECTIVES, Objective, dpo_loss, dpo_margin_loss, get_objective
from dynamics.simulate import SimulationResult, simulate, simulate_sample

__all__ = [
    "PopulationFlow", "PopulationTrajectory", "population_descent", "population_descent_many",
    "Tube",
    "accuracy_lower_bound", "certified_order", "drift_tube", "first_step",
    "initial_loss_slope", "loss_envelope", "priority_scores", "weight_change_bound",
    "BEHAVIOR_METRICS", "METRICS", "tidy_frame", "NO", "YES", "answer_logps", "policy_weights",
    "reference_weights", "OBJECTIVES", "Objective", "dpo_loss", "dpo_margin_loss",
    "get_objective", "SimulationResult", "simulate", "simulate_sample",
]
