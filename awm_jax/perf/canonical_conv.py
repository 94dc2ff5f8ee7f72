"""A drop-in ``lax.conv_general_dilated`` whose backward XLA CPU can run fast inside loops.

Under ``lax.scan``/``while``, XLA CPU keeps the input- and weight-gradient convolutions that JAX
derives for an NHWC/HWIO conv in non-canonical dimension orders (``b01f_01oi->b01f`` and
``f01b_i01o->01bf``); outside loops its canonicalisation rewrites them to ``b01f_01io->b01f``,
inside it does not, and the Eigen conv runtime then cannot take them: they run as generic loop
nests, which made a scanned conv training loop ~9-30x slower than a Python loop over the jitted
step (experiments/results/perf_notes.md). :func:`canonical_conv_general_dilated` gives stride-1,
undilated, ungrouped NHWC/HWIO convolutions a ``custom_vjp`` that writes both gradients as
canonical convolutions with explicit transposes (the same maths; measured bit-identical on the
benchmark, float32 rounding in general). Anything else falls through to ``lax``.

Opt in per module, e.g. ``nn.Conv(..., conv_general_dilated=canonical_conv_general_dilated)``.
Outside loops (``loop="python"``) it brings nothing: XLA canonicalises those convs itself.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from awm_jax.types import Array

_CANONICAL = ("NHWC", "HWIO", "NHWC")


def _canonical_padding(padding, x_shape, w_shape):
    """Explicit ``((lo, hi), (lo, hi))`` for a stride-1 conv, or None if unsupported."""
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x_shape[1:3], w_shape[:2], (1, 1), padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pads) != 2:
        return None
    if any(not 0 <= p <= k - 1 for (lo, hi), k in zip(pads, w_shape[:2]) for p in (lo, hi)):
        return None
    return pads


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: Array, w: Array, pads) -> Array:
    return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_CANONICAL)


def _conv_fwd(x, w, pads):
    return _conv(x, w, pads), (x, w)


def _conv_bwd(pads, res, g):
    x, w = res
    kh, kw = w.shape[:2]
    # dx: correlate g with the spatially flipped kernel, in/out channels swapped.
    w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx_pads = ((kh - 1 - pads[0][0], kh - 1 - pads[0][1]),
               (kw - 1 - pads[1][0], kw - 1 - pads[1][1]))
    dx = lax.conv_general_dilated(g, w_t, (1, 1), dx_pads, dimension_numbers=_CANONICAL)
    # dw: C_in plays the batch, B the input feature, g the (Ho x Wo) kernel.
    dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1),
                                  pads, dimension_numbers=_CANONICAL)
    return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def canonical_conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                                   padding, lhs_dilation=None, rhs_dilation=None,
                                   dimension_numbers=None, feature_group_count: int = 1,
                                   batch_group_count: int = 1, precision=None,
                                   preferred_element_type=None) -> Array:
    """``lax.conv_general_dilated`` with a loop-friendly VJP where it applies (see module doc).

    Applies to 2-D convs with ``dimension_numbers`` NHWC/HWIO/NHWC, unit strides and dilations,
    one group, default precision, and padding within ``[0, k - 1]`` per side; any other call is
    passed to ``lax.conv_general_dilated`` unchanged.
    """
    def unit(values):
        return values is None or all(int(v) == 1 for v in values)

    dims = dimension_numbers
    canonical_dims = (dims == _CANONICAL or (isinstance(dims, lax.ConvDimensionNumbers) and
                      dims == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CANONICAL)))
    pads = None
    if (canonical_dims and lhs.ndim == 4 and unit(window_strides) and unit(lhs_dilation)
            and unit(rhs_dilation) and feature_group_count == 1 and batch_group_count == 1
            and precision is None and preferred_element_type is None):
        pads = _canonical_padding(padding, lhs.shape, rhs.shape)
    if pads is None:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    return _conv(lhs, rhs, pads)
