"""The benchmarks' one timing loop: several zero-argument functions, calls interleaved."""

import statistics
import time

import jax


def time_interleaved(fns: dict, reps: int) -> dict:
    """Median seconds per call of each zero-argument function after one warm-up call each;
    the timed calls go round-robin so that drift in the machine's load hits every function."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
