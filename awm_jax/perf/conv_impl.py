"""Conv implementations by name, and switching a model between them without new variables.

The registered models take ``conv_impl: str = "lax"`` and pass
``conv_general_dilated_for(conv_impl)`` to every ``nn.Conv``. The implementations compute the
same function (gradients equal up to float32 summation order), and none adds parameters, so a
model's variables and checkpoints do not depend on the choice.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
from jax import lax

from awm_jax.perf.canonical_conv import canonical_conv_general_dilated
from awm_jax.perf.fast_conv import fast_conv_general_dilated

_IMPLS: dict[str, Callable] = {
    "lax": lax.conv_general_dilated,
    "fast": fast_conv_general_dilated,  # per-shape weight gradient (fast_conv.py)
    "canonical": canonical_conv_general_dilated,  # loop-friendly VJP (canonical_conv.py)
}
CONV_IMPLS = tuple(_IMPLS)


def conv_general_dilated_for(impl: str) -> Callable:
    """The ``conv_general_dilated`` function named ``impl``.

    Raises:
      ValueError: ``impl`` is not one of :data:`CONV_IMPLS`.
    """
    if impl not in _IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}; got {impl!r}.")
    return _IMPLS[impl]


def with_conv_impl(model: nn.Module, impl: str) -> nn.Module:
    """A copy of ``model`` (a ``flax.linen`` module) whose convs use the implementation ``impl``.

    The copy takes the same variables as ``model``.

    Raises:
      ValueError: unknown ``impl``, or ``model`` has no ``conv_impl`` attribute.
    """
    conv_general_dilated_for(impl)
    if "conv_impl" not in getattr(type(model), "__dataclass_fields__", {}):
        raise ValueError(f"{type(model).__name__} has no conv_impl attribute; the registered "
                         "models (resnet18, preact_resnet18, small_vgg, small_cnn) have one.")
    if model.conv_impl == impl:
        return model
    return model.clone(conv_impl=impl)
