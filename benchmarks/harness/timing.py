"""The one way benchmarks time competing calls: interleaved rounds, compared by medians.

Every runner gets a share of each round, so a slow moment of a shared machine hits all of them
alike; medians, not means, so that a call preempted by another process does not count."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Timings:
    """Seconds per call: `rounds[name][r]` holds runner `name`'s calls of round r."""

    rounds: dict[str, list[np.ndarray]]

    def seconds(self, name: str) -> np.ndarray:
        """Every timed call of one runner, all rounds together."""
        return np.concatenate(self.rounds[name])

    def round_medians(self, name: str) -> np.ndarray:
        """The median of each round of one runner."""
        return np.array([np.median(r) for r in self.rounds[name]])

    @property
    def medians(self) -> dict[str, float]:
        """Each runner's median over all its calls."""
        return {name: float(np.median(self.seconds(name))) for name in self.rounds}


def interleaved(runners: dict[str, Callable[[], object]], rounds: int = 5, *, calls: int | None = None,
                min_time: float | None = None, warmup: int = 3, alternate_calls: bool = False) -> Timings:
    """Time each runner in `rounds` rounds; the runners' order rotates from round to round.

    Per round, each runner makes `calls` calls, or (with `min_time` instead) as many as fill about
    `min_time / rounds` seconds (at least 2), from a per-call estimate taken after `warmup`
    untimed calls. `alternate_calls`: the runners take turns call by call within a round (the
    order rotating from call to call), not one block each; every runner then makes `calls` calls."""
    if not runners:
        raise ValueError("interleaved: no runners")
    if rounds < 1 or (calls is None) == (min_time is None) or (calls is not None and calls < 1):
        raise ValueError("interleaved: give rounds >= 1 and exactly one of calls >= 1 or min_time")
    if alternate_calls and calls is None:
        raise ValueError("interleaved: alternate_calls needs calls")
    names = list(runners)
    clock = time.perf_counter
    per_call = {}
    for name, fn in runners.items():
        for _ in range(warmup):
            fn()
        t0 = clock()
        fn()
        per_call[name] = max(clock() - t0, 1e-7)
    count = {name: calls if calls is not None else max(2, int(min_time / rounds / per_call[name])) for name in names}
    out: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        if alternate_calls:
            samples = {name: np.empty(calls) for name in names}
            for i in range(calls):
                turn = order[i % len(order):] + order[:i % len(order)]
                t = clock()
                for name in turn:
                    runners[name]()
                    now = clock()
                    samples[name][i], t = now - t, now
            for name in names:
                out[name].append(samples[name])
            continue
        for name in order:
            fn, samples = runners[name], np.empty(count[name])
            for i in range(count[name]):
                t = clock()
                fn()
                samples[i] = clock() - t
            out[name].append(samples)
    return Timings(out)


def stats(seconds: np.ndarray, batch: int) -> dict:
    """Latency percentiles (ms), the number of calls and images per second at the median."""
    ms = np.asarray(seconds) * 1e3
    p50 = float(np.median(ms))
    return {"p50_ms": p50, "p90_ms": float(np.percentile(ms, 90)), "min_ms": float(ms.min()),
            "iterations": len(ms), "images_per_s": batch / p50 * 1e3}
