"""Opt-in performance helpers (see experiments/results/perf_notes.md).

:data:`CONV_IMPLS` names the conv implementations the registered models accept as their
``conv_impl`` attribute; :func:`conv_general_dilated_for` maps a name to the function that
``nn.Conv(..., conv_general_dilated=...)`` takes.
"""

from awm_jax.perf.canonical_conv import canonical_conv_general_dilated
from awm_jax.perf.conv_impl import CONV_IMPLS, conv_general_dilated_for, with_conv_impl
from awm_jax.perf.fast_conv import (fast_conv_general_dilated, input_grad_method,
                                     phase_input_grad, weight_grad_method)

__all__ = ["CONV_IMPLS", "canonical_conv_general_dilated", "conv_general_dilated_for",
           "fast_conv_general_dilated", "input_grad_method", "phase_input_grad",
           "weight_grad_method", "with_conv_impl"]
