"""Timing shared by the benchmarks: contenders measured in the same process, interleaved."""

from __future__ import annotations

import statistics
import time

import jax


def time_interleaved(fns: dict, args: dict, *, runs: int, budget_s: float) -> dict[str, float]:
    """Median wall time (ms) of each jitted function, runs interleaved so that load from other
    processes hits every contender alike; one warm-up (compile) call each first. At least 3
    rounds, then stops once `budget_s` has passed.

    Args:
      fns: name -> callable; args: name -> tuple of that callable's arguments.
    """
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    start = time.perf_counter()
    for i in range(runs):
        if i >= 3 and time.perf_counter() - start > budget_s:
            break
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}
