"""The report's predictions and their measured checks, on features already in hand.

Everything here takes :class:`Examples` (features, signs, behaviors: see
:mod:`llm_probes.preflight.core` for the model) and no language model, so the
tests run it on synthetic features. The prediction is
:func:`dynamics.analytic.population_descent` on the Gaussian fit
(:func:`synthetic.statistics.fit_gaussian`) of the examples; the measurement is
:func:`dynamics.simulate.simulate_sample` on the examples themselves, with the same
objective, ``β``, ``lr`` and steps (``t = lr · step``), all behaviors trained together.
The reference ``W0`` has two rows (Yes, No for persona statements; zeros for pairs):
loss and accuracies depend on them alone.

**The reweighting check.** For each seed, a bootstrap sample of the examples of
the same size with behavior ``i`` given the share ``w_i`` (its class balance kept,
:func:`core.resample_counts`) is trained, once with the data's own shares and once
with the suggested weights; a behavior's measured speed — its loss on the examples
themselves (the same set for every seed and weighting) — is its loss drop divided by
``t`` over the first recorded interval (``initial``) and over the whole run
(``average``); the spread across behaviors is the coefficient of variation
(:func:`core.spread`). Reported: both spreads' means over seeds, and the per-seed
difference (natural − reweighted) with its Student-t 95% interval.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from dynamics.analytic import population_descent
from dynamics.simulate import simulate_sample
from llm_probes.preflight import core
from synthetic.mixture import population_mixture
from synthetic.problem import Problem
from synthetic.sampling import PreferenceSample
from synthetic.statistics import fit_gaussian

__all__ = ["Examples", "Settings", "fit", "predict", "measure", "speeds", "behavior_table",
           "reweighting_check", "curves_table", "ACCURACY_LEARNED"]

ACCURACY_LEARNED = 0.75
"""A behavior counts as *learned* once its implicit-reward accuracy reaches this."""


@dataclass
class Examples:
    """x (n, d) float64 · s (n,) ±1 · b (n,) ints in [0, K) · names (K) · reference (2, d)."""

    x: np.ndarray
    s: np.ndarray
    b: np.ndarray
    names: tuple[str, ...]
    reference: np.ndarray

    @property
    def k(self) -> int:
        return len(self.names)

    def shares(self) -> np.ndarray:
        """The data's own behavior weights (share of examples), (K,)."""
        return np.bincount(self.b, minlength=self.k) / len(self.b)


@dataclass
class Settings:
    objective: str = "dpo"
    beta: float = 1.0
    lr: float = 1e-3
    steps: int = 200
    eval_every: int = 10
    seeds: int = 8
    seed: int = 0


def fit(ex: Examples, weights=None) -> Problem:
    """The Gaussian fit of every behavior; its weights the data's shares or ``weights``."""
    problem = fit_gaussian(torch.as_tensor(ex.x), ex.s, ex.b, list(ex.names))
    if weights is None:
        return problem
    w = core.check_weights("weights", weights, ex.k)
    return Problem(tuple(beh.replace(weight=float(wi)) for beh, wi in
                         zip(problem.behaviors, w)))


def predict(ex: Examples, st: Settings, weights=None):
    """Population gradient descent on the fit: the trajectory ``per_behavior[metric]``
    (E, K) at ``steps`` (E,). With ``weights`` the flow trains on the fit with behavior
    ``i`` weighted ``w_i`` (0 allowed: not trained on), its class balance kept; each
    behavior's metrics are its own, whatever its weight."""
    mixture = population_mixture(fit(ex))
    train = None
    if weights is not None:
        w = core.check_weights("weights", weights, ex.k)
        own = mixture.behavior_weights()[mixture.behavior]  # (C,): w_i of each component
        train = dataclasses.replace(mixture, weights=mixture.weights / own
                                    * w[mixture.behavior])
    return population_descent(mixture, beta=st.beta, lr=st.lr, steps=st.steps,
                              reference=ex.reference, objective=st.objective,
                              eval_every=st.eval_every, train_mixture=train)


def measure(ex: Examples, st: Settings, *, weights=None, seeds: int | None = None,
            progress=None):
    """Full-batch training on the examples (``seeds`` None), or on ``seeds`` weighted
    bootstrap samples of them (weights: the data's shares if None; every (behavior,
    sign) keeps at least one example); returns the
    :class:`dynamics.simulate.SimulationResult` (``per_behavior[metric]`` (E, S, 1, K)).
    With ``seeds`` the metrics ``heldout/<metric>`` are those on the examples themselves,
    the same set for every seed and weighting."""
    if seeds is None:
        x, s, b = ex.x[None], ex.s[None], ex.b
        labels = [st.seed]
    else:
        counts = core.resample_counts(ex.s, ex.b, ex.shares() if weights is None else weights,
                                      len(ex.b))
        draws = [core.bootstrap_sample(ex.s, ex.b, counts,
                                       np.random.default_rng([st.seed, r]))
                 for r in range(seeds)]
        x = np.stack([ex.x[i] for i in draws])  # (S, n', d)
        s = np.stack([ex.s[i] for i in draws])  # (S, n')
        b = ex.b[draws[0]]  # the same layout for every seed
        labels = list(range(seeds))
    xt = torch.as_tensor(x, dtype=torch.float64)
    signs = torch.as_tensor(s, dtype=torch.float64)
    data = PreferenceSample(xt, signs, signs, torch.as_tensor(b, dtype=torch.int64),
                            tuple(ex.names))
    heldout = None
    if seeds is not None:
        whole = torch.as_tensor(ex.x, dtype=torch.float64)[None].expand(seeds, -1, -1)
        own = torch.as_tensor(ex.s, dtype=torch.float64)[None].expand(seeds, -1)
        heldout = PreferenceSample(whole, own, own, torch.as_tensor(ex.b, dtype=torch.int64),
                                   tuple(ex.names))
    return simulate_sample(data, seeds=labels, beta=st.beta, lr=st.lr, steps=st.steps,
                           reference=ex.reference, objective=st.objective,
                           eval_every=st.eval_every, progress=progress, heldout=heldout)


def speeds(loss: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
    """Learning speeds from losses ``(E, ..., K)`` at times ``t`` (E,): ``initial``
    ``(L(0) − L(t₁))/t₁`` and ``average`` ``(L(0) − L(T))/T``, each ``(..., K)``."""
    return {"initial": (loss[0] - loss[1]) / t[1], "average": (loss[0] - loss[-1]) / t[-1]}


def _first_learned(acc: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The first ``t`` at which each column of acc (E, K) reaches ACCURACY_LEARNED."""
    out = np.full(acc.shape[1], np.nan)
    for i in range(acc.shape[1]):
        hit = np.flatnonzero(acc[:, i] >= ACCURACY_LEARNED)
        if len(hit):
            out[i] = t[hit[0]]
    return out


def behavior_table(ex: Examples, st: Settings, theory, measured, weights: np.ndarray,
                   exact: bool, theory_weighted) -> pd.DataFrame:
    """One row per behavior: the fit, the predicted rate and order, the flags, the
    suggested weight, the prediction against the measured full-batch run."""
    means = core.signed_means(ex.x, ex.s, ex.b, ex.k)
    shares = ex.shares()
    rate = core.initial_rates(means, shares)
    factor = 2 * core.loss_slope_at_zero(st.objective, st.beta) ** 2
    t = st.lr * theory.steps
    loss_th, loss_me = theory.per_behavior["loss"], measured.per_behavior["loss"][:, 0, 0]
    sp_th, sp_me = speeds(loss_th, t), speeds(loss_me, t)
    sp_rw = speeds(theory_weighted.per_behavior["loss"], t)
    problem = fit(ex)
    table = pd.DataFrame({
        "behavior": list(ex.names), "examples": np.bincount(ex.b, minlength=ex.k),
        "distinguishability": [beh.distinguishability for beh in problem.behaviors],
        "weight": shares, "rate": rate, "predicted_slope": factor * rate,
        "predicted_rank": pd.Series(rate).rank(ascending=False, method="min").astype(int),
        "predicted_loss_drop": loss_th[0] - loss_th[-1],
        "predicted_t_learned": _first_learned(theory.per_behavior["reward_accuracy"], t),
        "measured_slope": sp_me["initial"], "measured_loss_drop": loss_me[0] - loss_me[-1],
        "measured_t_learned": _first_learned(
            measured.per_behavior["reward_accuracy"][:, 0, 0], t),
        "gap": np.abs(loss_me - loss_th).max(0),
        "suggested_weight": weights,
        "rate_reweighted": core.initial_rates(means, weights),
        "predicted_slope_reweighted": sp_rw["initial"],
        "predicted_loss_drop_reweighted": (theory_weighted.per_behavior["loss"][0]
                                           - theory_weighted.per_behavior["loss"][-1]),
    })
    table["predicted_slope_theory_curve"] = sp_th["initial"]
    table["measured_rank"] = table["measured_loss_drop"].rank(ascending=False,
                                                              method="min").astype(int)
    table["drop_rank"] = table["predicted_loss_drop"].rank(ascending=False,
                                                           method="min").astype(int)
    top = max(rate.max(), 0.0)
    drop = table["predicted_loss_drop"].to_numpy()
    table["status"] = np.select(
        [drop <= 0, rate <= 0, rate < core.NEGLECT_FRACTION * top],
        ["unlearned", "pushed back first", "neglected"], "ok")
    table["reweighting_exact"] = exact
    return table


def curves_table(ex: Examples, st: Settings, runs: dict) -> pd.DataFrame:
    """Tidy curves: ``source`` (theory/measured) × ``weights`` (natural/suggested) ×
    behavior × step, with t, loss, reward_accuracy."""
    rows = []
    for (source, weights), result in runs.items():
        loss = result.per_behavior["loss"]
        acc = result.per_behavior["reward_accuracy"]
        if loss.ndim == 4:  # measured (E, S, P, K): one seed, one run
            loss, acc = loss[:, 0, 0], acc[:, 0, 0]
        for i, name in enumerate(ex.names):
            rows.append(pd.DataFrame({"source": source, "weights": weights, "behavior": name,
                                      "step": result.steps, "t": st.lr * result.steps,
                                      "loss": loss[:, i], "reward_accuracy": acc[:, i]}))
    return pd.concat(rows, ignore_index=True)


def reweighting_check(ex: Examples, st: Settings, weights: np.ndarray,
                      progress=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Measured speeds with the data's shares and with ``weights`` over ``st.seeds``
    bootstrap samples: (per seed × weights × speed: the spread and every behavior's
    speed; the summary per speed: mean spreads and the interval of their difference)."""
    rows, spreads = [], {}
    for label, w in (("natural", ex.shares()), ("suggested", weights)):
        result = measure(ex, st, weights=w, seeds=st.seeds, progress=progress)
        loss = result.per_behavior["heldout/loss"][:, :, 0]  # (E, S, K), on the examples
        for kind, value in speeds(loss, st.lr * result.steps).items():  # (S, K)
            spreads[label, kind] = core.spread(value)
            for seed in range(st.seeds):
                rows.append(dict(weights=label, speed=kind, seed=seed,
                                 spread=spreads[label, kind][seed],
                                 **{f"speed/{n}": value[seed, i]
                                    for i, n in enumerate(ex.names)}))
    summary = []
    for kind in ("initial", "average"):
        diff = spreads["natural", kind] - spreads["suggested", kind]
        mean, low, high = core.interval(diff)
        summary.append(dict(speed=kind, seeds=st.seeds,
                            spread_natural=float(spreads["natural", kind].mean()),
                            spread_suggested=float(spreads["suggested", kind].mean()),
                            shrink=mean, shrink_low=low, shrink_high=high,
                            shrinks=bool(low > 0)))
    return pd.DataFrame(rows), pd.DataFrame(summary)
