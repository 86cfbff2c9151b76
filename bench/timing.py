"""Timing shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping


def interleaved(runs: Mapping[Hashable, Callable[[], None]], rounds: int) -> dict:
    """Seconds of each run, round after round (one call of each per round, after one warm-up
    call when rounds > 0), so that machine noise hits them alike."""
    if rounds:
        for run in runs.values():
            run()
    times = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return times
