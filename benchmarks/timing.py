"""Timing helper shared by the benchmark scripts."""

from __future__ import annotations

import time


def paired_times(fns, repeats: int, warmup: int = 1) -> list[float]:
    """Best-of-`repeats` time of each fn, run interleaved so that load from other processes and clock
    drift hit every variant alike (the minimum is the least-disturbed run)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best
