"""How many chunks the AWM mask step splits its batch into (``AWMConfig.mask_chunks="auto"``).

The mask step's gradient keeps the forward activations of ``2 * batch`` images (clean and
triggered) for the backward pass. On a 2-core CPU with ResNet-18 width 64 and batch 128 that
temporary buffer is 4.94 GB, and allocating it afresh on every call costs 1.3M page faults:
13.2 s per step, against 9.7-10.2 s when the gradient is summed over 4 chunks of 32 images
(1.40 GB each); the small VGG's 257 MB buffer is fastest whole (perf_notes.md section 5,
experiments/results/mask_chunks_epoch.json). On a second, faster CPU (Zen 5, perf_notes.md
section 6) smaller chunks paid further: 8 chunks of ~0.6 GB ran that epoch 6% faster than 4,
and ResNet-18 at widths 16 and 32 (1.0 and 2.5 GB) 1.2-1.7x faster in 4 chunks than whole. The
rule here picks the fewest chunks whose buffers fit a budget, estimated from the traced program
without compiling it.

The estimate sums the bytes of every intermediate value in the gradient's jaxpr and scales it
by :data:`JAXPR_TO_BUFFER`, XLA's measured ratio of temporary buffer to that sum (buffers are
reused and elementwise ops fused): 0.17-0.23 for the small VGG and ResNet-18 widths 16 and 64
(``compiled.memory_analysis().temp_size_in_bytes``), 0.44 for the tiny digits CNN.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np

# XLA's temporary buffer over the jaxpr's summed intermediates, rounded up from the conv nets'
# 0.17-0.23 so that the estimate errs towards more chunks.
JAXPR_TO_BUFFER = 0.25
# Per-chunk buffer on CPU. 0.6 GB chunks ran fastest on the Zen 5 machine (ResNet-18 width 64 in
# 8, width 32 in 4); below ~0.3 GB the per-chunk overhead can win (the small VGG's 257 MB buffer
# ran 26% slower in two chunks on the first machine), so one-shot-sized steps stay whole.
CPU_CHUNK_BYTES = 0.7e9
# On accelerators, chunking only trades throughput for memory: split only when a chunk would
# otherwise take more than this fraction of the device's memory.
ACCELERATOR_MEMORY_FRACTION = 0.25


def jaxpr_intermediate_bytes(jaxpr: jax.extend.core.Jaxpr) -> int:
    """Bytes of every equation output in ``jaxpr``, sub-jaxprs (jit, custom_vjp, ...) included."""
    total = 0
    for equation in jaxpr.eqns:
        for var in equation.outvars:
            aval = var.aval
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += int(np.prod(aval.shape, dtype=np.int64)) * aval.dtype.itemsize
        for param in equation.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", None)
                inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
                if inner is not None and hasattr(inner, "eqns"):
                    total += jaxpr_intermediate_bytes(inner)
    return total


def estimate_buffer_bytes(fn: Callable, *args: Any) -> int:
    """Estimated temporary memory of ``jit(fn)(*args)``, from tracing only (no compile).

    ``args`` may hold arrays, tracers or ``jax.ShapeDtypeStruct``s; only shapes count.
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), args)
    closed = jax.make_jaxpr(fn)(*abstract)
    return int(JAXPR_TO_BUFFER * jaxpr_intermediate_bytes(closed.jaxpr))


def chunk_budget_bytes(device: jax.Device | None = None) -> float | None:
    """The largest buffer one chunk should need on ``device`` (default: the first device of
    the default backend): :data:`CPU_CHUNK_BYTES` on CPU, else
    :data:`ACCELERATOR_MEMORY_FRACTION` of the device's memory, or None (no limit) where the
    device does not report its memory."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return CPU_CHUNK_BYTES
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    return None if not limit else ACCELERATOR_MEMORY_FRACTION * limit


def choose_chunks(buffer_bytes: float, batch_size: int, budget_bytes: float | None) -> int:
    """The fewest chunks whose share of ``buffer_bytes`` fits ``budget_bytes`` (1 when the
    budget is None), rounded up to a power of two, at most one image per chunk.

    Powers of two split the usual batch sizes evenly; ResNet-18 width 32 at batch 128, whose
    estimate asks for 3 chunks since the weight-gradient rule of perf_notes.md section 10, ran
    its AWM epoch in 18.1-18.2 s in 4 chunks against 18.4-18.9 s in 3 (Zen 5, alternating).

    Raises:
      ValueError: a negative buffer, a batch size < 1 or a budget <= 0.
    """
    if buffer_bytes < 0:
        raise ValueError(f"buffer_bytes must be >= 0; got {buffer_bytes}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    if budget_bytes is None:
        return 1
    if not budget_bytes > 0:
        raise ValueError(f"budget_bytes must be > 0; got {budget_bytes}.")
    needed = max(1, math.ceil(buffer_bytes / budget_bytes))
    return min(batch_size, 1 << (needed - 1).bit_length())
