"""Does bfloat16 speed up XLA CPU's convolutions as it does its matmuls? Interleaved medians.

Times one 3x3 NHWC convolution (forward, and forward+backward for input and kernel) in float32
and in bfloat16 (operands cast, float32 or bfloat16 output), the same forward rebuilt from
bfloat16 dots (nine shifted taps, or one im2col matrix; float32 accumulation), next to a
square matmul in both types, and prints JSON (milliseconds and GFLOP/s per case):

    .venv/bin/python experiments/benchmarks/bf16_conv.py [--batch 128 --size 32 --channels 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import allocator_env, time_interleaved  # noqa: E402

from awm_jax.machine import describe_machine  # noqa: E402
from awm_jax.serialization import library_versions  # noqa: E402

_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, out_dtype=None):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DIMS,
                                    preferred_element_type=out_dtype)


def _tap_dots(x, w, dtype):
    """The 3x3 SAME conv as nine ``[B*H*W, C_in] @ [C_in, C_out]`` dots of shifted windows."""
    batch, height, width, channels = x.shape
    padded = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = 0.0
    for i in range(3):
        for j in range(3):
            window = padded[:, i:i + height, j:j + width, :].reshape(-1, channels)
            out = out + jnp.dot(window, w[i, j].astype(dtype),
                                preferred_element_type=jnp.float32)
    return out.reshape(batch, height, width, -1)


def _im2col_dot(x, w, dtype):
    """The 3x3 SAME conv as one ``[B*H*W, 9*C_in] @ [9*C_in, C_out]`` dot."""
    batch, height, width, channels = x.shape
    padded = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    columns = jnp.concatenate([padded[:, i:i + height, j:j + width, :]
                               for i in range(3) for j in range(3)], axis=-1)
    out = jnp.dot(columns.reshape(-1, 9 * channels), w.astype(dtype).reshape(9 * channels, -1),
                  preferred_element_type=jnp.float32)
    return out.reshape(batch, height, width, -1)


def cases(batch: int, size: int, channels: int, matmul: int) -> dict:
    """``{name: (zero-argument function, GFLOP per call)}``."""
    key_x, key_w, key_a = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (batch, size, size, channels))
    w = jax.random.normal(key_w, (3, 3, channels, channels)) * 0.05
    a = jax.random.normal(key_a, (matmul, matmul))
    conv_gflop = 2 * batch * size * size * channels * channels * 9 / 1e9
    bf16 = jnp.bfloat16

    def grad_fn(dtype):
        loss = lambda x, w: jnp.sum(_conv(x.astype(dtype), w.astype(dtype))
                                    .astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    fns = {
        "conv_f32": jax.jit(lambda x, w: _conv(x, w)),
        "conv_bf16_f32_out": jax.jit(lambda x, w: _conv(x.astype(bf16), w.astype(bf16),
                                                        jnp.float32)),
        "conv_bf16": jax.jit(lambda x, w: _conv(x.astype(bf16), w.astype(bf16))),
        "conv_bf16_tap_dots": jax.jit(lambda x, w: _tap_dots(x, w, bf16)),
        "conv_bf16_im2col_dot": jax.jit(lambda x, w: _im2col_dot(x, w, bf16)),
        "conv_grad_f32": grad_fn(jnp.float32),
        "conv_grad_bf16": grad_fn(bf16),
    }
    out = {name: (lambda fn=fn: fn(x, w), conv_gflop * (3 if "grad" in name else 1))
           for name, fn in fns.items()}
    a16 = a.astype(bf16)
    matmul_gflop = 2 * matmul ** 3 / 1e9
    out["matmul_f32"] = (lambda f=jax.jit(jnp.matmul): f(a, a), matmul_gflop)
    out["matmul_bf16"] = (lambda f=jax.jit(jnp.matmul): f(a16, a16), matmul_gflop)
    return out


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--matmul", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if min(args.batch, args.size, args.channels, args.matmul, args.reps) < 1:
        parser.error("every size and --reps must be at least 1")
    timed = cases(args.batch, args.size, args.channels, args.matmul)
    seconds = time_interleaved({name: fn for name, (fn, _) in timed.items()}, args.reps)
    result = {"benchmark": "bf16_conv",
              "machine": {**describe_machine(), "allocator": allocator_env()},
              "versions": library_versions(),
              "command": " ".join(["python experiments/benchmarks/bf16_conv.py",
                                   *(sys.argv[1:] if argv is None else argv)]),
              # Significant figures, not decimals: tiny test shapes run at well under 0.1 GFLOP/s.
              "ms": {name: _significant(1e3 * s) for name, s in seconds.items()},
              "gflops": {name: _significant(timed[name][1] / s) for name, s in seconds.items()}}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
