"""A strided conv's input gradient: lax's (XLA's dilated conv) against the phase decomposition.

For each stride-2 conv shape of ResNet-18 (the three 3x3 convs that open stages 2-4 and their
1x1 shortcuts) at the given width and batch, times, interleaved (median of ``--reps``,
milliseconds):

* ``lax``: ``jax.vjp`` of ``lax.conv_general_dilated`` with respect to the input, which XLA
  CPU runs as Eigen's ``convolution-base-dilated``;
* ``phases``: :func:`awm_jax.perf.phase_input_grad` (``stride**2`` undilated stride-1 convs,
  interleaved back), what ``conv_impl="fast"`` computes for strided convs.

Prints one JSON line per shape with the relative error of ``phases`` against ``lax``, then a
JSON summary (``--out`` also writes it).

    .venv/bin/python experiments/benchmarks/strided_input_grad.py --width 64 --batch 32 64 128
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
from timing import time_interleaved

from awm_jax.machine import describe_machine
from awm_jax.perf import phase_input_grad

DIMS = ("NHWC", "HWIO", "NHWC")


def resnet18_strided_shapes(width: int) -> list[tuple[int, int, int, int]]:
    """``(H_in, C_in, C_out, k)`` of ResNet-18's stride-2 convs at this width, 32x32 inputs."""
    shapes = []
    for stage in range(1, 4):
        size, cin = 32 // 2 ** (stage - 1), width * 2 ** (stage - 1)
        shapes += [(size, cin, 2 * cin, 3), (size, cin, 2 * cin, 1)]
    return shapes


def measure(batch: int, size: int, cin: int, cout: int, kernel: int, reps: int) -> dict:
    strides = (2, 2)
    pads = ((1, 1), (1, 1)) if kernel == 3 else ((0, 0), (0, 0))  # the models' padding
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    x_shape = (batch, size, size, cin)
    w = jax.random.normal(keys[0], (kernel, kernel, cin, cout)) / (kernel * cin ** 0.5)
    out_size = (size + sum(pads[0]) - kernel) // 2 + 1
    g = jax.random.normal(keys[1], (batch, out_size, out_size, cout))

    @jax.jit
    def by_lax(g, w):
        conv = lambda a: lax.conv_general_dilated(a, w, strides, pads, dimension_numbers=DIMS)
        return jax.vjp(conv, jnp.zeros(x_shape))[1](g)[0]

    by_phases = jax.jit(lambda g, w: phase_input_grad(g, w, x_shape, strides, pads))
    want, got = by_lax(g, w), by_phases(g, w)
    error = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    seconds = time_interleaved({"lax": lambda: by_lax(g, w),
                                "phases": lambda: by_phases(g, w)}, reps)
    return {"batch": batch, "h_in": size, "c_in": cin, "c_out": cout, "kernel": kernel,
            "lax_ms": round(1e3 * seconds["lax"], 2),
            "phases_ms": round(1e3 * seconds["phases"], 2),
            "lax_over_phases": round(seconds["lax"] / seconds["phases"], 2),
            "relative_error": error}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for batch in args.batch:
        for shape in resnet18_strided_shapes(args.width):
            rows.append(measure(batch, *shape, reps=args.reps))
            print(json.dumps(rows[-1]), flush=True)
    summary = {"command": "python " + " ".join(["experiments/benchmarks/strided_input_grad.py",
                                                *sys.argv[1:]]),
               "machine": describe_machine(),
               "jax": jax.__version__, "rows": rows,
               "lax_ms_total": round(sum(r["lax_ms"] for r in rows), 1),
               "phases_ms_total": round(sum(r["phases_ms"] for r in rows), 1)}
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
