"""The benchmarks' one timing loop: several zero-argument functions, calls interleaved."""

import os
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


def allocator_env() -> dict:
    """The environment that picks and tunes the process's malloc (``LD_PRELOAD``, jemalloc's
    ``MALLOC_CONF``, glibc's ``GLIBC_TUNABLES``), which moves CPU timings by ~10%
    (perf_notes.md section 8); unset ones are None."""
    return {name: os.environ.get(name) for name in ("LD_PRELOAD", "MALLOC_CONF",
                                                     "GLIBC_TUNABLES")}
