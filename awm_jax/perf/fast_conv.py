"""A drop-in ``lax.conv_general_dilated`` with a faster weight gradient on XLA CPU.

XLA CPU computes the weight gradient of an NHWC/HWIO conv as one convolution whose "kernel" is
the output gradient; on large feature maps that path runs at a few GFLOP/s and costs 3-15x the
forward (experiments/results/perf_notes.md, section 4). Written as one matmul per kernel tap,

    dW[i, j] = sum_{b, h, w} x_pad[b, s*h + i, s*w + j, :]^T  g[b, h, w, :],

i.e. ``kh * kw`` products ``[C_in, N] @ [N, C_out]`` with ``N = B * H_out * W_out``, the same
numbers (float32 rounding aside) come out 1-11x faster on almost every shape of the
registered models and slower on a few mid-sized ones. :func:`fast_conv_general_dilated` gives NHWC/HWIO convs (any stride and explicit or
string padding, unit dilation, one group) a ``custom_vjp`` whose backward picks the formulation
per static shape with :func:`weight_grad_method`, a fixed rule derived from the measurements
in perf_notes.md (no timing at run time). The forward and the input gradient are lax's own: no
measured alternative beat them. Anything else falls through to ``lax``.

Use it per module, ``nn.Conv(..., conv_general_dilated=fast_conv_general_dilated)``, or through
the registered models' ``conv_impl="fast"`` (:func:`awm_jax.perf.conv_general_dilated_for`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from awm_jax.types import Array

_DIMS = ("NHWC", "HWIO", "NHWC")

# weight_grad_method's one "lax" region (see its docstring and perf_notes.md section 4).
_LAX_POSITIONS = (256, 1024)  # output positions per image, [low, high)
_LAX_MAX_CHANNEL_PRODUCT = 32 * 32  # C_in * C_out at most


def weight_grad_method(w_shape: Sequence[int], out_shape: Sequence[int]) -> str:
    """``"taps"`` or ``"lax"``: how the weight gradient of this conv is computed.

    The rule, from interleaved measurements on a 2-core AMD EPYC CPU (perf_notes.md section 4,
    batches 64-256, every ResNet-18 width-16/64 and small-VGG conv shape): tap matmuls were
    as fast or faster (1.0-11x) on every shape but one, 16x16 outputs with 32 -> 32 channels
    (lax 1.55x faster), so

    * ``"lax"`` for kernels larger than 1x1 with ``256 <= H_out * W_out < 1024`` output
      positions and ``C_in * C_out <= 1024``;
    * ``"taps"`` otherwise.

    Args:
      w_shape: the kernel shape ``[kh, kw, C_in, C_out]``.
      out_shape: the output (gradient) shape ``[B, H_out, W_out, C_out]``.
    """
    kh, kw, cin, cout = w_shape
    positions = out_shape[1] * out_shape[2]
    if (kh * kw > 1 and _LAX_POSITIONS[0] <= positions < _LAX_POSITIONS[1]
            and cin * cout <= _LAX_MAX_CHANNEL_PRODUCT):
        return "lax"
    return "taps"


def _lax_conv(x, w, strides, pads):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DIMS)


def tap_weight_grad(x: Array, g: Array, kernel: Sequence[int], strides: Sequence[int],
                    pads) -> Array:
    """The weight gradient ``float32[kh, kw, C_in, C_out]`` as one matmul per kernel tap.

    Args:
      x: the conv input ``[B, H, W, C_in]``.
      g: the output gradient ``[B, H_out, W_out, C_out]``.
      kernel: ``(kh, kw)``; strides: ``(sh, sw)``; pads: ``((lo, hi), (lo, hi))`` (may be < 0).
    """
    (kh, kw), (sh, sw) = kernel, strides
    batch, ho, wo, cout = g.shape
    cin = x.shape[-1]
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (pads[0][0], pads[0][1], 0), (pads[1][0], pads[1][1], 0),
                  (0, 0, 0)))
    g2 = g.reshape(-1, cout)
    rows = []
    for i in range(kh):
        for j in range(kw):
            tap = lax.slice(xp, (0, i, j, 0),
                            (batch, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin),
                            (1, sh, sw, 1))
            # [N, C_in]^T [N, C_out], contracting N = B * H_out * W_out.
            rows.append(lax.dot_general(tap.reshape(-1, cin), g2, (((0,), (0,)), ((), ()))))
    return jnp.stack(rows).reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: Array, w: Array, strides, pads) -> Array:
    return _lax_conv(x, w, strides, pads)


def _conv_fwd(x, w, strides, pads):
    return _conv(x, w, strides, pads), (x, w)


def _conv_bwd(strides, pads, res, g):
    x, w = res
    # Unused halves (dw in a trigger step, dx of the first conv) are removed by XLA's DCE.
    dx = jax.vjp(lambda a: _lax_conv(a, w, strides, pads), x)[1](g)[0]
    if weight_grad_method(w.shape, g.shape) == "taps":
        dw = tap_weight_grad(x, g, w.shape[:2], strides, pads)
    else:
        dw = jax.vjp(lambda b: _lax_conv(x, b, strides, pads), w)[1](g)[0]
    return dx.astype(x.dtype), dw.astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _applies(lhs, rhs, dims, lhs_dilation, rhs_dilation, feature_group_count,
             batch_group_count, precision, preferred_element_type) -> bool:
    def unit(values):
        return values is None or all(int(v) == 1 for v in values)

    canonical_dims = dims == _DIMS or (isinstance(dims, lax.ConvDimensionNumbers) and
                                       dims == lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                                          _DIMS))
    return (canonical_dims and lhs.ndim == 4 and unit(lhs_dilation) and unit(rhs_dilation)
            and feature_group_count == 1 and batch_group_count == 1 and precision is None
            and preferred_element_type is None)


def fast_conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int],
                              padding, lhs_dilation=None, rhs_dilation=None,
                              dimension_numbers=None, feature_group_count: int = 1,
                              batch_group_count: int = 1, precision=None,
                              preferred_element_type=None) -> Array:
    """``lax.conv_general_dilated`` whose weight gradient is chosen per shape (see module doc).

    Applies to 2-D convs with ``dimension_numbers`` NHWC/HWIO/NHWC, unit dilations, one group
    and default precision, with any strides and any padding (a string or explicit pairs); any
    other call is passed to ``lax.conv_general_dilated`` unchanged. Values equal lax's; the
    weight gradient equals lax's up to float32 summation order.
    """
    if not _applies(lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation,
                    feature_group_count, batch_group_count, precision, preferred_element_type):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, pads)
