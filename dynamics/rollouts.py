"""Sampled policy-gradient estimators of the RL objective: REINFORCE and PPO.

The ``rlhf`` objective (:mod:`dynamics.objectives`) maximises, per prompt ``g``,

    J = Σ_y π(y|g) r(g, y) − β KL(π(·|g) ‖ π0(·|g)),     r(g, y) = φ_yᵀg (frozen),

whose exact gradient (``estimator = "exact"``) the softmax engine takes over every
answer. The estimators here see only answers *sampled* from the policy, as an
LLM's RL does. Each step (one row of the metrics) is one rollout:

1. ``rollout_size`` prompts are drawn from the seed's sample without replacement
   (all of them when 0), and one answer ``y ~ π_old(·|g)`` per prompt and run;
2. the return ``R = r(g, y) − β log(π_old(y)/π0(y))`` (``kl_in = "reward"``: TRL's
   per-token k1 penalty) or ``R = r(g, y)`` (``kl_in = "loss"``: the exact per-prompt
   KL is added to the loss, its gradient ``β π ⊙ (log π/π0 − KL)`` taken over the
   answers); the advantage ``A = R − b`` with ``b`` none, the rollout's mean, the
   return's expectation under ``π_old`` (exact over the answers, which a one-token
   policy affords), or a linear value head ``v_ᵀg`` (trained alongside on
   ``½(vᵀg − R)²`` with step ``vf_coef·lr``, from zero in every phase);
3. REINFORCE: one update on ``−A log π(y)``; PPO: ``ppo_epochs`` passes, each over
   ``num_minibatches`` minibatches of the rollout (a fresh permutation per pass and
   seed; one minibatch keeps the rollout's order), one update per minibatch on the
   clipped surrogate ``max(−Aρ, −A clip(ρ, 1±ε))``, ``ρ = π(y)/π_old(y)``.

REINFORCE is unbiased for ``∇J`` when an answer's baseline does not depend on
that answer (``baseline = "none"``, ``"expected"`` or ``"value"``): its mean update is the exact
one (``tests/test_rlhf.py`` checks it at the Monte Carlo rate). The rollout mean
includes each answer's own return, which scales the expected update by exactly
``1 − 1/B``. With one pass of one minibatch ``ρ = 1`` at the
update, no answer is clipped, and PPO's update is REINFORCE's bit for bit.

Gradient with respect to the logits, per sampled answer: ``∇_z log π(y) = e_y − π``,
so REINFORCE's is ``−A (e_y − π)`` and PPO's ``−A ρ (e_y − π) · 1[unclipped term
active]``; as elsewhere the update on ``W`` is the batch mean of those times ``gᵀ``.

The KL coefficient is ``β`` (``train.beta``: TRL's ``kl_coef``), fixed, or with
``kl_target > 0`` adapted after every rollout by the controller of Ziegler et al.
(2019) on the rollout's sampled KL, ``mean log(π_old(y)/π0(y))``
(:func:`dynamics.objectives.adapt_kl`).

Statistics per step (``SimulationResult.per_run``, TRL's names): ``policy/clipfrac``
(share of sampled answers whose clipped term is the active one), ``policy/approxkl``
(``½ mean (log ρ)²``) and ``loss/value`` (``½ mean (vᵀg − R)²``), each averaged over
the step's updates, ``val/ratio`` and ``val/ratio_var`` (the mean over the updates
of each one's mean ratio ``ρ``, and their variance across the updates, NaN for one
update), and ``objective/kl_coef`` (the coefficient the rollout used).
Randomness: one :class:`torch.Generator` per seed, seeded by the seed, draws the
prompts, the answers of every configuration, and the permutations.
"""

from __future__ import annotations

import torch

from dynamics.objectives import adapt_kl
from dynamics.simulate import _SoftmaxEngine, gather_prompts

__all__ = ["RolloutEngine"]


class RolloutEngine(_SoftmaxEngine):
    """REINFORCE and PPO on every row of the policy, every run at once (see the module
    docstring); evaluation is the softmax engine's (exact over the answers)."""

    def __init__(self, data, train, obj, hyper, beta, lr, w0, theta, batch_size, seeds, rewards,
                 ptx=None, offset=None):
        super().__init__(data, train, obj, hyper, beta, lr, w0, theta, None, seeds, rewards, ptx)
        self.n = self.x.shape[1]
        self.size = hyper["rollout_size"] or self.n
        self.gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        num_seeds, num_configs, self.vocab, dim = self.shape
        self.value = torch.zeros(num_seeds, num_configs, dim, dtype=self.x.dtype,
                                 device=self.x.device)  # the value head v, per run
        self.lr_rows = self.lr.view(1, -1, 1, 1)  # (1, P, 1, 1)
        self.scale_rows = -self.lr.repeat_interleave(self.vocab)[:, None]  # −lr per row (P·V, 1)
        self.stats: dict = {}
        # the KL coefficient of each run (S, P, 1): β, or adapted after every rollout
        self.kl_coef = self.beta[..., 0].expand(num_seeds, -1, -1).clone()

    # ------------------------------------------------------------------ randomness
    def _prompts(self) -> torch.Tensor | None:
        """Each seed's rollout prompts ``(S, B)``, or None: every prompt, in order."""
        if self.size == self.n:
            return None
        return torch.stack([torch.randperm(self.n, generator=g)[:self.size]
                            for g in self.gens]).to(self.x.device)

    def _answers(self, probs: torch.Tensor) -> torch.Tensor:
        """``y ~ probs`` ``(S, P, V, B)`` by the inverse CDF: ``(S, P, B)`` indices."""
        num_seeds, num_configs, _, size = probs.shape
        u = torch.stack([torch.rand(num_configs, size, generator=g, dtype=probs.dtype)
                         for g in self.gens]).to(probs.device)  # (S, P, B)
        below = (probs.cumsum(-2) < u[:, :, None]).sum(-2)
        return below.clamp_max(self.vocab - 1)

    def _permutation(self, size: int) -> torch.Tensor:
        return torch.stack([torch.randperm(size, generator=g) for g in self.gens]).to(
            self.x.device)

    # ------------------------------------------------------------------ one rollout
    def step(self) -> None:
        hyper = self.hyper
        idx = self._prompts()
        if idx is None:
            xb, context = self.x, self.full_context
        else:
            rows = torch.arange(self.x.shape[0], device=idx.device)[:, None]
            xb = self.x[rows, idx]  # (S, B, d)
            context = self.context(idx)
        xb_t = xb.transpose(1, 2)
        logp_all = torch.log_softmax(self._logits(xb_t), dim=-2)  # (S, P, V, B): π_old
        probs_all = logp_all.exp()
        answers = self._answers(probs_all)[:, :, None]  # (S, P, 1, B)
        pick = lambda t: t.expand(answers.shape[0], answers.shape[1], -1, -1).gather(  # noqa: E731
            -2, answers).squeeze(-2)
        logp_old = logp_all.gather(-2, answers).squeeze(-2)  # (S, P, B)
        beta = self.kl_coef  # (S, P, 1)
        context = {**context, "beta": beta[..., None]}
        log_ref_all = torch.log_softmax(context["reference"], dim=-2)
        every = context["rewards"]  # the return of every answer (S, 1 or P, V, B)
        if hyper["kl_in"] == "reward":
            every = every - beta[..., None] * (logp_all - log_ref_all)
        returns = pick(every)
        log_ref = pick(log_ref_all)  # log π0(y)
        if hyper["baseline"] == "none":
            advantages = returns
        elif hyper["baseline"] == "mean":
            advantages = returns - returns.mean(-1, keepdim=True)
        elif hyper["baseline"] == "expected":  # E_{π_old}[R(g, ·)], exact over the answers
            advantages = returns - (probs_all * every).sum(-2)
        else:  # v_ᵀg before this step's updates (S, P, B)
            advantages = returns - torch.bmm(self.value, xb_t)

        ppo = hyper["estimator"] == "ppo"
        epochs = hyper["ppo_epochs"] if ppo else 1
        parts = hyper["num_minibatches"] if ppo else 1
        size = xb.shape[1]
        tally = {"policy/clipfrac": 0.0, "policy/approxkl": 0.0, "loss/value": 0.0}
        # The first update, when its minibatch is the whole rollout in order (one
        # minibatch: REINFORCE, PPO's first pass), sees the rollout's weights and prompts:
        # its policy is π_old, computed above, not a second time.
        current = (logp_all, probs_all) if parts == 1 else None
        ratios = []  # each update's mean ratio π/π_old (S, P)
        for _ in range(epochs):
            order = None if parts == 1 else self._permutation(size)
            for part in range(parts):
                if order is None:
                    sel = None
                    x_m, ctx = xb, context
                    a_m, r_m, y_m, old_m = advantages, returns, answers, logp_old
                else:
                    sel = order[:, part * size // parts:(part + 1) * size // parts]  # (S, Bm)
                    rows = torch.arange(xb.shape[0], device=sel.device)[:, None]
                    x_m = xb[rows, sel]
                    ctx = gather_prompts(context, sel)
                    take = lambda t: t.gather(-1, sel[:, None].expand(  # noqa: E731
                        -1, t.shape[1], -1))
                    a_m, r_m, old_m = take(advantages), take(returns), take(logp_old)
                    y_m = take(answers[:, :, 0])[:, :, None]
                stats = self._update(x_m, ctx, a_m, r_m, y_m, old_m, ppo, current)
                ratios.append(stats.pop("val/ratio"))
                current = None
                for key, value in stats.items():
                    tally[key] += value / (epochs * parts)
        tally["objective/kl_coef"] = beta[..., 0]
        ratios = torch.stack(ratios)  # TRL's val/ratio and val/ratio_var: over the updates
        tally["val/ratio"] = ratios.mean(0)
        tally["val/ratio_var"] = (ratios.var(0) if len(ratios) > 1
                                  else torch.full_like(ratios[0], float("nan")))
        self.stats = {key: value.cpu().double().numpy() for key, value in tally.items()
                      if key != "policy/clipfrac" or ppo}
        if hyper["kl_target"] > 0:  # the adaptive controller, on the rollout's sampled KL
            self.kl_coef = self.kl_coef * adapt_kl(
                (logp_old - log_ref).mean(-1, keepdim=True), hyper["kl_target"],
                hyper["kl_horizon"])

    def _update(self, x_m, context, advantages, returns, answers, logp_old, ppo, current=None):
        """One gradient step of the policy (and of the value head) on a minibatch;
        ``current``: the policy's ``(log π, π)`` on it when already known."""
        x_t = x_m.transpose(1, 2)
        if current is None:
            logp = torch.log_softmax(self._logits(x_t), dim=-2)  # (S, P, V, Bm)
            probs = logp.exp()
        else:
            logp, probs = current
        onehot = torch.zeros_like(probs).scatter_(-2, answers, 1.0)
        logp_y = logp.gather(-2, answers).squeeze(-2)  # (S, P, Bm)
        log_ratio = logp_y - logp_old
        stats = {"policy/approxkl": 0.5 * (log_ratio**2).mean(-1),
                 "val/ratio": torch.exp(log_ratio).mean(-1)}
        if ppo:
            clip = self.hyper["clip"]
            ratio = torch.exp(log_ratio)
            clipped = -advantages * ratio.clamp(1 - clip, 1 + clip) > -advantages * ratio
            weight = torch.where(clipped, torch.zeros_like(ratio), -advantages * ratio)
            stats["policy/clipfrac"] = clipped.to(ratio.dtype).mean(-1)
        else:
            weight = -advantages  # d(−A log π(y))/d log π(y)
        coef = weight[:, :, None] * (onehot - probs)  # ∂loss/∂logits (S, P, V, Bm)
        if self.hyper["kl_in"] == "loss":
            ratio_all = logp - torch.log_softmax(context["reference"], dim=-2)
            kl = (probs * ratio_all).sum(-2, keepdim=True)
            coef = coef + context["beta"] * probs * (ratio_all - kl)
        if "mask" in context:  # selective rehearsal: imitation on the prompts RL leaves
            coef = self.rehearse(coef, logp, context)
        size = x_m.shape[1]
        ptx = self._ptx_step()  # PPO-ptx: the pretraining term at every update
        self.weights.baddbmm_(coef.flatten(1, 2) * (self.scale_rows / size), x_m)
        if ptx is not None:
            self.weights.baddbmm_(*ptx)
        # the value head: ½ mean (vᵀg − R)², one step of vf_coef·lr; untrained (without
        # the value baseline) it stays 0, and 0 − R is −R exactly
        trained = self.hyper["baseline"] == "value"
        error = torch.bmm(self.value, x_t) - returns if trained else -returns  # (S, P, Bm)
        stats["loss/value"] = 0.5 * (error**2).mean(-1)
        if trained:
            step = self.hyper["vf_coef"] * self.lr_rows[..., 0] / size
            self.value.sub_(torch.bmm(error, x_m) * step)
        return stats

