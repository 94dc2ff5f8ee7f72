"""PyTorch's CPU matmul and 3x3 convolution next to JAX's, measured in one process.

The issue's reference figures for this machine (PyTorch convolutions ~150 GFLOP/s forward and
~110 forward+backward, a PyTorch AWM epoch ~119 s) were read on another day; this script puts
both frameworks on the same shapes at the same moment, so the ratio between them does not
depend on how fast the machine happens to be. Shapes: a 2048^3 float32 matmul, and a 3x3
convolution of a batch of 128 32x32x64 images to 64 channels (stride 1, SAME), forward and
forward + both gradients (input and weight), as the performance benchmark's ``ceiling``.
JAX runs ``lax.conv_general_dilated`` and this project's ``fast`` convolution; PyTorch runs
``torch.nn.functional.conv2d`` in its default NCHW layout and in ``channels_last``.

Needs torch (the ``torch`` extra):

    .venv/bin/python experiments/benchmarks/torch_reference.py --out \\
        experiments/results/torch_reference.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from awm_jax.machine import describe_machine
from awm_jax.perf import fast_conv_general_dilated
from awm_jax.serialization import library_versions, write_json_atomic

BATCH, SIZE, CHANNELS, MATMUL_N = 128, 32, 64, 2048
CONV_FLOPS = 2 * BATCH * SIZE * SIZE * CHANNELS * CHANNELS * 9


def _median_seconds(fn, repeats: int, *args) -> float:
    fn(*args)  # warm-up (compilation, allocator)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _jax_call(fn, *args):
    jax.block_until_ready(fn(*args))


def _torch_forward(images, kernel):
    import torch

    with torch.no_grad():
        torch.nn.functional.conv2d(images, kernel, padding=1)


def _torch_forward_backward(images, kernel):
    import torch

    images.grad = kernel.grad = None
    (torch.nn.functional.conv2d(images, kernel, padding=1) ** 2).sum().backward()


def jax_numbers(repeats: int) -> dict:
    a = jnp.ones((MATMUL_N, MATMUL_N), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    out = {"matmul_float32_gflops": 2 * MATMUL_N ** 3 / _median_seconds(
        _jax_call, repeats, matmul, a, a) / 1e9}
    images = jnp.ones((BATCH, SIZE, SIZE, CHANNELS), jnp.float32)
    kernel = jnp.ones((3, 3, CHANNELS, CHANNELS), jnp.float32) * 0.01
    for name, conv_fn in (("lax", jax.lax.conv_general_dilated),
                          ("fast", fast_conv_general_dilated)):
        def conv(x, k, conv_fn=conv_fn):
            return conv_fn(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

        forward = jax.jit(conv)
        grads = jax.jit(jax.grad(lambda x, k, conv=conv: jnp.sum(conv(x, k) ** 2),
                                 argnums=(0, 1)))
        out[f"conv3x3_{name}_forward_gflops"] = CONV_FLOPS / _median_seconds(
            _jax_call, repeats, forward, images, kernel) / 1e9
        out[f"conv3x3_{name}_forward_backward_gflops"] = 3 * CONV_FLOPS / _median_seconds(
            _jax_call, repeats, grads, images, kernel) / 1e9
    return out


def torch_numbers(repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    a = torch.ones(MATMUL_N, MATMUL_N)
    out = {"threads": torch.get_num_threads(),
           "matmul_float32_gflops": 2 * MATMUL_N ** 3 / _median_seconds(
               torch.matmul, repeats, a, a) / 1e9}
    for layout in ("nchw", "channels_last"):
        images = torch.ones(BATCH, CHANNELS, SIZE, SIZE)
        kernel = torch.ones(CHANNELS, CHANNELS, 3, 3) * 0.01
        if layout == "channels_last":
            images = images.contiguous(memory_format=torch.channels_last)
            kernel = kernel.contiguous(memory_format=torch.channels_last)
        out[f"conv3x3_{layout}_forward_gflops"] = CONV_FLOPS / _median_seconds(
            _torch_forward, repeats, images, kernel) / 1e9
        out[f"conv3x3_{layout}_forward_backward_gflops"] = 3 * CONV_FLOPS / _median_seconds(
            _torch_forward_backward, repeats, images.clone().requires_grad_(True),
            kernel.clone().requires_grad_(True)) / 1e9
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        raise SystemExit("torch_reference.py needs torch: pip install -e '.[torch]'") from None
    result = {"machine": describe_machine(),
              "versions": {**library_versions(), "torch": torch.__version__},
              "command": "python experiments/benchmarks/torch_reference.py "
                         + " ".join(os.sys.argv[1:]),
              "jax": jax_numbers(args.repeats), "torch": torch_numbers(args.repeats)}
    for section in ("jax", "torch"):
        result[section] = {k: round(v, 1) if isinstance(v, float) else v
                           for k, v in result[section].items()}
    best_jax = max(result["jax"]["conv3x3_lax_forward_backward_gflops"],
                   result["jax"]["conv3x3_fast_forward_backward_gflops"])
    best_torch = max(result["torch"]["conv3x3_nchw_forward_backward_gflops"],
                     result["torch"]["conv3x3_channels_last_forward_backward_gflops"])
    result["jax_over_torch_forward_backward"] = round(best_jax / best_torch, 2)
    if args.out:
        write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
