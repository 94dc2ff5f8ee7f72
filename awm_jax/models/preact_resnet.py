"""Pre-activation ResNet-18, the layout of BackdoorBench's ``PreActResNet18``.

Each block applies BN-ReLU *before* its convs (He et al., "Identity Mappings in Deep Residual
Networks"); the shortcut, where a stage changes shape, is a bare 1x1 conv applied to the
pre-activated input. The stem is one 3x3 stride-1 conv with no BN after it and the network has
no final BN: the last block's sum goes straight to global average pooling and the linear head.

Parameter paths, and the BackdoorBench PyTorch ``state_dict`` names they correspond to (``i`` in
1..4 is the stage, ``j`` in 0..1 the block within it)::

    ours (params / batch_stats)               PyTorch
    ----------------------------------------  ------------------------------
    stem_conv/kernel                          conv1.weight
    layer{i}_block{j}/bn1/*                   layer{i}.{j}.bn1.*
    layer{i}_block{j}/conv1/kernel            layer{i}.{j}.conv1.weight
    layer{i}_block{j}/bn2/*                   layer{i}.{j}.bn2.*
    layer{i}_block{j}/conv2/kernel            layer{i}.{j}.conv2.weight
    layer{i}_block{j}/shortcut_conv/kernel    layer{i}.{j}.shortcut.0.weight
    linear/{kernel,bias}                      linear.{weight,bias}

BatchNorm conventions and conv padding are those of :mod:`awm_jax.models.resnet`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from awm_jax.models.base import MODELS, Normalize
from awm_jax.perf import conv_general_dilated_for
from awm_jax.models.resnet import _PAD1, _batch_norm
from awm_jax.types import Array


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice, plus an identity or 1x1-conv shortcut of the pre-activated input.

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
        y = nn.relu(_batch_norm(train, "bn1")(x))
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, (1, 1), strides=stride, padding="VALID",
                            name="shortcut_conv")(y)
        y = conv(self.features, (3, 3), strides=stride, padding=_PAD1, name="conv1")(y)
        y = nn.relu(_batch_norm(train, "bn2")(y))
        y = conv(self.features, (3, 3), padding=_PAD1, name="conv2")(y)
        return y + shortcut


@MODELS.register("preact_resnet18")
class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18: 3x3 stem conv, four stages of two PreActBlocks, pool, Dense.

    Attributes:
      num_classes: number of output logits.
      width: channels of the stem and first stage; the stages use ``width * (1, 2, 4, 8)``.
        64 is BackdoorBench's network; smaller values give cheap CPU runs.
      mean, std: optional per-channel input normalisation (applied inside the model).
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
        """Maps images ``float32[B, H, W, C]`` in [0, 1] to logits ``float32[B, num_classes]``."""
        x = Normalize(self.mean, self.std)(x)
        x = nn.Conv(self.width, (3, 3), padding=_PAD1, use_bias=False, name="stem_conv",
                    conv_general_dilated=conv_general_dilated_for(self.conv_impl))(x)
        for stage, (multiplier, strides) in enumerate(zip((1, 2, 4, 8), (1, 2, 2, 2)), start=1):
            for block in range(2):
                x = PreActBlock(self.width * multiplier, strides if block == 0 else 1,
                                self.conv_impl, name=f"layer{stage}_block{block}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="linear")(x)
