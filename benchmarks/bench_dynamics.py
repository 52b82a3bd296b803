#!/usr/bin/env python
"""Cost of prefdyn's dynamics on this machine (THEORY §6), as ratios measured in one run.

    python benchmarks/bench_dynamics.py            # full mode (a few minutes)
    python benchmarks/bench_dynamics.py --quick    # smoke mode (< 60 s)

Headline ratios, each measured against a reference timed in the same run
(interleaved rounds, best-of-N; medians are printed beside them):

1. ``gemm_fraction``: the batched simulation (``simulate_sample``) on runs that
   share one sample (1 seed × P configurations, so the per-step forward ``XΔ``
   and backward ``Xᵀr`` are matrix products with P columns), as a fraction of
   plain float32 ``torch.matmul`` of the same shapes. FLOPs counted: the 2 GEMMs
   of a step, ``2·n·d·P`` each; nothing else. The distinct-samples regime
   (S seeds, P = 1: matrix-vector work) is reported as a fraction of the
   measured copy bandwidth.
2. ``step_efficiency``: the bare floor of a batched DPO step (its two GEMMs and one
   elementwise pass, timed alone) over the measured step. ``loop_speedup`` (one
   batched call against a Python loop of per-run calls) is printed beside it; its
   ceiling is the loop's dispatch cost, which differs per machine.
3. ``flow_vs_sim``: ``population_descent`` against ``simulate_sample`` on
   n = 100,000 drawn samples of the same problem, same steps and ``eval_every``;
   beside it a sweep of 16 configurations (β, lr), each solver in one call
   (``population_descent_many`` against the simulation on the shared sample); plus
   how each cost grows with n, d and K.
4. ``objectives_min_gemm_fraction``: ratio 1 for every registered objective (its
   rows multiply the GEMM columns), the smallest of them.
5. The sampled RL estimators (``rlhf`` with ``estimator`` ``ppo`` or ``reinforce``,
   answers drawn in the timed step): ``ppo_gemm_fraction`` and
   ``reinforce_gemm_fraction``, ratio 1's method on the useful policy GEMMs of a
   step; ``ppo_batch_speedup``, one batched call over seeds × configurations against
   a loop of per-run calls; ``flow_vs_ppo``, PPO's wall time over the exact
   population flow's, each run until its policy stays within 5% of the optimum
   ``D* = Φ/β``.

The last line printed is ``bench_dynamics: gemm_fraction=F step_efficiency=E flow_vs_sim=R
objectives_min_gemm_fraction=G ppo_gemm_fraction=F reinforce_gemm_fraction=F
ppo_batch_speedup=S flow_vs_ppo=R`` (G: the smallest of every registered objective's
``gemm_fraction``, one line each in section 1). ``--only SECTION`` runs a part.
Only the library's public functions are timed; nothing here changes them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dynamics.analytic import (  # noqa: E402
    PopulationFlow,
    population_descent,
    population_descent_many,
)
from dynamics.model import reference_weights  # noqa: E402
from dynamics.objectives import OBJECTIVES  # noqa: E402
from dynamics.simulate import simulate_sample  # noqa: E402
from synthetic.mixture import population_mixture  # noqa: E402
from synthetic.problem import Problem, behaviors_with_angles  # noqa: E402
from synthetic.sampling import PreferenceSample, sample_batch  # noqa: E402
from timing import Contention, Quiet, best_of, fmt_t, no_stderr, now, table  # noqa: E402

TARGETS = {"gemm_fraction": 0.3, "step_efficiency": 0.6, "flow_vs_sim": 100.0,
           "objectives_min_gemm_fraction": 0.3}
PPO_KEYS = ("ppo_gemm_fraction", "reinforce_gemm_fraction", "ppo_batch_speedup", "flow_vs_ppo")
SECTIONS = ("gemm", "loop", "flow", "ppo")
NEVER = 10**9  # eval_every beyond the last step: metrics only at step 0 and the last step


# ----------------------------------------------------------------------------- timing helpers

QUIET = Quiet(0.0)


def interleave(tasks: dict, rounds: int) -> dict[str, np.ndarray]:
    """Run every task once per round (order alternating), return the wall times."""
    times = {name: [] for name in tasks}
    names = list(tasks)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            QUIET()
            t0 = now()
            tasks[name]()
            times[name].append(now() - t0)
    return {k: np.array(v) for k, v in times.items()}


class StepClock:
    """``progress`` hook of ``simulate_sample``: a timestamp after every step."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, _k: int) -> None:
        self.stamps.append(now())

    def median_step(self) -> float:
        return float(np.median(np.diff(self.stamps)))


def slope(xs, ys) -> float:
    """Log-log slope of ``ys`` against ``xs`` (least squares)."""
    return float(np.polyfit(np.log(np.asarray(xs, float)), np.log(np.asarray(ys, float)), 1)[0])


# ----------------------------------------------------------------------------- problems

def make_problem(dim: int, k: int) -> Problem:
    """K isotropic behaviors (σ = 1) with distinguishabilities 1..3 and pairwise cos 0.3."""
    deltas = np.linspace(3.0, 1.0, k) if k > 1 else np.array([2.0])
    return Problem(tuple(behaviors_with_angles(dim, deltas, 0.3)))


def objective_inputs(name: str, dim: int, vocab: int) -> dict:
    """What an objective needs besides the sample: a frozen reward head for the objectives
    on prompts (RL), a prompt's offset ``c`` for context distillation."""
    data = OBJECTIVES[name].data
    if data == "prompts":
        return {"reward_head": reward_head(dim, vocab)}
    if data == "context":
        return {"prompt_offset": np.random.default_rng(5).normal(size=dim) / np.sqrt(dim)}
    return {}


def reward_head(dim: int, vocab: int = 2, seed: int = 7) -> np.ndarray:
    """A frozen reward head ``Φ`` ``(V, d)`` for the objectives on prompts (``rlhf``): for
    two answers ``φ_Yes = −φ_No = ψ/2`` with ``‖ψ‖ = 1``, so the optimum ``D* = Φ/β`` moves
    the log-odds by ``ψᵀg/β``."""
    rng = np.random.default_rng(seed)
    if vocab == 2:
        psi = rng.normal(size=dim)
        psi /= np.linalg.norm(psi)
        return np.stack([psi / 2, -psi / 2])
    return rng.normal(size=(vocab, dim)) / np.sqrt(dim)


def one_run(data: PreferenceSample, i: int) -> PreferenceSample:
    """Seed ``i`` of a batched sample, kept batched (S = 1) as ``simulate_sample`` wants."""
    return PreferenceSample(data.features[i:i + 1], data.signs[i:i + 1],
                            data.true_signs[i:i + 1], data.behavior, data.names)


# ----------------------------------------------------------------------------- 0. machine

def machine(quick: bool) -> dict:
    size = 1024 if quick else 2048
    a, b = torch.randn(size, size), torch.randn(size, size)
    src = torch.randn((16 if quick else 32) * 2**20)
    dst = torch.empty_like(src)
    a @ b
    dst.copy_(src)
    t = interleave({"mm": lambda: a @ b, "copy": lambda: dst.copy_(src)}, 5)
    peak = 2 * size**3 / t["mm"].min()
    copy = 2 * src.numel() * 4 / t["copy"].min()
    print("=" * 78)
    print("bench_dynamics: prefdyn dynamics cost (THEORY §6)" + (" [--quick]" if quick else ""))
    print("=" * 78)
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs; torch.get_num_threads() = {torch.get_num_threads()} (default, "
          f"not changed), interop threads = {torch.get_num_interop_threads()}")
    print(f"float32 matmul {size}x{size}x{size}: {peak / 1e9:6.1f} GFLOP/s (best of 5)")
    print(f"tensor copy_ {src.numel() * 4 / 2**20:.0f} MiB: {copy / 1e9:6.1f} GB/s counting bytes "
          f"read + written (best of 5)")
    print("Timings: interleaved rounds; 'best' = best-of-N (interference only adds time), "
          "'med' = median.")
    return {"peak": peak, "copy": copy}


# ----------------------------------------------------------------------------- 1. GEMM fraction

def shared_sample_case(n: int, d: int, p: int, steps: int, rounds: int,
                       objective: str = "dpo") -> dict:
    """One seed × ``p`` configurations of ``objective``: its rows ``R`` (1 for the
    Yes − No difference, 2 for the two rows, V = 2 for every row) multiply the GEMMs'
    columns, so a step is 2 GEMMs of ``2·n·d·P·R`` FLOPs each."""
    problem = make_problem(d, 2)
    data = sample_batch(problem, n, [0])
    ref = reference_weights(d)
    rows = OBJECTIVES[objective].rows or ref.shape[0]
    beta = np.geomspace(0.1, 1.0, p)
    lr = np.geomspace(0.05, 0.5, p)[::-1].copy()
    extra = objective_inputs(objective, d, ref.shape[0])
    x2 = data.features[0]  # (n, d)
    dmat = 0.01 * torch.randn(d, p * rows)
    rmat = torch.randn(n, p * rows)
    clock = StepClock()

    def sim():
        clock.stamps.clear()
        simulate_sample(data, seeds=[0], beta=beta, lr=lr, steps=steps, reference=ref,
                        eval_every=NEVER, progress=clock, objective=objective, **extra)

    def gemm_pair():  # the two GEMMs of one step, plain 2-D matmul, best of 5
        return best_of(lambda: (torch.matmul(x2, dmat), torch.matmul(x2.T, rmat)), 5)

    pair_times = []
    step_medians = []

    def ref_task():
        pair_times.append(gemm_pair())

    def sim_task():
        sim()
        step_medians.append(clock.median_step())

    simulate_sample(data, seeds=[0], beta=beta, lr=lr, steps=2, reference=ref, eval_every=NEVER,
                    objective=objective, **extra)
    t = interleave({"sim": sim_task, "ref": ref_task}, rounds)
    flops_step = 2 * (2 * n * d * p * rows)
    sim_rate = steps * flops_step / t["sim"].min()
    sim_rate_med = steps * flops_step / np.median(t["sim"])
    step_rate = flops_step / min(step_medians)
    ref_rate = flops_step / min(pair_times)
    return dict(n=n, d=d, p=p, steps=steps, data=data, ref=ref, beta=beta, lr=lr,
                sim_rate=sim_rate, sim_rate_med=sim_rate_med, step_rate=step_rate,
                ref_rate=ref_rate, flops_step=flops_step, call=t["sim"].min())


def gemm_section(quick: bool, env: dict) -> float:
    print("\n" + "-" * 78)
    print("1. gemm_fraction: runs that SHARE a sample (1 seed x P configurations)")
    print("-" * 78)
    print("FLOP counting rule: per step, forward X@Delta and backward X^T@r, 2*n*d*P FLOPs each "
          "(4*n*d*P per step);\nelementwise work, metrics and setup are not counted (they are "
          "in the time).\nsimulate_sample(eval_every=%d > steps): metrics only at step 0 and the "
          "last step.\nReference: plain torch.matmul (n,d)@(d,P) and (d,n)@(n,P) in float32, "
          "timed in the same rounds." % NEVER)
    if quick:
        cases, steps, rounds = [(8000, 32, 64), (8000, 256, 64)], 8, 2
    else:
        cases, steps, rounds = [(20000, 32, 64), (20000, 128, 64), (20000, 256, 16),
                                (20000, 256, 64)], 30, 3
    results = [shared_sample_case(n, d, p, steps, rounds) for n, d, p in cases]
    rows = []
    for r in results:
        rows.append([r["n"], r["d"], r["p"], r["steps"], f"{r['ref_rate'] / 1e9:.1f}",
                     f"{r['sim_rate'] / 1e9:.1f}", f"{r['sim_rate_med'] / 1e9:.1f}",
                     f"{r['step_rate'] / 1e9:.1f}", f"{r['sim_rate'] / r['ref_rate']:.2f}",
                     f"{r['sim_rate'] / env['peak']:.2f}"])
    table("Shared-sample regime (GFLOP/s; 'call' = whole simulate_sample call incl. setup, "
          "'step' = median step via progress hook)",
          ["n", "d", "P", "steps", "matmul", "sim best", "sim med", "sim step", "fraction",
           "vs peak"], rows,
          "fraction = sim best / matmul of the same shapes (headline); vs peak = sim best / "
          "square matmul above.")
    head = max(results, key=lambda r: r["n"] * r["d"] * r["p"])
    fraction = head["sim_rate"] / head["ref_rate"]

    # The same configuration with metrics at every step.
    steps1 = 3 if quick else 5
    data, ref = head["data"], head["ref"]
    QUIET()
    t1 = best_of(lambda: simulate_sample(data, seeds=[0], beta=head["beta"], lr=head["lr"],
                                         steps=steps1, reference=ref, eval_every=1),
                 2)
    rate1 = steps1 * head["flops_step"] / t1
    print(f"\nHeadline case n={head['n']} d={head['d']} P={head['p']}: fraction = "
          f"{fraction:.2f} (target >= {TARGETS['gemm_fraction']}).")
    print(f"Same case with eval_every=1 (6 metrics x K behaviors at every step), {steps1} steps: "
          f"{rate1 / 1e9:.1f} GFLOP/s = {rate1 / head['ref_rate']:.2f} of matmul; "
          f"{fmt_t(t1 / steps1)}/step vs {fmt_t(head['call'] / head['steps'])}"
          f"/step with metrics off the hot path.")
    del head["data"]

    # Every registered objective in the same regime (one line each).
    n_o, d_o, p_o = head["n"], head["d"], head["p"]
    objective_rows, fractions = [], {}
    for name in OBJECTIVES:
        o = shared_sample_case(n_o, d_o, p_o, steps, 2 if quick else 3, objective=name)
        fractions[name] = o["sim_rate"] / o["ref_rate"]
        objective_rows.append([name, OBJECTIVES[name].view, OBJECTIVES[name].rows or 2,
                               f"{o['ref_rate'] / 1e9:.1f}", f"{o['sim_rate'] / 1e9:.1f}",
                               f"{fractions[name]:.2f}"])
        del o["data"]
    table(f"Every objective, shared sample n={n_o} d={d_o} P={p_o} ({steps} steps)",
          ["objective", "view", "rows R", "matmul", "sim best", "fraction"], objective_rows,
          "GEMM columns P·R; fraction = sim / matmul of the same shapes (objectives_min_"
          "gemm_fraction is the smallest).")
    objectives_min = min(fractions.values())

    # Distinct samples: S seeds, P = 1.
    s, n, d, steps = (8, 4096, 64, 5) if quick else (32, 8192, 64, 15)
    problem = make_problem(d, 2)
    data = sample_batch(problem, n, list(range(s)))
    ref = reference_weights(d)
    x = data.features
    dvec, rvec = 0.01 * torch.randn(s, d, 1), torch.randn(s, n, 1)
    src = torch.randn(16 * 2**20)
    dst = torch.empty_like(src)

    def sim():
        simulate_sample(data, seeds=list(range(s)), beta=0.5, lr=0.2, steps=steps,
                        reference=ref, eval_every=NEVER)

    sim()
    bmm_t, row_t, copy_t = [], [], []
    t = interleave({
        "sim": sim,
        "bmm": lambda: bmm_t.append(best_of(lambda: (x @ dvec, x.transpose(1, 2) @ rvec), 3)),
        "rows": lambda: row_t.append(best_of(lambda: ((dvec.mT @ x.mT).mT, (rvec.mT @ x).mT), 3)),
        "copy": lambda: copy_t.append(best_of(lambda: dst.copy_(src), 3)),
    }, rounds)
    bytes_step = 2 * s * n * d * 4
    copy_bw = 2 * src.numel() * 4 / min(copy_t)
    bmm_bw = bytes_step / min(bmm_t)
    row_bw = bytes_step / min(row_t)
    sim_bw = steps * bytes_step / t["sim"].min()
    table(f"Distinct-samples regime: S={s} seeds x P=1, n={n}, d={d} (X = "
          f"{s * n * d * 4 / 2**20:.0f} MiB), {steps} steps",
          ["what", "GB/s", "GFLOP/s", "of copy BW"],
          [["tensor copy_ (read+write)", f"{copy_bw / 1e9:.1f}", "-", "1.00"],
           ["bmm X@v + X^T@r alone", f"{bmm_bw / 1e9:.1f}",
            f"{bmm_bw / 2 / 1e9:.1f}", f"{bmm_bw / copy_bw:.2f}"],
           ["same, runs as rows: (D^T X^T)^T, (r^T X)^T", f"{row_bw / 1e9:.1f}",
            f"{row_bw / 2 / 1e9:.1f}", f"{row_bw / copy_bw:.2f}"],
           ["simulate_sample (call)", f"{sim_bw / 1e9:.1f}", f"{sim_bw / 2 / 1e9:.1f}",
            f"{sim_bw / copy_bw:.2f}"]],
          "Bytes counted: X read twice per step (forward and backward), 2*S*n*d*4 B; "
          "FLOPs = 4*S*n*d per step\n(2 FLOPs per 4 bytes). Copy bandwidth counts bytes read "
          "+ written, measured in the same rounds.\nThe 'runs as rows' line computes the same "
          "products with the run axis as the matrix rows (the layout\nsimulate_sample uses) and "
          "nothing else: the ceiling torch reaches for this regime on this machine.")
    return fraction, objectives_min


# ----------------------------------------------------------------------------- 2. loop speed-up

def loop_case(n, d, s, p, steps, *, runs_timed=None, rounds=None):
    """Batched call vs the per-run loop. ``runs_timed``: time only that many loop runs
    (seed 0's configurations) and extrapolate; otherwise all runs, interleaved per seed."""
    problem = make_problem(d, 2)
    seeds = list(range(s))
    data = sample_batch(problem, n, seeds)
    ref = reference_weights(d)
    grid_b, grid_l = np.meshgrid(np.geomspace(0.1, 1.0, 4), np.geomspace(0.05, 0.4, 4))
    beta = np.resize(grid_b.ravel(), p)
    lr = np.resize(grid_l.ravel(), p)
    singles = [one_run(data, i) for i in range(s)]

    def batch():
        return simulate_sample(data, seeds=seeds, beta=beta, lr=lr, steps=steps, reference=ref,
                               eval_every=steps)

    def single(i, j):
        return simulate_sample(singles[i], seeds=[seeds[i]], beta=float(beta[j]),
                               lr=float(lr[j]), steps=steps, reference=ref, eval_every=steps)

    single(0, 0)
    simulate_sample(data, seeds=seeds, beta=beta, lr=lr, steps=2, reference=ref, eval_every=2)
    if runs_timed is not None:
        runs = [(0, j) for j in range(min(runs_timed, p))]
        per_run, batch_t = [], []
        for _ in range(rounds):
            QUIET()
            for i, j in runs:
                t0 = now()
                single(i, j)
                per_run.append(now() - t0)
            QUIET()
            t0 = now()
            batch()
            batch_t.append(now() - t0)
        loop_best = s * p * min(per_run)
        loop_med = s * p * float(np.median(per_run))
        return dict(loop_best=loop_best, loop_med=loop_med, batch_best=min(batch_t),
                    batch_med=float(np.median(batch_t)), runs=s * p, steps=steps)

    chunks, batch_t, finals, losses = [], [], {}, {}
    result = None
    for i in range(s):
        QUIET()
        t0 = now()
        for j in range(p):
            res = single(i, j)
            finals[i, j] = res.final[0, 0]
            losses[i, j] = res.per_behavior["loss"][:, 0, 0, :]
        chunks.append(now() - t0)
        QUIET()
        t0 = now()
        result = batch()
        batch_t.append(now() - t0)
    final_b = result.final  # (S, P, d)
    diff = max(float((final_b[i, j] - finals[i, j]).abs().max()) for i, j in finals)
    scale = float(final_b.abs().max())
    loss_diff = max(float(np.abs(result.per_behavior["loss"][:, i, j, :] - losses[i, j]).max())
                    for i, j in losses)
    chunks = np.array(chunks)
    return dict(loop_best=s * chunks.min(), loop_med=s * float(np.median(chunks)),
                loop_total=float(chunks.sum()), batch_best=min(batch_t),
                batch_med=float(np.median(batch_t)), runs=s * p, steps=steps,
                diff=diff, scale=scale, loss_diff=loss_diff, data=data, ref=ref, beta=beta,
                lr=lr, seeds=seeds, singles=singles)


def step_floor(data: PreferenceSample, p: int, reps: int = 20) -> dict:
    """Bare cost of one batched step's unavoidable parts on ``data`` with ``p`` runs per
    seed: the forward and backward GEMMs (into preallocated outputs) and one in-place
    sigmoid over the (S, P, n) margins, each best of 5 × ``reps``, in seconds per step."""
    xs = data.features * data.signs[..., None]
    phi = torch.randn(xs.shape[0], p, xs.shape[2]) * 0.1
    margins = torch.empty(xs.shape[0], p, xs.shape[1])

    def gemms():
        for _ in range(reps):
            torch.bmm(phi, xs.transpose(1, 2), out=margins)
            phi.baddbmm_(margins, xs, alpha=0.0)  # alpha 0: same work, phi unchanged

    def sigmoid():
        for _ in range(reps):
            margins.sigmoid_()

    QUIET()
    return dict(gemm=best_of(gemms, 5) / reps, sigmoid=best_of(sigmoid, 5) / reps)


def profile_split(fn) -> dict:
    """Self CPU time of the aten ops of one call, split into GEMM and the rest."""
    from torch.profiler import ProfilerActivity, profile

    QUIET()
    # kineto prints profiler_start/stop lines on fd 2: keep them out
    with no_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = now()
        fn()
        wall = now() - t0
    gemm = other = 0.0
    calls_gemm = calls_other = 0
    per_op = {}
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        us = ev.self_cpu_time_total
        if us <= 0:
            continue
        per_op[ev.key] = per_op.get(ev.key, 0.0) + us
        if ev.key in ("aten::bmm", "aten::mm", "aten::addmm", "aten::baddbmm", "aten::baddbmm_",
                      "aten::mv"):
            gemm += us
            calls_gemm += ev.count
        else:
            other += us
            calls_other += ev.count
    return dict(wall=wall, gemm=gemm * 1e-6, other=other * 1e-6, calls_gemm=calls_gemm,
                calls_other=calls_other, per_op=per_op)


def loop_section(quick: bool, env: dict) -> float:
    print("\n" + "-" * 78)
    print("2. loop_speedup: one batched simulate_sample call vs a Python loop of per-run calls")
    print("-" * 78)
    # Headline: a parameter sweep of many small runs, the case batching is for
    # (e.g. a phase diagram); the table below shows how the ratio falls as each
    # run carries more arithmetic of its own.
    if quick:
        n, d, s, p, steps = 500, 16, 8, 8, 50
    else:
        n, d, s, p, steps = 500, 16, 32, 32, 200
    print(f"Workload: {s} seeds x {p} configurations (beta x lr grid) = {s * p} runs, n={n}, "
          f"d={d}, K=2, {steps} full-batch steps, eval_every={steps} (metrics at step 0 and the "
          f"end).\nLoop: simulate_sample once per run on that seed's sample (S=1) with one "
          f"(beta, lr). Rounds: per seed,\nthe {p} loop runs of that seed, then one batched call "
          f"({s} rounds); loop estimate = {s} x (time of one seed's runs).")
    r = loop_case(n, d, s, p, steps)
    speed_best = r["loop_best"] / r["batch_best"]
    speed_med = r["loop_med"] / r["batch_med"]
    runs, st = r["runs"], r["steps"]
    table("Loop vs batch",
          ["", "loop", "batched", "speed-up"],
          [["best of rounds", fmt_t(r["loop_best"]), fmt_t(r["batch_best"]), f"{speed_best:.1f}x"],
           ["median of rounds", fmt_t(r["loop_med"]), fmt_t(r["batch_med"]), f"{speed_med:.1f}x"],
           ["per run-step (best)", fmt_t(r["loop_best"] / runs / st),
            fmt_t(r["batch_best"] / runs / st), ""]],
          f"Loop wall time as run (all {runs} runs once): {r['loop_total']:.2f} s.")
    print(f"Sanity, loop vs batch: max |Delta_loop - Delta_batch| = {r['diff']:.2e} "
          f"(max |Delta| = {r['scale']:.2f}); max |loss difference| = {r['loss_diff']:.2e}.")

    # Where the time goes: aten self time of one batched call and of one loop run.
    pst = 10 if quick else 30
    data, ref = r["data"], r["ref"]
    pb = profile_split(lambda: simulate_sample(data, seeds=r["seeds"], beta=r["beta"],
                                               lr=r["lr"], steps=pst, reference=ref,
                                               eval_every=NEVER))
    pl = profile_split(lambda: simulate_sample(r["singles"][0], seeds=[0], beta=0.5, lr=0.1,
                                               steps=pst, reference=ref, eval_every=NEVER))
    rows = []
    for name, pr, nruns in (("batched", pb, runs), ("one loop run", pl, 1)):
        rest = pr["wall"] - pr["gemm"] - pr["other"]
        rows.append([name, fmt_t(pr["wall"] / pst), fmt_t(pr["gemm"] / pst),
                     fmt_t(pr["other"] / pst), fmt_t(max(rest, 0) / pst),
                     f"{(pr['calls_gemm'] + pr['calls_other']) / pst:.0f}",
                     fmt_t(pr["wall"] / pst / nruns)])
    table(f"Where the time goes (torch.profiler, {pst} steps, per step; profiler overhead "
          "inflates small ops)",
          ["call", "wall", "GEMM (bmm)", "other aten", "python+dispatch", "aten ops",
           "per run-step"], rows,
          "GEMM = aten::bmm/mm self time; other aten = elementwise ops, copies, setup and the "
          "2 metric evaluations;\npython+dispatch = wall - aten self time.")
    loop_step = r["loop_best"] / runs / st
    gemm_step = pb["gemm"] / pst / runs
    print(f"  Bound: even if the batched call cost only its GEMMs ({fmt_t(gemm_step)} per "
          f"run-step), the speed-up over the loop\n  ({fmt_t(loop_step)} per run-step) "
          f"would be {loop_step / gemm_step:.1f}x at this workload.")
    top = sorted(pb["per_op"].items(), key=lambda kv: -kv[1])[:6]
    print("  batched call, top aten ops by self time (per step): " + ", ".join(
        f"{k[6:]} {fmt_t(v * 1e-6 / pst)}" for k, v in top))
    floor = step_floor(data, p)
    ceiling = loop_step / ((floor["gemm"] + floor["sigmoid"]) / runs)
    step_clock = StepClock()
    QUIET()
    simulate_sample(data, seeds=r["seeds"], beta=r["beta"], lr=r["lr"], steps=st,
                    reference=ref, eval_every=NEVER, progress=step_clock)
    measured_step = step_clock.median_step()
    efficiency = (floor["gemm"] + floor["sigmoid"]) / measured_step
    gemm_rate = 4 * data.features.shape[1] * data.features.shape[2] * runs / floor["gemm"]
    print(f"  Floor of a batched step, timed bare (no profiler, best of 5 x 20): the 2 GEMMs "
          f"{fmt_t(floor['gemm'] / runs)} per run-step\n  ({gemm_rate / 1e9:.0f} GFLOP/s = "
          f"{gemm_rate / env['peak']:.2f} of the square matmul) + one sigmoid over the margins "
          f"{fmt_t(floor['sigmoid'] / runs)};\n  a batched step with nothing else (a perfect "
          f"fusion) would put the speed-up at {ceiling:.1f}x. Measured batched run-step: "
          f"{fmt_t(r['batch_best'] / runs / st)}.")
    print(f"\nHeadline: step_efficiency = {efficiency:.2f} = that floor "
          f"({fmt_t(floor['gemm'] + floor['sigmoid'])}) / the measured batched step "
          f"({fmt_t(measured_step)}, median via the progress hook; target >= "
          f"{TARGETS['step_efficiency']}).")
    for key in ("data", "singles"):
        del r[key]

    # Other workloads (loop timed on seed 0's runs and extrapolated).
    if quick:
        others = [(500, 16, 4, 4, 30)]
    else:
        # smaller runs first: the ratio is dispatch against arithmetic, so it grows as
        # n·d shrinks; the table shows where it crosses the target
        others = [(100, 4, 16, 16, 100), (200, 8, 16, 16, 100), (500, 16, 16, 16, 100),
                  (1000, 32, 16, 16, 100), (2000, 32, 16, 16, 100), (2000, 32, 4, 64, 100)]
    rows = []
    for n2, d2, s2, p2, st2 in others:
        o = loop_case(n2, d2, s2, p2, st2, runs_timed=min(p2, 16), rounds=2)
        rows.append([n2, d2, f"{s2}x{p2}", st2, fmt_t(o["loop_best"] / o["runs"] / st2),
                     fmt_t(o["batch_best"] / o["runs"] / st2),
                     f"{o['loop_best'] / o['batch_best']:.1f}x",
                     f"{o['loop_med'] / o['batch_med']:.1f}x"])
    table("Speed-up across workloads (loop time extrapolated from seed 0's runs, 2 rounds)",
          ["n", "d", "SxP", "steps", "loop/run-step", "batch/run-step", "best", "median"], rows)
    print(f"\nloop_speedup = {speed_best:.1f}x (best of rounds; informational: its ceiling is "
          f"the loop's per-call dispatch,\nwhich differs per machine; step_efficiency is the "
          f"target).")
    return speed_best, efficiency


# ----------------------------------------------------------------------------- 3. flow vs sim

def flow_parts(d: int, k: int, drift_steps: int, repeat: int) -> dict:
    """Per-step drift, per-evaluation metrics and construction of the population flow."""
    mix = population_mixture(make_problem(d, k))
    ref = reference_weights(d)
    QUIET()
    t0 = now()
    flow = PopulationFlow(mix, beta=0.5, reference=ref)
    init = now() - t0
    init = min(init, best_of(lambda: PopulationFlow(mix, beta=0.5, reference=ref), repeat - 1)
               if repeat > 1 else init)

    def descend(steps):
        return population_descent(mix, beta=0.5, lr=0.5, steps=steps, reference=ref,
                                  eval_every=NEVER)

    delta = descend(drift_steps).deltas[-1]
    QUIET()
    # a step of population_descent's own loop: the call's time with drift_steps + 1 steps
    # less its time with 1 (set-up and the two evaluations cancel), best of repeat each
    drift = (best_of(lambda: descend(drift_steps + 1), 2 * repeat)
             - best_of(lambda: descend(1), 2 * repeat)) / drift_steps
    metrics = best_of(lambda: flow.metrics(delta), repeat)
    return dict(init=init, drift=max(drift, 0.0), metrics=metrics, components=len(mix.weights))


_SAMPLES: dict = {}


def sim_step(n: int, d: int, k: int, steps: int, repeat: int) -> float:
    """Median time of one simulate_sample step (1 seed, 1 configuration), best of calls."""
    if (n, d, k) not in _SAMPLES:
        _SAMPLES[n, d, k] = sample_batch(make_problem(d, k), n, [0])
    data = _SAMPLES[n, d, k]
    ref = reference_weights(d)
    out = []
    for _ in range(repeat):
        QUIET()
        clock = StepClock()
        simulate_sample(data, seeds=[0], beta=0.5, lr=0.5, steps=steps, reference=ref,
                        eval_every=NEVER, progress=clock)
        out.append(clock.median_step())
    return min(out)


def flow_section(quick: bool) -> float:
    print("\n" + "-" * 78)
    print("3. flow_vs_sim: population_descent vs simulate_sample on n = 100,000 samples")
    print("-" * 78)
    # Headline problem d = 128: below it the flow's step is bound by per-operation
    # dispatch (~0.1 ms whatever the size), see the growth table for d = 16..256.
    d, k, n = 128, 3, 100_000
    steps = 50 if quick else 300
    rounds = 2 if quick else 3
    beta, lr = 0.5, 0.5
    problem = make_problem(d, k)
    mix = population_mixture(problem)
    ref = reference_weights(d)
    t0 = now()
    data = sample_batch(problem, n, [0])
    t_sample = now() - t0
    probe = PopulationFlow(mix, beta=beta, reference=ref)
    nodes = (f"adaptive projection quadrature ({probe.family.projection_rule(1.0)[0].size} nodes "
             "per component near the reference)")
    qmc = ("two answers: the metrics are quadrature too, no QMC points" if probe.two_answers
           else f"qmc_points={probe.qmc_points} in the metrics")
    print(f"Problem: K={k} isotropic behaviors (distinguishability 3, 2, 1; pairwise cos 0.3), "
          f"d={d}, Gaussian, {len(mix.weights)} mixture components;\nbeta={beta}, lr={lr}, "
          f"{steps} steps, 1 seed x 1 configuration. population_descent defaults: {nodes},\n"
          f"{qmc}. The simulation's sample is drawn once\n(sample_batch: {t_sample:.2f} s, not in "
          f"the simulation's time below).")

    def sim(every, st=steps):
        return simulate_sample(data, seeds=[0], beta=beta, lr=lr, steps=st, reference=ref,
                               eval_every=every)

    def flow(every, st=steps):
        return population_descent(mix, beta=beta, lr=lr, steps=st, reference=ref,
                                  eval_every=every)

    sim(NEVER, 2)
    flow(NEVER, 2)
    clock = StepClock()
    t_main = interleave({"sim": lambda: simulate_sample(
        data, seeds=[0], beta=beta, lr=lr, steps=steps, reference=ref, eval_every=steps,
        progress=clock), "flow": lambda: flow(steps)}, rounds)
    sim_step_t = float(np.median(np.diff(clock.stamps[-steps:])))
    # The flow's call in use (a sweep, a figure): back to back, caches and threads warm.
    # Each timed call above follows the quiet-wait's sleep, and a call of a few ms
    # pays for waking up (cold caches, the thread pool) there; this one does not.
    batch = 10 if quick else 20
    warm = min(best_of(lambda: [flow(steps) for _ in range(batch)], 1) / batch
               for _ in range(rounds))
    every10 = 10
    t_10 = interleave({"sim": lambda: sim(every10), "flow": lambda: flow(every10)},
                      1 if quick else 2)
    st1 = 10 if quick else 30
    t_1 = interleave({"sim": lambda: sim(1, st1), "flow": lambda: flow(1, st1)},
                     1 if quick else 2)
    parts = flow_parts(d, k, 50 if quick else 200, 3)

    res_s, res_f = sim(steps), flow(steps)
    dsim = res_s.final[0, 0].double().numpy()
    dflow = res_f.deltas[-1]
    agree = np.linalg.norm(dsim - dflow) / np.linalg.norm(dflow)
    loss_gap = np.abs(res_s.per_behavior["loss"][-1, 0, 0] - res_f.per_behavior["loss"][-1]).max()

    single = t_main["sim"].min() / t_main["flow"].min()
    # A sweep of P configurations (β, lr zipped), each solver in one call: the
    # simulation on the one shared sample (GEMMs with P columns), the flow stepping
    # every configuration at once (population_descent_many).
    p_sweep = 16
    betas = np.geomspace(0.2, 2.0, p_sweep)
    lrs = np.full(p_sweep, lr)
    t_many = interleave({
        "sim": lambda: simulate_sample(data, seeds=[0], beta=betas, lr=lrs, steps=steps,
                                       reference=ref, eval_every=steps),
        "flow": lambda: population_descent_many(mix, beta=betas, lr=lrs, steps=steps,
                                                reference=ref, eval_every=steps)}, rounds)
    sweep_ratio = t_many["sim"].min() / t_many["flow"].min()
    ratio = single
    rows = [
        [f"{p_sweep} configurations, one call each", steps, fmt_t(t_many["sim"].min()),
         fmt_t(t_many["flow"].min()), f"{sweep_ratio:.1f}x",
         f"{np.median(t_many['sim']) / np.median(t_many['flow']):.1f}x"],
        [f"eval_every={steps} (metrics at 0, {steps})", steps, fmt_t(t_main["sim"].min()),
         fmt_t(t_main["flow"].min()), f"{single:.1f}x",
         f"{np.median(t_main['sim']) / np.median(t_main['flow']):.1f}x"],
        [f"eval_every={steps}, flow back to back", steps, fmt_t(t_main["sim"].min()),
         fmt_t(warm), f"{t_main['sim'].min() / warm:.1f}x", "-"],
        [f"eval_every={every10}", steps, fmt_t(t_10["sim"].min()), fmt_t(t_10["flow"].min()),
         f"{t_10['sim'].min() / t_10['flow'].min():.1f}x", "-"],
        ["eval_every=1", st1, fmt_t(t_1["sim"].min()), fmt_t(t_1["flow"].min()),
         f"{t_1['sim'].min() / t_1['flow'].min():.1f}x", "-"],
        [f"eval_every={steps}, sim incl. sampling", steps,
         fmt_t(t_main["sim"].min() + t_sample), fmt_t(t_main["flow"].min()),
         f"{(t_main['sim'].min() + t_sample) / t_main['flow'].min():.1f}x", "-"],
    ]
    table("Whole calls (simulate_sample on the drawn sample vs population_descent)",
          ["", "steps", "sim (best)", "flow (best)", "sim/flow", "med/med"], rows,
          f"Each call is timed alone after the quiet-wait, so the flow's few ms include waking "
          f"up;\n'back to back' is its time per call in a run of {batch} (best of {rounds}), "
          f"as in a sweep or a figure.")
    table("Components (per step / per evaluation)",
          ["part", "simulation n=1e5", "population flow"],
          [["one training step", fmt_t(sim_step_t), fmt_t(parts["drift"]) + " (descent step)"],
           ["one metrics evaluation",
            fmt_t(max(t_1["sim"].min() / (st1 + 1) - sim_step_t, 0)) + " (est.)",
            fmt_t(parts["metrics"]) + " (quadrature + closed forms)"],
           ["setup", "(sample drawn: " + fmt_t(t_sample) + ")",
            fmt_t(parts["init"]) + " (PopulationFlow)"],
           ["step ratio sim/flow", f"{sim_step_t / parts['drift']:.1f}x", ""]],
          "Simulation step: median interval of the progress hook; metrics estimate = "
          "eval_every=1 call / (steps+1) - step.")
    print(f"Agreement (sanity): ||Delta_sim - Delta_flow|| / ||Delta_flow|| = {agree:.2e} at "
          f"step {steps}; max |loss_sim - loss_flow| = {loss_gap:.2e} (finite-sample noise).")

    # Growth with n, d, K.
    base_n, base_d, base_k = (10_000 if quick else 100_000), 64, 3
    st, rep = (6, 1) if quick else (12, 2)
    ns = [1_000, 10_000] if quick else [1_000, 10_000, 100_000]
    ds = [16, 64] if quick else [16, 64, 256]
    ks = [1, 3] if quick else [1, 3, 9]
    fsteps, frep = (30, 2) if quick else (100, 2)
    rows = []
    base_flow = flow_parts(base_d, base_k, fsteps, frep)
    groups = {}
    for axis, values in (("n", ns), ("d", ds), ("K", ks)):
        sims, drifts, mets, inits = [], [], [], []
        for v in values:
            nn, dd, kk = (v if axis == "n" else base_n, v if axis == "d" else base_d,
                          v if axis == "K" else base_k)
            s_t = sim_step(nn, dd, kk, st, rep)
            fp = base_flow if (dd, kk) == (base_d, base_k) else flow_parts(dd, kk, fsteps, frep)
            sims.append(s_t)
            drifts.append(fp["drift"])
            mets.append(fp["metrics"])
            inits.append(fp["init"])
            rows.append([axis, nn, dd, kk, fp["components"], fmt_t(s_t), fmt_t(fp["drift"]),
                         fmt_t(fp["metrics"]), fmt_t(fp["init"]), f"{s_t / fp['drift']:.1f}x"])
        groups[axis] = (values, sims, drifts, mets, inits)
        rows.append([f"slope in {axis}", "", "", "", "", f"{slope(values, sims):+.2f}",
                     f"{slope(values, drifts):+.2f}", f"{slope(values, mets):+.2f}",
                     f"{slope(values, inits):+.2f}", ""])
    table(f"Cost growth (base n={base_n}, d={base_d}, K={base_k}; 1 seed x 1 config; times per "
          "step / per evaluation / per construction)",
          ["vary", "n", "d", "K", "C", "sim step", "flow drift", "flow metrics", "flow init",
           "step ratio"], rows,
          "slope = fitted log-log exponent of the column against the varied quantity. The flow "
          "does not take n: its\ncolumns repeat the base case. C = mixture components "
          "(2 per behavior without label noise).")
    print(f"\nHeadline: flow_vs_sim = {ratio:.1f}x for one configuration at eval_every={steps} "
          f"(best of rounds; target >= {TARGETS['flow_vs_sim']:.0f}x).\nA sweep of {p_sweep} "
          f"configurations, each solver in one call (the simulation's GEMMs gain P columns, the "
          f"flow\nsteps them together: population_descent_many): {sweep_ratio:.1f}x.")
    return ratio


# ----------------------------------------------------------------------------- 4. PPO, REINFORCE

PPO = {"estimator": "ppo", "ppo_epochs": 4, "num_minibatches": 4}
REINFORCE = {"estimator": "reinforce"}


def rl(hyper: dict) -> dict:
    return {"name": "rlhf", **hyper}


def policy_gemms(hyper: dict) -> tuple[int, int]:
    """``(epochs, minibatches)`` of a step: its useful policy GEMMs are the rollout's
    forward over the B prompts and, per update, a forward and a backward over the
    minibatch, i.e. ``1 + 2·epochs`` GEMMs of ``2·B·d·P·V`` FLOPs each. REINFORCE's one
    update uses the rollout's forward (same weights), so it needs 2, not 3."""
    if hyper["estimator"] == "ppo":
        return hyper["ppo_epochs"], hyper["num_minibatches"]
    return 1, 1


def rollout_case(n: int, d: int, p: int, steps: int, rounds: int, hyper: dict) -> dict:
    """One seed × ``p`` configurations of ``rlhf`` with a sampled estimator on the whole
    sample (``rollout_size = 0``), V = 2; ``rate`` counts only the useful policy GEMMs
    (:func:`policy_gemms`), the reference is plain ``matmul`` of those shapes."""
    data = sample_batch(make_problem(d, 2), n, [0])
    ref = reference_weights(d)
    head = reward_head(d)
    cols = p * ref.shape[0]
    beta = np.geomspace(0.5, 2.0, p)
    lr = np.geomspace(0.01, 0.1, p)[::-1].copy()
    epochs, parts = policy_gemms(hyper)
    size = n // parts
    x = data.features[0]  # (n, d)
    dmat, back = 0.01 * torch.randn(d, cols), torch.randn(n, cols)
    clock = StepClock()

    def sim():
        clock.stamps.clear()
        simulate_sample(data, seeds=[0], beta=beta, lr=lr, steps=steps, reference=ref,
                        eval_every=NEVER, progress=clock, objective=rl(hyper), reward_head=head)

    def gemms():  # the useful policy GEMMs of one step, plain 2-D matmul
        torch.matmul(x, dmat)  # the rollout's forward
        if epochs * parts == 1:
            torch.matmul(x.T, back)
            return
        for _ in range(epochs * parts):
            torch.matmul(x[:size], dmat)
            torch.matmul(x[:size].T, back[:size])

    ref_times, step_medians = [], []
    sim()
    t = interleave({"sim": lambda: (sim(), step_medians.append(clock.median_step())),
                    "ref": lambda: ref_times.append(best_of(gemms, 3))}, rounds)
    flops_step = (1 + (2 * epochs if epochs * parts > 1 else 1)) * 2 * n * d * cols
    return dict(n=n, d=d, p=p, cols=cols, steps=steps, hyper=hyper, flops=flops_step,
                sim_rate=steps * flops_step / t["sim"].min(),
                sim_rate_med=steps * flops_step / np.median(t["sim"]),
                step_rate=flops_step / min(step_medians), ref_rate=flops_step / min(ref_times),
                step=min(step_medians), call=t["sim"].min(),
                run=lambda st: simulate_sample(data, seeds=[0], beta=beta, lr=lr, steps=st,
                                               reference=ref, eval_every=NEVER,
                                               objective=rl(hyper), reward_head=head))


def rollout_loop_case(n, d, s, p, steps, hyper, *, runs_timed: int, rounds: int) -> dict:
    """One batched call (``s`` seeds × ``p`` configurations) against a loop of per-run
    calls; the loop is timed on seed 0's first ``runs_timed`` runs and extrapolated to
    all ``s·p`` (every run does the same work)."""
    seeds = list(range(s))
    data = sample_batch(make_problem(d, 2), n, seeds)
    ref, head = reference_weights(d), reward_head(d)
    grid_b, grid_l = np.meshgrid(np.geomspace(0.5, 2.0, 4), np.geomspace(0.02, 0.1, 4))
    beta, lr = np.resize(grid_b.ravel(), p), np.resize(grid_l.ravel(), p)
    singles = [one_run(data, i) for i in range(s)]
    common = dict(steps=steps, reference=ref, eval_every=steps, objective=rl(hyper),
                  reward_head=head)

    def batch(b=beta, r=lr):
        return simulate_sample(data, seeds=seeds, beta=b, lr=r, **common)

    def single(i, j):
        return simulate_sample(singles[i], seeds=[i], beta=float(beta[j]), lr=float(lr[j]),
                               **common)

    single(0, 0)
    batch()
    per_run, batch_t = [], []
    for _ in range(rounds):
        QUIET()
        for j in range(runs_timed):
            t0 = now()
            single(0, j)
            per_run.append(now() - t0)
        QUIET()
        t0 = now()
        batch()
        batch_t.append(now() - t0)
    # Sanity: every seed's generator draws the same prompts, answers and permutations
    # alone as in a batch over seeds (one configuration), so the runs agree.
    alone = torch.stack([single(i, 0).final[0, 0] for i in seeds])
    together = batch(beta[:1], lr[:1]).final[:, 0]
    runs = s * p
    return dict(loop_best=runs * min(per_run), loop_med=runs * float(np.median(per_run)),
                batch_best=min(batch_t), batch_med=float(np.median(batch_t)), runs=runs,
                steps=steps, diff=float((alone - together).abs().max()),
                scale=float(together.abs().max()))


def settled(errors: np.ndarray, tol: float) -> int | None:
    """The first step from which every run's error stays ``<= tol`` to the horizon,
    ``errors`` ``(E, runs)`` at steps ``0..E−1``; None if it never settles."""
    ok = (errors <= tol).all(1)
    if not ok[-1]:
        return None
    bad = np.flatnonzero(~ok)
    return int(bad[-1] + 1) if len(bad) else 0


def flow_vs_ppo_case(quick: bool) -> dict:
    """Steps and time the exact population flow and the sampled estimators need to
    bring the policy within ``tol`` of the optimum ``D* = Φ/β`` (the log-odds change
    ``D_Yes − D_No`` against ``ψ/β``, relative error), each at the fastest ``lr`` of a
    small grid; the sampled runs must stay within ``tol`` on all 4 seeds."""
    d, k, n, beta, tol = 16, 2, 4096, 1.0, 0.05
    horizon_flow, horizon_sim = 60, (25 if quick else 40)
    problem = make_problem(d, k)
    mix = population_mixture(problem)
    ref, head = reference_weights(d), reward_head(d)
    target = (head[0] - head[1]) / beta

    def error(deltas):  # (..., 2, d) -> (...)
        return np.linalg.norm(deltas[..., 0, :] - deltas[..., 1, :] - target, axis=-1) / (
            np.linalg.norm(target))

    grids = {"flow": [0.5, 1.0, 2.0, 4.0], "ppo": [0.05, 0.1, 0.2],
             "reinforce": [0.5, 1.0, 2.0]}
    chosen = {}
    for lr in grids["flow"]:
        path = population_descent(mix, beta=beta, lr=lr, steps=horizon_flow, reference=ref,
                                  objective="rlhf", reward_head=head, eval_every=1)
        got = settled(error(path.deltas)[:, None], tol)
        if got is not None and got < chosen.get("flow", (None, np.inf))[1]:
            chosen["flow"] = (lr, got)
    seeds = [0, 1, 2, 3]
    t0 = now()
    data = sample_batch(problem, n, seeds)
    t_sample = (now() - t0) / len(seeds)
    for name, hyper in (("ppo", PPO), ("reinforce", REINFORCE)):
        lrs = np.array(grids[name])
        res = simulate_sample(data, seeds=seeds, beta=beta, lr=lrs, steps=horizon_sim,
                              reference=ref, eval_every=1, keep_deltas=True,
                              objective=rl(hyper), reward_head=head)
        errs = error(res.deltas.double().numpy())  # (E, S, P)
        for j, lr in enumerate(lrs):
            got = settled(errs[:, :, j], tol)
            if got is not None and got < chosen.get(name, (None, np.inf))[1]:
                chosen[name] = (float(lr), got)
    one = one_run(data, 0)

    def task(name):
        lr, steps = chosen[name]
        steps = max(steps, 1)
        if name == "flow":
            return lambda: population_descent(mix, beta=beta, lr=lr, steps=steps, reference=ref,
                                              objective="rlhf", reward_head=head,
                                              eval_every=steps)
        hyper = PPO if name == "ppo" else REINFORCE
        return lambda: simulate_sample(one, seeds=[0], beta=beta, lr=lr, steps=steps,
                                       reference=ref, eval_every=steps, objective=rl(hyper),
                                       reward_head=head)

    tasks = {name: task(name) for name in chosen}
    for fn in tasks.values():
        fn()
    times = interleave(tasks, 2 if quick else 5) if tasks else {}
    finals = {name: fn() for name, fn in tasks.items()}
    best = population_descent(mix, beta=beta, lr=1.0, steps=300, reference=ref,
                              objective="rlhf", reward_head=head, eval_every=300)
    return dict(d=d, k=k, n=n, beta=beta, tol=tol, grids=grids, chosen=chosen, times=times,
                finals=finals, optimum=best, error=error, t_sample=t_sample,
                horizons=(horizon_flow, horizon_sim))


def ppo_section(quick: bool, env: dict) -> dict:
    print("\n" + "-" * 78)
    print("4. PPO and REINFORCE (rlhf, sampled answers): GEMM fraction, batching, flow vs PPO")
    print("-" * 78)
    print(f"PPO: {PPO['ppo_epochs']} epochs x {PPO['num_minibatches']} minibatches per rollout, "
          "clip 0.2, baseline = rollout mean, KL in the reward (defaults); REINFORCE: one "
          "update.\nSampling included: each step draws an answer y ~ pi per prompt and run "
          "(inverse CDF, one torch.Generator per seed).\nUseful FLOPs per step (V = 2 rows, "
          "P·V GEMM columns): the rollout's forward over n prompts, then per update a\nforward "
          "and a backward over its minibatch: REINFORCE 2 GEMMs of 2·n·d·P·V, PPO 1 + 2·epochs "
          "(the value head,\nthe reward and reference logits and the metrics are in the time "
          "only).")
    if quick:
        n, d, p, steps, rounds = 4000, 256, 32, 3, 2
    else:
        n, d, p, steps, rounds = 20000, 256, 64, 6, 3
    cases = {name: rollout_case(n, d, p, steps, rounds, hyper)
             for name, hyper in (("reinforce", REINFORCE), ("ppo", PPO))}
    rows = []
    for name, c in cases.items():
        rows.append([name, c["n"], c["d"], c["p"], c["steps"], f"{c['flops'] / 1e9:.2f}",
                     fmt_t(c["step"]), f"{c['ref_rate'] / 1e9:.1f}",
                     f"{c['step_rate'] / 1e9:.1f}", f"{c['sim_rate'] / 1e9:.1f}",
                     f"{c['sim_rate_med'] / 1e9:.1f}", f"{c['step_rate'] / c['ref_rate']:.2f}",
                     f"{c['sim_rate'] / c['ref_rate']:.2f}"])
    table("Shared sample (1 seed x P configurations, rollout = every prompt; GFLOP/s)",
          ["estimator", "n", "d", "P", "steps", "GFLOP/step", "step", "matmul", "sim step",
           "call best", "call med", "fraction", "call fraction"], rows,
          "step = median interval of the progress hook, best of rounds; fraction = sim step / "
          "matmul of the same GEMMs\n(plain 2-D, best of 3, same rounds; headline). 'call' "
          "counts the whole simulate_sample call: set-up and the\nmetrics at both ends "
          "(exact over the answers) as well.")
    fractions = {name: c["step_rate"] / c["ref_rate"] for name, c in cases.items()}
    pst = 1 if quick else 3
    for name, c in cases.items():
        pr = profile_split(lambda: c["run"](pst))
        top = sorted(pr["per_op"].items(), key=lambda kv: -kv[1])[:7]
        aten = pr["gemm"] + pr["other"]
        print(f"  {name}: torch.profiler, {pst} step(s) + 2 metric evaluations: GEMM "
              f"{pr['gemm'] / aten:.0%} of aten self time, {pr['calls_other'] / pst:.0f} other "
              f"aten calls a step; top: " + ", ".join(
                  f"{key[6:]} {us * 1e-6 / pr['wall']:.0%}" for key, us in top))
        c.pop("run")

    # Batched over seeds x configurations against a per-run loop.
    if quick:
        s, p2, n2, d2, st, timed, rounds2 = 4, 4, 256, 16, 3, 4, 1
    else:
        s, p2, n2, d2, st, timed, rounds2 = 16, 16, 256, 16, 10, 16, 2
    loops = {name: rollout_loop_case(n2, d2, s, p2, st, hyper, runs_timed=timed,
                                     rounds=rounds2)
             for name, hyper in (("ppo", PPO), ("reinforce", REINFORCE))}
    rows = []
    for name, r in loops.items():
        per = r["runs"] * r["steps"]
        rows.append([name, fmt_t(r["loop_best"] / per), fmt_t(r["batch_best"] / per),
                     f"{r['loop_best'] / r['batch_best']:.1f}x",
                     f"{r['loop_med'] / r['batch_med']:.1f}x", f"{r['diff']:.1e}"])
    table(f"Batched ({s} seeds x {p2} configurations = {s * p2} runs, n={n2}, d={d2}, {st} "
          f"steps, metrics at the ends) vs a loop of per-run calls",
          ["estimator", "loop/run-step", "batch/run-step", "speed-up", "med/med",
           "max |dD| seeds"], rows,
          f"Loop: seed 0's first {timed} runs timed, {rounds2} round(s), extrapolated to "
          f"{s * p2} runs. max |dD| seeds: each seed alone vs the\nbatch over seeds (1 "
          "configuration): the same draws, so the runs agree to rounding.")
    batch_speedup = loops["ppo"]["loop_best"] / loops["ppo"]["batch_best"]

    # The exact flow against the sampled estimators at equal accuracy.
    f = flow_vs_ppo_case(quick)
    rows = []
    optimum = f["optimum"].per_behavior["objective/rlhf_reward"][-1]
    for name in ("flow", "ppo", "reinforce"):
        if name not in f["chosen"]:
            rows.append([name, str(f["grids"][name]), "-", "not reached", "-", "-", "-"])
            continue
        lr, steps = f["chosen"][name]
        t = f["times"][name]
        res = f["finals"][name]
        if name == "flow":
            err = f["error"](res.deltas[-1])
            value = res.per_behavior["objective/rlhf_reward"][-1]
        else:
            err = f["error"](res.final[0, 0].double().numpy())
            value = res.per_behavior["objective/rlhf_reward"][-1, 0, 0]
        rows.append([name, str(f["grids"][name]), lr, steps, fmt_t(t.min()), fmt_t(np.median(t)),
                     f"{err:.3f}", " ".join(f"{v:+.4f}" for v in value - optimum)])
    table(f"Steps and time to bring D_Yes - D_No within {f['tol']:.0%} of psi/beta (relative, "
          f"d={f['d']}, K={f['k']} Gaussian, beta={f['beta']}, V=2)",
          ["solver", "lr grid", "lr", "steps", "time best", "time med", "final err",
           "rlhf_reward - optimum"], rows,
          f"flow: population_descent (exact for V = 2, Gaussian), metrics at the ends; ppo, "
          f"reinforce: simulate_sample on n={f['n']}\nprompts drawn beforehand "
          f"({fmt_t(f['t_sample'])} a seed, not in the time), 1 seed x 1 configuration, "
          f"metrics at the ends. steps: the\nfirst from which the error stays within the "
          f"tolerance to the horizon ({f['horizons'][0]} flow steps; {f['horizons'][1]} steps "
          f"on 4 seeds\nfor the sampled runs), at the grid's fastest lr. rlhf_reward - optimum "
          f"per behavior (the sampled runs' on their sample).")
    if "flow" in f["times"] and "ppo" in f["times"]:
        flow_vs_ppo = f["times"]["ppo"].min() / f["times"]["flow"].min()
        med = np.median(f["times"]["ppo"]) / np.median(f["times"]["flow"])
    else:
        flow_vs_ppo = med = float("nan")
    print(f"\nHeadline: ppo_gemm_fraction = {fractions['ppo']:.2f}, reinforce_gemm_fraction = "
          f"{fractions['reinforce']:.2f} (shared sample n={n} d={d} P={p});\nppo_batch_speedup "
          f"= {batch_speedup:.1f}x ({s} x {p2} runs against the per-run loop); flow_vs_ppo = "
          f"{flow_vs_ppo:.1f}x (PPO's time / the flow's at {f['tol']:.0%}; med/med {med:.1f}x).")
    return dict(ppo_gemm_fraction=fractions["ppo"],
                reinforce_gemm_fraction=fractions["reinforce"],
                ppo_batch_speedup=batch_speedup, flow_vs_ppo=flow_vs_ppo)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke mode (< 60 s)")
    parser.add_argument("--wait-budget", type=float, default=90.0, metavar="S",
                        help="seconds the full mode may spend in total waiting for other "
                             "processes to go quiet before timed tasks (default 90)")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                        help="run only this section (repeatable; one of %(choices)s); the "
                             "others' keys print as nan")
    args = parser.parse_args(argv)
    only = set(args.only or SECTIONS)
    torch.manual_seed(0)
    global QUIET
    QUIET = Quiet(3.0, 0.5) if args.quick else Quiet(args.wait_budget, 10.0)
    start = now()
    contention = Contention()
    env = machine(args.quick)
    nan = float("nan")
    fraction, objectives_min = gemm_section(args.quick, env) if "gemm" in only else (nan, nan)
    speedup, efficiency = loop_section(args.quick, env) if "loop" in only else (nan, nan)
    ratio = flow_section(args.quick) if "flow" in only else nan
    ppo = ppo_section(args.quick, env) if "ppo" in only else dict.fromkeys(PPO_KEYS, nan)
    print("\n" + "=" * 78)
    got = {"gemm_fraction": fraction, "step_efficiency": efficiency, "flow_vs_sim": ratio,
           "objectives_min_gemm_fraction": objectives_min, **ppo}
    for key, value in got.items():
        if key in TARGETS:
            status = ("skipped" if np.isnan(value) else "met" if value >= TARGETS[key]
                      else "NOT met")
            print(f"{key:28s} = {value:8.2f}   target >= {TARGETS[key]:g}: {status}")
        else:
            print(f"{key:28s} = {value:8.2f}   (informational)")
    print(f"{'loop_speedup':28s} = {speedup:8.2f}   (informational)")
    print(f"total benchmark time {now() - start:.1f} s; {contention.report()};\n"
          f"{QUIET.summary()}")
    print(f"bench_dynamics: gemm_fraction={fraction:.2f} step_efficiency={efficiency:.2f} "
          f"flow_vs_sim={ratio:.1f} objectives_min_gemm_fraction={objectives_min:.2f} "
          f"ppo_gemm_fraction={ppo['ppo_gemm_fraction']:.2f} "
          f"reinforce_gemm_fraction={ppo['reinforce_gemm_fraction']:.2f} "
          f"ppo_batch_speedup={ppo['ppo_batch_speedup']:.1f} "
          f"flow_vs_ppo={ppo['flow_vs_ppo']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
