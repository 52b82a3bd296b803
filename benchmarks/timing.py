"""Timing helpers shared by the benchmark scripts.

Ratios, not absolute times, are what the scripts report, because this machine is shared
and noisy; these helpers keep both sides of a ratio comparable:

* :class:`Quiet` waits, before each timed task, until other processes leave the machine
  quiet, and records how busy it was during the task that followed;
* :class:`Others` measures other processes' share of the machine during one block;
* :class:`Contention` reports it over the whole run;
* :func:`best_of` times a function (synchronising an accelerator when asked);
* :func:`table`, :func:`fmt_t`, :func:`sig` and :func:`heading` print.

On a 2-core machine a second busy process stalls every 2-thread parallel region (a
thread without a core holds up the others), so batched work slows 2-30x while small
single-threaded ops barely notice: measurements taken under contention are not
comparable, and the summaries say when that happened.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import sys
import time
from collections.abc import Callable

import numpy as np

__all__ = ["Contention", "Others", "Quiet", "best_of", "fmt_t", "heading", "no_stderr", "now",
           "sig", "table"]


def now() -> float:
    return time.perf_counter()


def _proc_stat() -> list[int] | None:
    """The machine's cumulative CPU ticks (first line of /proc/stat), or None."""
    try:
        with open("/proc/stat") as fh:
            return [int(v) for v in fh.readline().split()[1:]]
    except OSError:
        return None


def _own_cpu() -> float:
    """CPU seconds of this process and its finished children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _busy_seconds(v0: list[int], v1: list[int], *, steal: bool = True) -> float:
    """CPU seconds spent between two /proc/stat readings: user nice system, irq
    softirq (and steal, the hypervisor's share, when asked)."""
    tick = os.sysconf("SC_CLK_TCK")
    d = [(b - a) / tick for a, b in zip(v0, v1)]
    return sum(d[:3]) + sum(d[5:8] if steal else d[5:7])


def _others_share(start: tuple, end: tuple) -> float:
    """Other processes' share of the machine between two ``(time, stat, own CPU)``."""
    (t0, v0, c0), (t1, v1, c1) = start, end
    if v0 is None or v1 is None or t1 <= t0:
        return float("nan")
    others = max(_busy_seconds(v0, v1) - (c1 - c0), 0.0)
    return others / ((t1 - t0) * (os.cpu_count() or 1))


def _mark() -> tuple:
    return now(), _proc_stat(), _own_cpu()


class Quiet:
    """Call before each timed task: waits (at most ``per_task`` seconds a task and
    ``budget`` in all) until other processes use less than ``threshold`` of the machine.
    Each call also records the share other processes took since the previous call
    returned, i.e. during the previous timed task (:meth:`summary` reports both)."""

    def __init__(self, budget: float, per_task: float = 10.0, probe: float = 0.1,
                 threshold: float = 0.15):
        self.budget, self.per_task, self.probe, self.threshold = budget, per_task, probe, threshold
        self.waited, self.probes, self.quiet, self.busy, self.unchecked = 0.0, 0, 0, 0, 0
        self.mark = None  # (time, /proc/stat, own CPU) when the last call returned
        self.during: list[float] = []  # others' share of the machine during each task

    def close_task(self) -> None:
        """Record the task timed since the last call (tasks under 0.5 s are not)."""
        if self.mark is None:
            return
        end = _mark()
        if end[0] - self.mark[0] >= 0.5:
            share = _others_share(self.mark, end)
            if math.isfinite(share):
                self.during.append(share)
        self.mark = None

    def __call__(self) -> None:
        self.close_task()
        start = self.waited
        try:
            while True:
                if self.waited >= self.budget:
                    self.unchecked += 1
                    return
                if self.waited - start >= self.per_task:
                    self.busy += 1
                    return
                v0, t0 = _proc_stat(), now()
                time.sleep(self.probe)
                v1, t1 = _proc_stat(), now()
                self.waited += t1 - t0
                self.probes += 1
                if v0 is None or v1 is None:
                    return
                if _busy_seconds(v0, v1) / ((t1 - t0) * (os.cpu_count() or 1)) < self.threshold:
                    self.quiet += 1
                    return
        finally:
            self.mark = _mark()

    def summary(self) -> str:
        self.close_task()
        during = np.array(self.during) if self.during else np.zeros(1)
        return (f"quiet-wait: {self.quiet} timed tasks started on a quiet machine, {self.busy} "
                f"on a busy one (wait capped at {self.per_task:g} s a task), {self.unchecked} "
                f"unchecked (wait budget of {self.budget:g} s spent); {self.probes} probes, "
                f"{self.waited:.1f} s waited.\nOther processes' share of the machine during "
                f"the timed tasks of 0.5 s or more: median {np.median(during):.0%}, max "
                f"{during.max():.0%}; {int((during > self.threshold).sum())} of "
                f"{len(self.during)} above {self.threshold:.0%} (numbers from those are not "
                f"comparable).")


class Others:
    """``with Others() as o: ...`` then ``o.share``: the share of the machine other
    processes took during the block (0 = quiet, 0.5 = one of 2 cores busy elsewhere)."""

    def __enter__(self):
        self.start = _mark()
        self.share = float("nan")
        return self

    def __exit__(self, *exc):
        self.share = _others_share(self.start, _mark())
        return False


class Contention:
    """CPU time that other processes (and the hypervisor: steal) took since creation."""

    def __init__(self):
        self.start = _mark()

    def report(self) -> str:
        t1, v1, c1 = _mark()
        t0, v0, c0 = self.start
        if v0 is None or v1 is None:
            return "CPU contention: unknown (no /proc/stat)"
        tick = os.sysconf("SC_CLK_TCK")
        steal = (v1[7] - v0[7]) / tick if len(v1) > 7 else 0.0
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        others = max(_busy_seconds(v0, v1, steal=False) - (c1 - c0), 0.0)
        return (f"CPU contention during the run: other processes {100 * others / capacity:.0f}% "
                f"of the machine, hypervisor steal {100 * steal / capacity:.0f}% "
                f"(this benchmark {100 * (c1 - c0) / capacity:.0f}%)")


def best_of(fn: Callable[[], object], repeat: int,
            sync: Callable[[], None] | None = None) -> float:
    """The shortest of ``repeat`` wall times of ``fn()``; ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before starting and before stopping the clock."""
    out = []
    for _ in range(repeat):
        if sync is not None:
            sync()
        t0 = now()
        fn()
        if sync is not None:
            sync()
        out.append(now() - t0)
    return min(out)


def fmt_t(seconds: float) -> str:
    """A duration with a unit that keeps 2-4 significant digits."""
    if not math.isfinite(seconds):
        return "nan"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def sig(x: float | None, digits: int = 3) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def table(title: str, header: list[str], rows: list[list], note: str | None = None) -> None:
    """Print ``rows`` under ``header``, columns right-aligned, then ``note``'s lines."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    print("  " + line)
    print("  " + "-" * len(line))
    for r in cells:
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths)))
    if note:
        for part in note.split("\n"):
            print("  " + part)


def heading(text: str) -> None:
    print("\n" + "-" * 78)
    print(text)
    print("-" * 78, flush=True)


@contextlib.contextmanager
def no_stderr():
    """File descriptor 2 to /dev/null (C++ logs that Python's sys.stderr does not see)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
