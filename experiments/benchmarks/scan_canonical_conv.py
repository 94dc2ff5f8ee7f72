"""Does writing the conv backward in XLA CPU's canonical form fix the ``lax.scan`` slowdown?

Inside a ``while`` body, XLA CPU leaves the conv backward's input- and weight-gradient
convolutions in non-canonical dimension orders (``b01f_01oi->b01f``, ``f01b_i01o->01bf``; see
``conv_backward_profile.py scan --hlo``), which its Eigen conv runtime cannot take, so they run
as generic loop nests. Here a stride-1 NHWC/HWIO conv gets a ``custom_vjp`` whose backward is
written with explicit transposes as canonical ``b01f_01io->b01f`` convolutions; a two-conv CNN is
trained T steps by a Python loop over the jitted step and by one ``lax.scan``, with ``lax`` convs
and with the custom-VJP convs (interleaved medians; parameters compared).

    .venv/bin/python experiments/benchmarks/scan_canonical_conv.py --steps 15 --reps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

DIMS = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, w):
    k = w.shape[0]
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((k // 2, k // 2),) * 2,
                                        dimension_numbers=DIMS)


@jax.custom_vjp
def canonical_conv(x, w):
    """Stride-1 'same' conv, odd kernel; its VJP uses canonical NHWC/HWIO convs only."""
    return lax_conv(x, w)


def _fwd(x, w):
    return lax_conv(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    k = w.shape[0]
    p = k // 2
    # dx: correlate g with the spatially flipped kernel, in/out channels swapped.
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = jax.lax.conv_general_dilated(g, w_t, (1, 1), ((k - 1 - p,) * 2,) * 2,
                                      dimension_numbers=DIMS)
    # dw: treat C_in as the batch and B as the feature dimension; g is the (Ho x Wo) kernel.
    lhs = x.transpose(3, 1, 2, 0)            # [C_in, H, W, B]
    rhs = g.transpose(1, 2, 0, 3)            # [Ho, Wo, B, C_out]
    dw = jax.lax.conv_general_dilated(lhs, rhs, (1, 1), ((p, p),) * 2,
                                      dimension_numbers=DIMS)  # [C_in, k, k, C_out]
    return dx, dw.transpose(1, 2, 0, 3)


canonical_conv.defvjp(_fwd, _bwd)


def make_step(conv):
    def loss(params, x, y):
        h = jax.nn.relu(conv(x, params["w1"]))
        h = jax.nn.relu(conv(h, params["w2"]))
        logits = h.mean((1, 2)) @ params["dense"]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    def step(params, batch):
        grads = jax.grad(loss)(params, *batch)
        return jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, params, grads), None
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(3, 3, 1, 16)).astype(np.float32) * 0.3),
              "w2": jnp.asarray(rng.normal(size=(3, 3, 16, 32)).astype(np.float32) * 0.1),
              "dense": jnp.asarray(rng.normal(size=(32, 10)).astype(np.float32) * 0.1)}
    xs = jnp.asarray(rng.uniform(size=(args.steps, 32, 16, 16, 1)).astype(np.float32))
    ys = jnp.asarray(rng.integers(0, 10, (args.steps, 32)).astype(np.int32))
    fns = {}
    for name, conv in (("lax", lax_conv), ("canonical_vjp", canonical_conv)):
        step = make_step(conv)
        jit_step = jax.jit(step)
        scanned = jax.jit(lambda p, a, b, step=step: jax.lax.scan(step, p, (a, b))[0])

        def loop(jit_step=jit_step):
            p = params
            for i in range(args.steps):
                p, _ = jit_step(p, (xs[i], ys[i]))
            return p
        fns[f"{name}_python"] = loop
        fns[f"{name}_scan"] = lambda scanned=scanned: scanned(params, xs, ys)
    outs = {n: f() for n, f in fns.items()}
    ref = outs["lax_python"]
    diff = {n: max(float(jnp.abs(a - b).max()) for a, b in
                   zip(jax.tree_util.tree_leaves(o), jax.tree_util.tree_leaves(ref)))
            for n, o in outs.items()}
    times = {n: [] for n in fns}
    for _ in range(args.reps):
        for n, f in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f())
            times[n].append(time.perf_counter() - start)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(json.dumps({"steps": args.steps, "seconds": med, "max_param_diff_vs_lax_python": diff,
                      "scan_over_python_lax": med["lax_scan"] / med["lax_python"],
                      "scan_over_python_canonical": med["canonical_vjp_scan"]
                      / med["canonical_vjp_python"]}, indent=1))


if __name__ == "__main__":
    main()
