"""CIFAR-style ResNet-18, the kuangliu variant that the official AWM code uses (awm-paper.md 2.2).

Unlike the ImageNet ResNet, the stem is a single 3x3 stride-1 conv with no max-pool, so a 32x32
input reaches the last stage at 4x4. The official code then takes a 4x4 average pool; we average
over H and W instead, which is the same on 32x32 inputs and also works on other sizes.

Parameter paths, and the kuangliu / official AWM PyTorch ``state_dict`` names they correspond to
(``i`` in 1..4 is the stage, ``j`` in 0..1 the block within it; BatchNorm ``scale``/``bias`` are
PyTorch ``weight``/``bias``, and ``batch_stats`` ``mean``/``var`` are ``running_mean``/
``running_var``)::

    ours (params / batch_stats)               PyTorch
    ----------------------------------------  ------------------------------
    stem_conv/kernel                          conv1.weight
    stem_bn/{scale,bias,mean,var}             bn1.*
    layer{i}_block{j}/conv1/kernel            layer{i}.{j}.conv1.weight
    layer{i}_block{j}/bn1/*                   layer{i}.{j}.bn1.*
    layer{i}_block{j}/conv2/kernel            layer{i}.{j}.conv2.weight
    layer{i}_block{j}/bn2/*                   layer{i}.{j}.bn2.*
    layer{i}_block{j}/shortcut_conv/kernel    layer{i}.{j}.shortcut.0.weight
    layer{i}_block{j}/shortcut_bn/*           layer{i}.{j}.shortcut.1.*
    linear/{kernel,bias}                      linear.{weight,bias}

Only ``layer2_block0``, ``layer3_block0`` and ``layer4_block0`` have a shortcut conv, at any
width. Conv kernels are HWIO where PyTorch stores OIHW, and the Dense kernel is
``[in, out]`` where PyTorch's Linear weight is ``[out, in]``; BatchNorm ``num_batches_tracked``
has no counterpart. Convs pad explicitly by 1 (not ``"SAME"``) because on even-sized inputs a
stride-2 ``"SAME"`` conv pads only at the bottom/right, which would misalign PyTorch weights.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from awm_jax.models.base import MODELS, Normalize
from awm_jax.perf import conv_general_dilated_for
from awm_jax.types import Array

# PyTorch BatchNorm2d defaults: its momentum 0.1 weights the new batch, flax's weights the old.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
_PAD1 = ((1, 1), (1, 1))


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,
                        epsilon=_BN_EPSILON, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity or 1x1 conv-BN shortcut, then ReLU.

    Attributes:
      features: output channels of both convs.
      strides: stride of the first conv and of the shortcut conv.
      conv_impl: the conv implementation (see the network's attribute).
    """

    features: int
    strides: int = 1
    conv_impl: str = "lax"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Maps ``float32[B, H, W, C_in]`` to ``float32[B, H/strides, W/strides, features]``."""
        stride = (self.strides, self.strides)
        conv = functools.partial(nn.Conv, use_bias=False,
                                 conv_general_dilated=conv_general_dilated_for(self.conv_impl))
        y = conv(self.features, (3, 3), strides=stride, padding=_PAD1, name="conv1")(x)
        y = nn.relu(_batch_norm(train, "bn1")(y))
        y = conv(self.features, (3, 3), padding=_PAD1, name="conv2")(y)
        y = _batch_norm(train, "bn2")(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, (1, 1), strides=stride, padding="VALID",
                            name="shortcut_conv")(x)
            shortcut = _batch_norm(train, "shortcut_bn")(shortcut)
        return nn.relu(y + shortcut)


@MODELS.register("resnet18")
class ResNet18(nn.Module):
    """CIFAR ResNet-18: 3x3 stem, four stages of two BasicBlocks, global average pool, Dense.

    Attributes:
      num_classes: number of output logits.
      width: channels of the stem and first stage; the stages use ``width * (1, 2, 4, 8)``.
        64 is the official network (11,159,232 conv-kernel entries with 3 input channels);
        smaller values give cheap CPU runs.
      mean, std: optional per-channel input normalisation (applied inside the model). None, the
        default, feeds raw [0, 1] pixels as the official AWM code does.
      conv_impl: how the convs are computed (:data:`awm_jax.perf.CONV_IMPLS`): ``"lax"`` (XLA's
        own) or ``"fast"`` (per-shape weight gradient, faster on CPU); variables do not depend on
        it (switch a built model with :func:`awm_jax.perf.with_conv_impl`).
    """

    num_classes: int
    width: int = 64
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    conv_impl: str = "lax"

    def __post_init__(self):
        if self.width < 1:
            raise ValueError(f"width must be a positive integer; got {self.width}.")
        conv_general_dilated_for(self.conv_impl)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Maps images ``float32[B, H, W, C]`` in [0, 1] to logits ``float32[B, num_classes]``.

        Args:
          x: NHWC images; H and W should be divisible by 8 (32x32 in the paper).
          train: BatchNorm uses and updates batch statistics when True.
        """
        x = Normalize(self.mean, self.std)(x)
        x = nn.Conv(self.width, (3, 3), padding=_PAD1, use_bias=False, name="stem_conv",
                    conv_general_dilated=conv_general_dilated_for(self.conv_impl))(x)
        x = nn.relu(_batch_norm(train, "stem_bn")(x))
        for stage, (multiplier, strides) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
            for block in range(2):
                x = BasicBlock(self.width * multiplier, strides if block == 0 else 1,
                               self.conv_impl, name=f"layer{stage}_block{block}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="linear")(x)
