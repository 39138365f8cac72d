"""Timing one step: warm-up, quiescing between backends, timed rounds, the settle rule, statistics."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vae_deploy.bench.budget import Budget

Step = Callable[[], Any]  # one call of one backend on one prepared batch


@dataclass
class Point:
    """Per-call times of one (backend, batch size) point, round by round."""

    times: list[float] = field(default_factory=list)
    medians: list[float] = field(default_factory=list)  # running median after each round
    round_medians: list[float] = field(default_factory=list)  # median of each round alone

    def add_round(self, times: list[float]) -> None:
        self.times += times
        self.medians.append(statistics.median(self.times))
        self.round_medians.append(statistics.median(times))

    def settled(self, budget: Budget) -> bool:
        """At least ``min_rounds`` rounds, and the median moved less than ``settle`` over the last."""
        if len(self.medians) < max(2, budget.min_rounds):
            return False
        a, b = self.medians[-2], self.medians[-1]
        return abs(b - a) <= budget.settle * a

    def done(self, budget: Budget) -> bool:
        return self.settled(budget) or sum(self.times) >= budget.max_s


def warm_up(step: Step, seconds: float) -> None:
    """Untimed calls for ``seconds`` (at least 3)."""
    end = time.perf_counter() + seconds
    calls = 0
    while calls < 3 or time.perf_counter() < end:
        step()
        calls += 1


def timed_round(step: Step, seconds: float) -> list[float]:
    """Run ``step`` once untimed (to re-warm after another backend ran), then time single calls
    for about ``seconds`` (at least one)."""
    step()
    clock = time.perf_counter
    times: list[float] = []
    end = clock() + seconds
    while True:
        t0 = clock()
        step()
        t1 = clock()
        times.append(t1 - t0)
        if t1 >= end:
            return times


def quiesce(max_s: float = 0.25, window_s: float = 0.004) -> float:
    """Sleep until this process's threads stop using CPU (at most ``max_s``); returns the wait.

    Thread pools keep spinning after their last call (measured here: onnxruntime's ~40 ms, torch's
    OpenMP a few ms) and would steal a core from whichever backend runs next on a small machine.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        c0 = time.process_time()
        time.sleep(window_s)
        if time.process_time() - c0 < 0.1 * window_s:
            break
    return time.perf_counter() - start


def quantile(sorted_times: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values (numpy's default method)."""
    return float(np.quantile(np.asarray(sorted_times), q))


def latency_ms(times: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, mean and min of per-call times, in milliseconds."""
    t = sorted(times)
    return {
        "p50": quantile(t, 0.5) * 1e3,
        "p90": quantile(t, 0.9) * 1e3,
        "p99": quantile(t, 0.99) * 1e3,
        "mean": statistics.fmean(t) * 1e3,
        "min": t[0] * 1e3,
    }


def paired_ratios(name: str, points: dict[str, Point], references: Sequence[str]) -> dict[str, float]:
    """Throughput of ``name`` relative to each reference backend, paired round by round.

    Round r of every backend ran in the same cycle, within about a second of each other, so the
    median over r of (reference round median / this round median) cancels this VM's speed drift
    (measured here: every backend 1.4x slower for stretches of seconds, even when idle), which a
    ratio of two overall medians of a two-speed mixture does not.
    """
    mine = points[name].round_medians
    out = {}
    for ref in references:
        if ref != name and ref in points:
            theirs = points[ref].round_medians
            out[f"vs_{ref.replace('-', '_')}"] = statistics.median(t / m for t, m in zip(theirs, mine))
    return out
