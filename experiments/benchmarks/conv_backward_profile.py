"""Why is a ResNet-18 training step ~6x its forward on this CPU? Per-op timings and remedies.

Modes (each prints one JSON object; every comparison is measured in one process, interleaved,
median of ``--reps`` calls after a warm-up, so a busy machine shifts both sides alike):

* ``model``: the whole ResNet-18 (``awm_jax.models``) forward (eval) vs the train-mode loss
  gradient w.r.t. the params (BatchNorm with batch statistics), and the gradient with bf16
  inputs and weights.
* ``layers``: for every distinct conv shape of ResNet-18 at ``--width``: forward, input gradient
  (``vjp`` w.r.t. x), weight gradient (``vjp`` w.r.t. the kernel), all NHWC/HWIO; the weight
  gradient re-expressed as im2col + one matmul; the same three ops in NCHW/OIHW; and BatchNorm's
  train-mode forward and backward at the same activation shape.
* ``scan``: T conv training steps (a small CNN) as a Python loop over the jitted step vs one
  ``lax.scan``; with ``--hlo DIR`` also writes both optimised HLO texts.

    .venv/bin/python experiments/benchmarks/conv_backward_profile.py model --batch 128 --width 16
    .venv/bin/python experiments/benchmarks/conv_backward_profile.py layers --batch 128 --width 16
    XLA_FLAGS=... .venv/bin/python experiments/benchmarks/conv_backward_profile.py model ...
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from timing import time_interleaved

from awm_jax.models import create_model, init_variables


def model_mode(batch: int, width: int, reps: int) -> dict:
    model = create_model("resnet18", 10, width=width)
    variables = init_variables(model, jax.random.key(0), (32, 32, 3))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(batch, 32, 32, 3)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))

    def loss(params, stats, x):
        logits, updates = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                                      mutable=["batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        return ce.mean(), updates

    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    grad = jax.jit(jax.grad(loss, has_aux=True))
    bf16 = lambda tree: jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), tree)
    params16, images16 = bf16(variables["params"]), images.astype(jnp.bfloat16)
    seconds = time_interleaved({
        "forward_eval": lambda: forward(variables, images),
        "grad_train": lambda: grad(variables["params"], variables["batch_stats"], images),
        "grad_train_bf16": lambda: grad(params16, variables["batch_stats"], images16),
    }, reps)
    seconds["grad_over_forward"] = seconds["grad_train"] / seconds["forward_eval"]
    seconds["bf16_over_f32_grad"] = seconds["grad_train_bf16"] / seconds["grad_train"]
    return seconds


def resnet18_conv_shapes(width: int, size: int = 32) -> list[dict]:
    """Distinct (H, C_in, C_out, kernel, stride) of ResNet-18's convs with their counts."""
    shapes = {(size, 3, width, 3, 1): 1}
    h, c = size, width
    for mult, stride in zip((1, 2, 4, 8), (1, 2, 2, 2)):
        out = width * mult
        for block in range(2):
            s = stride if block == 0 else 1
            for key in [(h, c, out, 3, s), (h // s, out, out, 3, 1)] + (
                    [(h, c, out, 1, s)] if s != 1 or c != out else []):
                shapes[key] = shapes.get(key, 0) + 1
            h, c = h // s, out
    return [dict(zip(("h", "cin", "cout", "k", "stride", "count"), (*k, v)))
            for k, v in shapes.items()]


def _conv(x, w, stride, k, layout="NHWC"):
    pad = ((k // 2, k // 2),) * 2
    dims = ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")
    return jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=dims)


def im2col_weight_grad(x, g, k, stride):
    """``dL/dw`` of an NHWC/HWIO conv as ``patches^T @ g``: float32[k, k, C_in, C_out]."""
    pad = ((k // 2, k // 2),) * 2
    patches = jax.lax.conv_general_dilated_patches(
        x, (k, k), (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # patches: [B, Ho, Wo, C_in * k * k] ordered (C_in, kh, kw).
    cin, cout = x.shape[-1], g.shape[-1]
    dw = jnp.einsum("bhwp,bhwo->po", patches, g).reshape(cin, k, k, cout)
    return dw.transpose(1, 2, 0, 3)


def _layer_row(shape: dict, batch: int, reps: int, rng) -> dict:
    """Interleaved ms of every op variant at one conv shape."""
    h, cin, cout, k, s = (shape[n] for n in ("h", "cin", "cout", "k", "stride"))
    x = jnp.asarray(rng.normal(size=(batch, h, h, cin)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)).astype(np.float32) * 0.1)
    y = _conv(x, w, s, k)
    g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
    fwd = jax.jit(lambda x_, w_: _conv(x_, w_, s, k))
    dx = jax.jit(lambda x_, w_, g_: jax.vjp(lambda a: _conv(a, w_, s, k), x_)[1](g_)[0])
    dw = jax.jit(lambda x_, w_, g_: jax.vjp(lambda b: _conv(x_, b, s, k), w_)[1](g_)[0])
    dw_im2col = jax.jit(lambda x_, g_: im2col_weight_grad(x_, g_, k, s))
    np.testing.assert_allclose(dw_im2col(x, g), dw(x, w, g), rtol=2e-3, atol=2e-3)
    xc, wc, gc = x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1), g.transpose(0, 3, 1, 2)
    fwd_c = jax.jit(lambda x_, w_: _conv(x_, w_, s, k, "NCHW"))
    dx_c = jax.jit(lambda x_, w_, g_: jax.vjp(
        lambda a: _conv(a, w_, s, k, "NCHW"), x_)[1](g_)[0])
    dw_c = jax.jit(lambda x_, w_, g_: jax.vjp(
        lambda b: _conv(x_, b, s, k, "NCHW"), w_)[1](g_)[0])

    def bn(z, scale):  # train-mode BatchNorm maths on this conv's output
        mean = z.mean((0, 1, 2))
        var = jnp.square(z - mean).mean((0, 1, 2))
        return (z - mean) * jax.lax.rsqrt(var + 1e-5) * scale

    scale = jnp.ones((cout,), jnp.float32)
    bn_fwd = jax.jit(bn)
    bn_bwd = jax.jit(lambda z, sc, g_: jax.vjp(bn, z, sc)[1](g_))
    t = time_interleaved({
        "fwd": lambda: fwd(x, w), "dx": lambda: dx(x, w, g), "dw": lambda: dw(x, w, g),
        "dw_im2col": lambda: dw_im2col(x, g),
        "fwd_nchw": lambda: fwd_c(xc, wc), "dx_nchw": lambda: dx_c(xc, wc, gc),
        "dw_nchw": lambda: dw_c(xc, wc, gc),
        "bn_fwd": lambda: bn_fwd(y, scale), "bn_bwd": lambda: bn_bwd(y, scale, g),
    }, reps)
    gflop = 2 * batch * (h // s) ** 2 * k * k * cin * cout / 1e9
    return {**shape, "gflop_fwd": round(gflop, 3),
            **{name: round(v * 1e3, 3) for name, v in t.items()}}


def layers_mode(batch: int, width: int, reps: int) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    for shape in resnet18_conv_shapes(width):
        rows.append(_layer_row(shape, batch, reps, rng))
        print(json.dumps(rows[-1]), flush=True)
    totals = {name: round(sum(r[name] * r["count"] for r in rows), 1)
              for name in ("fwd", "dx", "dw", "dw_im2col", "fwd_nchw", "dx_nchw", "dw_nchw",
                           "bn_fwd", "bn_bwd")}
    return {"batch": batch, "width": width, "unit": "ms", "rows": rows,
            "totals_weighted_by_count": totals}


def scan_mode(steps: int, reps: int, hlo_dir: str | None) -> dict:
    model = create_model("small_cnn", 10, features=(16, 32))
    variables = init_variables(model, jax.random.key(0), (16, 16, 1))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(size=(steps, 32, 16, 16, 1)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 10, (steps, 32)).astype(np.int32))
    tx = optax.sgd(0.01)

    def step(params, batch):
        x, y = batch
        def loss(p):
            logits = model.apply({"params": p, **{k: v for k, v in variables.items()
                                                  if k != "params"}}, x, train=False)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        grads = jax.grad(loss)(params)
        return optax.apply_updates(params, tx.update(grads, tx.init(params))[0]), None

    jit_step = jax.jit(step)
    scanned = jax.jit(lambda p, xs, ys: jax.lax.scan(step, p, (xs, ys))[0])

    def python_loop():
        p = variables["params"]
        for i in range(steps):
            p, _ = jit_step(p, (images[i], labels[i]))
        return p

    a, b = python_loop(), scanned(variables["params"], images, labels)
    diff = max(float(jnp.abs(u - v).max()) for u, v in zip(jax.tree_util.tree_leaves(a),
                                                          jax.tree_util.tree_leaves(b)))
    t = time_interleaved({"python_loop": python_loop,
                           "scan": lambda: scanned(variables["params"], images, labels)}, reps)
    if hlo_dir:
        os.makedirs(hlo_dir, exist_ok=True)
        for name, fn, args in (("step", jit_step, (variables["params"], (images[0], labels[0]))),
                               ("scan", scanned, (variables["params"], images, labels))):
            with open(os.path.join(hlo_dir, f"{name}.hlo.txt"), "w") as f:
                f.write(fn.lower(*args).compile().as_text())
    return {"steps": steps, **t, "scan_over_python": t["scan"] / t["python_loop"],
            "max_param_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("model", "layers", "scan"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--hlo", default=None)
    args = parser.parse_args()
    if args.mode == "model":
        out = model_mode(args.batch, args.width, args.reps)
    elif args.mode == "layers":
        out = layers_mode(args.batch, args.width, args.reps)
    else:
        out = scan_mode(args.steps, args.reps, args.hlo)
    print(json.dumps({"mode": args.mode, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "jax": jax.__version__, **out}))


if __name__ == "__main__":
    main()
