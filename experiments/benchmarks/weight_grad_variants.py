"""Weight gradient of a 3x3 NHWC conv three ways: lax's VJP, one im2col matmul, 9 tap matmuls.

Prints one JSON line per shape: interleaved medians (ms) and each variant's error relative to
lax's weight gradient.

    .venv/bin/python experiments/benchmarks/weight_grad_variants.py --batch 128
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from conv_backward_profile import _conv
from timing import time_interleaved

SHAPES = ((32, 16, 16), (32, 3, 16), (16, 32, 32), (8, 64, 64), (32, 64, 64), (16, 128, 128))


def _taps(x, g, k):
    """The k*k shifted views of the padded input that meet each output position (stride 1)."""
    p = k // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho, wo = g.shape[1], g.shape[2]
    return [xp[:, i:i + ho, j:j + wo, :] for i in range(k) for j in range(k)]


def concat_matmul_dw(x, g, k):
    cols = jnp.concatenate(_taps(x, g, k), axis=-1)  # [B, Ho, Wo, k*k*C_in]
    return jnp.einsum("bhwp,bhwo->po", cols, g).reshape(k, k, x.shape[-1], g.shape[-1])


def tap_matmuls_dw(x, g, k):
    rows = [jnp.einsum("bhwi,bhwo->io", tap, g) for tap in _taps(x, g, k)]
    return jnp.stack(rows).reshape(k, k, x.shape[-1], g.shape[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rng, k = np.random.default_rng(0), 3
    for h, cin, cout in SHAPES:
        x = jnp.asarray(rng.normal(size=(args.batch, h, h, cin)).astype(np.float32))
        w = jnp.asarray(rng.normal(size=(k, k, cin, cout)).astype(np.float32))
        g = jnp.asarray(rng.normal(size=(args.batch, h, h, cout)).astype(np.float32))
        lax_dw = jax.jit(lambda x_, w_, g_: jax.vjp(lambda b: _conv(x_, b, 1, k), w_)[1](g_)[0])
        variants = {"concat_matmul": jax.jit(lambda x_, g_: concat_matmul_dw(x_, g_, k)),
                    "tap_matmuls": jax.jit(lambda x_, g_: tap_matmuls_dw(x_, g_, k))}
        ref = lax_dw(x, w, g)
        errors = {name: float(jnp.abs(fn(x, g) - ref).max() / jnp.abs(ref).max())
                  for name, fn in variants.items()}
        fns = {"lax_dw": lambda x=x, w=w, g=g, f=lax_dw: f(x, w, g),
               **{name: (lambda x=x, g=g, f=fn: f(x, g)) for name, fn in variants.items()}}
        seconds = time_interleaved(fns, args.reps)
        print(json.dumps({"batch": args.batch, "h": h, "cin": cin, "cout": cout, "k": k,
                          "ms": {n: round(v * 1e3, 2) for n, v in seconds.items()},
                          "rel_err": errors}), flush=True)


if __name__ == "__main__":
    main()
