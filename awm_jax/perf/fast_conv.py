"""A drop-in ``lax.conv_general_dilated`` with a faster weight gradient on XLA CPU.

XLA CPU computes the weight gradient of an NHWC/HWIO conv as one convolution whose "kernel" is
the output gradient; on large feature maps that path runs at a few GFLOP/s and costs 3-15x the
forward (experiments/results/perf_notes.md, section 4). Written as one matmul per kernel tap,

    dW[i, j] = sum_{b, h, w} x_pad[b, s*h + i, s*w + j, :]^T  g[b, h, w, :],

i.e. ``kh * kw`` products ``[C_in, N] @ [N, C_out]`` with ``N = B * H_out * W_out``, the same
numbers (float32 rounding aside) come out 2-13x faster for 1x1 kernels, faster for most
strided convs and for stride-1 convs with a lot of work; below that lax's own kernel wins on
the machine the results come from (the taps' window copies cost more than their dots save).
:func:`fast_conv_general_dilated` gives NHWC/HWIO convs (any stride and explicit or
string padding, unit dilation, one group) a ``custom_vjp`` whose backward picks the formulation
per static shape with :func:`weight_grad_method`, a fixed rule derived from the measurements
in perf_notes.md (no timing at run time). The forward is lax's own, and so is the input
gradient except for large strided convs, whose dilated-conv gradient XLA CPU runs in a slow
generic loop: :func:`input_grad_method` sends those to :func:`phase_input_grad` (one stride-1
conv per stride phase). Anything else falls through to ``lax``.

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

# weight_grad_method's rule (see its docstring and perf_notes.md sections 4 and 10).
_LAX_POSITIONS = (256, 1024)  # strided: output positions per image, [low, high)
_LAX_MAX_CHANNEL_PRODUCT = 32 * 32  # strided: C_in * C_out at most
TAPS_MIN_STRIDE1_WORK = 2 ** 30  # stride 1: B * H_out * W_out * C_in * C_out for the taps
TAPS_MIN_STRIDE1_CHANNELS = 2 ** 18  # stride 1: or C_in * C_out (512 x 512) for the taps
# input_grad_method: the smallest B * H_out * W_out for which the phases replace lax.
PHASES_MIN_ROWS = 8192
PHASES_MIN_ROWS_1X1 = 32768


def weight_grad_method(w_shape: Sequence[int], out_shape: Sequence[int],
                       strides: Sequence[int] = (1, 1)) -> str:
    """``"taps"`` or ``"lax"``: how the weight gradient of this conv is computed.

    The rule, from interleaved measurements on the 2-core Zen 5 CPU that the current results
    come from (perf_notes.md section 10, ``weight_grad_rule.py``: every conv of ResNet-18 widths
    16 and 64 at batches 32-256), with ``N = B * H_out * W_out`` output rows:

    * 1x1 kernels: ``"taps"`` (one plain matmul, 2.3-13x faster than lax);
    * larger kernels at stride 1: ``"taps"`` once ``N * C_in * C_out >= 2**30``
      (:data:`TAPS_MIN_STRIDE1_WORK`; ResNet-18 width 64 at batch 256: 1.07-2.2x) or
      ``C_in * C_out >= 2**18`` (:data:`TAPS_MIN_STRIDE1_CHANNELS`; 512 -> 512 on 4x4 maps,
      where the window copies are small next to the dots: 1.0-1.6x), ``"lax"`` otherwise (its
      YNNPACK weight gradient beat the taps' nine window copies 1.1-3.5x at the chunk sizes
      AWM's mask step runs, e.g. 32 images of width 64: 27.6 against 54.6 ms);
    * larger kernels at a stride above 1: ``"taps"`` (0.8-2.0x, mostly faster) except
      ``256 <= H_out * W_out < 1024`` output positions with ``C_in * C_out <= 1024``, where
      lax was faster on the first machine (perf_notes.md section 4).

    The first machine (an older 2-core EPYC) favoured the taps at stride 1 too (1.0-4.1x,
    section 4): the crossing point depends on the CPU's convolution kernels, and this rule
    follows the machine the published numbers were measured on.

    Args:
      w_shape: the kernel shape ``[kh, kw, C_in, C_out]``.
      out_shape: the output (gradient) shape ``[B, H_out, W_out, C_out]``.
      strides: ``(sh, sw)``.
    """
    kh, kw, cin, cout = w_shape
    if kh * kw == 1:
        return "taps"
    batch, ho, wo = out_shape[:3]
    if all(s == 1 for s in strides):
        taps = (batch * ho * wo * cin * cout >= TAPS_MIN_STRIDE1_WORK
                or cin * cout >= TAPS_MIN_STRIDE1_CHANNELS)
        return "taps" if taps else "lax"
    if _LAX_POSITIONS[0] <= ho * wo < _LAX_POSITIONS[1] and cin * cout <= _LAX_MAX_CHANNEL_PRODUCT:
        return "lax"
    return "taps"


def input_grad_method(kernel: Sequence[int], strides: Sequence[int], pads,
                      out_shape: Sequence[int]) -> str:
    """``"phases"`` or ``"lax"``: how the input gradient of this conv is computed.

    XLA CPU runs a strided conv's input gradient (a convolution over the output gradient
    dilated by the stride) in Eigen's generic ``convolution-base-dilated`` loop instead of
    YNNPACK. :func:`phase_input_grad` gives the same numbers from undilated stride-1 convs.
    Measured on ResNet-18's stride-2 shapes (widths 16 and 64, batches 32-256, Zen 5;
    perf_notes.md section 7), with ``N = B * H_out * W_out`` output rows: for kernels larger
    than 1x1 the phases ran 1.09-2.41x faster from ``N = 8192`` up and 0.61-0.97x below, where
    the dilated conv still fits in cache; for 1x1 kernels (about a millisecond either way but
    for width 64's stage-2 shortcut at batch 128, 17.5 against 11.9 ms) 0.89-1.68x from
    ``N = 32768`` up and 0.55-1.27x below. So ``"phases"`` for a stride
    above 1, non-negative padding and at least :data:`PHASES_MIN_ROWS` (``8192``, or ``32768``
    for 1x1 kernels) output rows; ``"lax"`` otherwise (stride 1 already takes the fast path).

    Args:
      kernel: ``(kh, kw)``; strides: ``(sh, sw)``; pads: ``((lo, hi), (lo, hi))``.
      out_shape: the output (gradient) shape ``[B, H_out, W_out, C_out]``.
    """
    rows = out_shape[0] * out_shape[1] * out_shape[2]
    min_rows = PHASES_MIN_ROWS_1X1 if tuple(kernel) == (1, 1) else PHASES_MIN_ROWS
    if (any(s > 1 for s in strides) and all(p >= 0 for pair in pads for p in pair)
            and rows >= min_rows):
        return "phases"
    return "lax"


def phase_input_grad(g: Array, w: Array, x_shape: Sequence[int], strides: Sequence[int],
                     pads) -> Array:
    """The input gradient ``[B, H, W, C_in]`` of a strided conv from ``sh * sw`` stride-1 convs.

    Input row ``p = s*q + r`` of the padded input receives ``g[q - m] @ w[r + s*m]^T`` over
    ``m``: for each phase ``r`` that is a stride-1 correlation of ``g`` with the sub-kernel
    ``w[r::s]`` flipped and transposed. The phases are computed separately (together exactly
    the FLOPs of the dilated conv's non-zero terms), interleaved back into the padded grid and
    cropped to the unpadded input; a phase no tap reaches (a 1x1 kernel's odd rows) is zero.

    Args:
      g: the output gradient ``[B, H_out, W_out, C_out]``.
      w: the kernel ``[kh, kw, C_in, C_out]``.
      x_shape: the input shape ``[B, H, W, C_in]``.
      strides: ``(sh, sw)``; pads: ``((lo, hi), (lo, hi))``, all ``>= 0``.
    """
    cin = w.shape[2]
    batch, ho, wo, _ = g.shape
    (sh, sw), ((top, _), (left, _)) = strides, pads
    # Phase rows per stride step, enough to cover the padded rows up to the input's last one.
    qh, qw = -(-(top + x_shape[1]) // sh), -(-(left + x_shape[2]) // sw)
    phase_rows = []
    for rh in range(sh):
        phase_cols = []
        for rw in range(sw):
            sub = w[rh::sh, rw::sw]
            nh, nw = sub.shape[:2]
            if nh == 0 or nw == 0:
                phase_cols.append(jnp.zeros((batch, qh, qw, cin), g.dtype))
                continue
            kernel = jnp.swapaxes(sub[::-1, ::-1], 2, 3)  # [nh, nw, C_out, C_in]
            phase_cols.append(lax.conv_general_dilated(
                g, kernel, (1, 1), ((nh - 1, qh - ho), (nw - 1, qw - wo)),
                dimension_numbers=_DIMS))
        phase_rows.append(jnp.stack(phase_cols, axis=3))  # [B, qh, qw, sw, C_in]
    padded = jnp.stack(phase_rows, axis=2).reshape(batch, qh * sh, qw * sw, cin)
    return padded[:, top:top + x_shape[1], left:left + x_shape[2]]


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
    if input_grad_method(w.shape[:2], strides, pads, g.shape) == "phases":
        dx = phase_input_grad(g, w, x.shape, strides, pads)
    else:
        dx = jax.vjp(lambda a: _lax_conv(a, w, strides, pads), x)[1](g)[0]
    if weight_grad_method(w.shape, g.shape, strides) == "taps":
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
