"""The `fast` weight gradient's tap copies against its dots, for one ResNet-18 width-64 shape.

Times, interleaved (median of 5, milliseconds), for ``x: [256, 16, 16, 128]`` and
``g: [256, 16, 16, 128]`` (the layer-2 3x3 conv in AWM's mask step):

* ``slice``: the nine shifted windows of the padded input, each flattened to ``[B*H*W, C]``,
  times ``g`` (what :mod:`awm_jax.perf.fast_conv` computes), jitted as one function;
* ``rows``: each tap as a contiguous row range of the flattened padded grid, ``g`` padded onto
  the same grid (no strided copy, (H+2)^2/H^2 more FLOPs);
* ``hflat``: the input padded in rows only and flattened, so every tap is a contiguous row
  range; the row-end taps zero ``g`` where a shift would wrap into the next row ((H+2)/H more
  FLOPs);
* ``einsum``: each tap's 4-D window contracted with ``g`` by ``einsum``, XLA choosing the form;
* ``lax``: ``jax.vjp`` of ``lax.conv_general_dilated`` with respect to the kernel;
* ``slices9`` / ``dots9``: the nine copies alone and the nine dots alone on pre-made copies;
  ``slice1``: one copy.

Prints the relative error of each weight gradient against lax's, then the timings as JSON.

    .venv/bin/python experiments/benchmarks/tap_copies.py
"""

import json

import jax
import jax.numpy as jnp
from timing import time_interleaved

B, H, C, C_OUT = 256, 16, 128, 128


def taps_slice(x, g):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    gf = g.reshape(-1, C_OUT)
    return jnp.stack([xp[:, i:i + H, j:j + H, :].reshape(-1, C).T @ gf
                      for i in range(3) for j in range(3)])


def taps_rows(x, g):
    side = H + 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(-1, C)
    # g on the padded grid with zeros outside the image, so rows that wrap past an image's
    # edge (or into the next image) multiply zeros.
    gp = jnp.pad(g, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(-1, C_OUT)
    rows = B * side * side - (2 * side + 2)
    return jnp.stack([xp[i * side + j:i * side + j + rows].T @ gp[:rows]
                      for i in range(3) for j in range(3)])


def taps_hflat(x, g):
    width = H
    xh = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0))).reshape(-1, C)
    xh = jnp.pad(xh, ((1, 1), (0, 0)))  # so the first and last shifted ranges stay in bounds
    gh = jnp.pad(g, ((0, 0), (0, 2), (0, 0), (0, 0)))  # zero rows: shifts past an image add 0
    column = jnp.arange(width)[None, None, :, None]
    g_for_column = {0: gh * (column != 0), 1: gh, 2: gh * (column != width - 1)}
    rows = B * (H + 2) * width - 2 * width
    return jnp.stack([xh[1 + i * width + j - 1:1 + i * width + j - 1 + rows].T
                      @ g_for_column[j].reshape(-1, C_OUT)[:rows]
                      for i in range(3) for j in range(3)])


def taps_einsum(x, g):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.stack([jnp.einsum("bhwc,bhwd->cd", xp[:, i:i + H, j:j + H, :], g)
                      for i in range(3) for j in range(3)])


def lax_weight_grad(x, g):
    def conv(w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jax.vjp(conv, jnp.zeros((3, 3, C, C_OUT)))[1](g)[0]


def _median_ms(fns: dict, reps: int = 5) -> dict:
    return {name: round(seconds * 1e3, 1) for name, seconds in time_interleaved(fns, reps).items()}


def main() -> None:
    x = jax.random.normal(jax.random.key(0), (B, H, H, C))
    g = jax.random.normal(jax.random.key(1), (B, H, H, C_OUT))
    variants = {name: jax.jit(fn) for name, fn in
                (("slice", taps_slice), ("rows", taps_rows), ("hflat", taps_hflat),
                 ("einsum", taps_einsum), ("lax", lax_weight_grad))}
    reference = variants["lax"](x, g)
    errors = {name: float(jnp.max(jnp.abs(fn(x, g).reshape(reference.shape) - reference))
                          / jnp.max(jnp.abs(reference))) for name, fn in variants.items()}
    result = {"relative_error": errors,
              "ms": _median_ms({name: (lambda f=fn: f(x, g)) for name, fn in variants.items()})}
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    copies = jax.jit(lambda xp: jnp.stack([xp[:, i:i + H, j:j + H, :].reshape(-1, C)
                                           for i in range(3) for j in range(3)]))
    made = copies(xp)
    dots = jax.jit(lambda s, g: jnp.einsum("tnc,nd->tcd", s, g.reshape(-1, C_OUT)))
    one = jax.jit(lambda xp: xp[:, 1:1 + H, 0:H, :].reshape(-1, C))
    result["ms"].update(_median_ms({"slices9": lambda: copies(xp), "dots9": lambda: dots(made, g),
                                    "slice1": lambda: one(xp)}))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
