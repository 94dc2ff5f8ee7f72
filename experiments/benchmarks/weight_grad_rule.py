"""lax's weight gradient against the tap matmuls on every ResNet-18 conv shape, per batch size.

`awm_jax.perf.fast_conv.weight_grad_method` picks between the two per static shape. Its rule
was measured on the first machine at batches 64-256; AWM's mask step now runs in chunks
(`mask_chunks="auto"`: 8 chunks of 32 images for ResNet-18 width 64 at batch 128), so the
shapes it actually sees are smaller. This script times both formulations, interleaved (median of
``--reps`` calls after a warm-up), for each distinct conv of a CIFAR ResNet-18 (3x3 and 1x1
shortcut, strides 1 and 2) at each ``--widths`` x ``--batches``, prints one JSON line per case
and writes them all, with the machine, to ``--out``. Each line also says what the current rule
picks, and the relative error of the taps against lax.

    .venv/bin/python experiments/benchmarks/weight_grad_rule.py --widths 64 16 \
        --batches 32 64 128 256 --out experiments/results/weight_grad_rule_zen5.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import numpy as np
from jax import lax
from timing import allocator_env, time_interleaved

from awm_jax.machine import describe_machine
from awm_jax.perf.fast_conv import tap_weight_grad, weight_grad_method

_DIMS = ("NHWC", "HWIO", "NHWC")


def resnet18_convs(width: int, size: int = 32) -> list[dict]:
    """The distinct convs of the CIFAR ResNet-18 (stem, four stages, stride-2 shortcuts)."""
    convs = [dict(h=size, cin=3, cout=width, k=3, s=1)]
    h, cin = size, width
    for stage in range(4):
        cout = width * 2 ** stage
        if stage:
            convs += [dict(h=h, cin=cin, cout=cout, k=k, s=2) for k in (3, 1)]
            h //= 2
        convs.append(dict(h=h, cin=cout, cout=cout, k=3, s=1))
        cin = cout
    return convs


def _case(batch: int, h: int, cin: int, cout: int, k: int, s: int, reps: int) -> dict:
    rng = np.random.default_rng(0)
    pads = ((k // 2, k // 2),) * 2
    x = jax.numpy.asarray(rng.normal(size=(batch, h, h, cin)).astype(np.float32))
    w = jax.numpy.asarray(rng.normal(size=(k, k, cin, cout)).astype(np.float32))
    ho = (h + 2 * (k // 2) - k) // s + 1
    g = jax.numpy.asarray(rng.normal(size=(batch, ho, ho, cout)).astype(np.float32))

    @jax.jit
    def lax_dw(x_, w_, g_):
        conv = lambda b: lax.conv_general_dilated(x_, b, (s, s), pads, dimension_numbers=_DIMS)
        return jax.vjp(conv, w_)[1](g_)[0]

    taps_dw = jax.jit(lambda x_, g_: tap_weight_grad(x_, g_, (k, k), (s, s), pads))
    ref, got = lax_dw(x, w, g), taps_dw(x, g)
    seconds = time_interleaved({"lax": lambda: lax_dw(x, w, g), "taps": lambda: taps_dw(x, g)},
                               reps)
    flops = 2 * batch * ho * ho * k * k * cin * cout
    return {"batch": batch, "h_in": h, "h_out": ho, "cin": cin, "cout": cout, "k": k, "s": s,
            "ms": {n: round(v * 1e3, 3) for n, v in seconds.items()},
            "gflops": {n: round(flops / v / 1e9, 1) for n, v in seconds.items()},
            "lax_over_taps": round(seconds["lax"] / seconds["taps"], 3),
            "faster": "lax" if seconds["lax"] < seconds["taps"] else "taps",
            "rule": weight_grad_method(w.shape, g.shape, (s, s)),
            "taps_rel_err": float(abs(got - ref).max() / abs(ref).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 16])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if min(args.widths + args.batches) < 1 or args.reps < 1:
        parser.error("widths, batches and reps must be positive")
    rows = []
    for width in args.widths:
        for batch in args.batches:
            for conv in resnet18_convs(width):
                row = {"width": width, **_case(batch, reps=args.reps, **conv)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": "weight_grad_rule.py " + " ".join(
                f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in vars(args).items() if v is not None),
            "machine": {**describe_machine(), "jax": jax.__version__,
                        "allocator": allocator_env()},
            "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
