"""Figures built from stored results, theory drawn over measurement.

Each figure is a module with ``plot(sweeps, out) -> list[Path]``: a function of
stored sweep results (:class:`dynamics.sweep_store.SweepResults`, the sweeps whose
``[sweep] figure`` names it) that writes ``out/NAME.png`` and ``out/NAME.pdf``.
:data:`FIGURES` maps each name to its module and to the sweep configs in
``figures/sweeps/`` that produce its data; ``prefdyn figures --remake NAME``
runs those sweeps and draws it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FIGURES", "Figure", "sweep_configs", "render"]


@dataclass(frozen=True)
class Figure:
    """A figure: title, module (``figures.<module>``) and its sweep configs."""

    number: int
    title: str
    module: str
    configs: tuple[str, ...]


FIGURES: dict[str, Figure] = {
    "distinguishability": Figure(1, "Loss and accuracy for behaviors of increasing "
                                 "distinguishability", "distinguishability",
                                 ("distinguishability.toml",)),
    "weight_change": Figure(2, "‖W(t) − W(0)‖ against step and distinguishability, with "
                            "the bound", "weight_change", ("weight_change.toml",)),
    "priority": Figure(3, "The priority effect: behaviors trained together", "priority",
                       ("priority.toml",)),
    "accuracy_bound": Figure(4, "Training accuracy against its lower bound",
                             "accuracy_bound", ("accuracy_bound_one.toml",
                                                "accuracy_bound_several.toml")),
    "misalignment": Figure(5, "Misalignment: flipped preferences from the aligned model and "
                           "from the reference", "misalignment", ("misalignment.toml",)),
    "phase_diagram": Figure(6, "Steps to 90% accuracy over distinguishability × "
                            "concentration", "phase_diagram", ("phase_diagram.toml",)),
    "separable": Figure(7, "Separable finite samples: ‖Δ‖ grows without bound, the "
                        "population flow stays bounded", "separable", ("separable.toml",)),
    "objectives": Figure(8, "Every objective on one problem: the priority effect, and DPO's "
                         "relatives under label noise", "objectives",
                         ("objectives_priority.toml", "objectives_noise.toml")),
    "rlhf_priority": Figure(9, "The priority effect under RLHF: reward model, RL on its "
                            "head, and DPO on one problem", "rlhf_priority",
                            ("rlhf_priority.toml",)),
    "rlhf_vs_dpo": Figure(10, "DPO against RLHF: β, label noise, a separable sample, and "
                          "what sampling the answers costs", "rlhf_vs_dpo",
                          ("rlhf_vs_dpo_beta.toml", "rlhf_vs_dpo_separable.toml",
                           "rlhf_vs_dpo_estimators.toml")),
    "rlhf_stability": Figure(11, "RLHF's stability: the alignment tax against PPO-ptx, "
                             "forgetting and selective rehearsal, unequal reward scales and "
                             "the advantage model", "rlhf_stability",
                             ("rlhf_stability_ptx.toml", "rlhf_stability_rehearsal.toml",
                              "rlhf_stability_scales.toml")),
    "distillation": Figure(12, "Context distillation: the gap against steps and samples, "
                           "with and without a constant feature, and how much of the "
                           "prompt's effect survives", "distillation",
                           ("distillation_constant.toml", "distillation_varying.toml",
                            "distillation_samples.toml")),
    "pretraining": Figure(13, "Preference-model pre-training: held-out accuracy against the "
                          "target's samples, with and without PMP, against the behaviors' "
                          "cosine", "pretraining", ("pretraining_pmp.toml",
                                                    "pretraining_scratch.toml")),
    "principles": Figure(14, "Principle-driven labels: accuracy on the true preference "
                         "against the principles' cosine, their number and the samples, "
                         "beside true labels", "principles",
                         ("principles_judge.toml", "principles_samples.toml",
                          "principles_true.toml")),
    "imitation_vs_preference": Figure(15, "Imitation, binary discrimination and ranked "
                                      "preference on the same data: held-out preference "
                                      "accuracy against samples and capacity",
                                      "imitation", ("imitation_samples.toml",
                                                    "imitation_start.toml",
                                                    "imitation_features.toml",
                                                    "imitation_mlp.toml",
                                                    "imitation_linear.toml",
                                                    "imitation_vocab.toml")),
}


def sweep_configs(name: str) -> list[Path]:
    """The sweep configs (``figures/sweeps/*.toml``) that produce figure ``name``'s data."""
    here = Path(__file__).resolve().parent / "sweeps"
    return [here / config for config in FIGURES[name].configs]


def render(name: str, sweeps, out: str | Path) -> list[Path]:
    """Draw figure ``name`` from ``sweeps`` (a list of SweepResults) into ``out``."""
    module = importlib.import_module(f"figures.{FIGURES[name].module}")
    return module.plot(list(sweeps), Path(out))
