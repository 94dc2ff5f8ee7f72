"""The small VGG of the official AWM code (I-BAU's ``small_VGG16``; awm-paper.md 2.2).

Three stages of two 3x3 conv-BN-ELU layers (convs with bias), each stage followed by a 2x2
max-pool and dropout (0.3, 0.4, 0.4); then flatten and one Dense layer. At the default width 32
the stages have 32, 64 and 128 channels and a 32x32 input flattens to 4*4*128 = 2048 features.

Parameter paths, and the PyTorch ``state_dict`` names they correspond to (``features`` is an
``nn.Sequential`` of conv, BN, ELU per conv and max-pool, dropout per stage, so conv ``k`` in
0..5 is ``features.{3k + 2*(k // 2)}`` and its BN the index after it)::

    ours (params / batch_stats)     PyTorch
    ------------------------------  ---------------------------------------
    stage1_conv1/{kernel,bias}      features.0.{weight,bias}
    stage1_bn1/*                    features.1.*
    stage1_conv2, stage1_bn2        features.3, features.4
    stage2_conv1, stage2_bn1        features.8, features.9
    stage2_conv2, stage2_bn2        features.11, features.12
    stage3_conv1, stage3_bn1        features.16, features.17
    stage3_conv2, stage3_bn2        features.19, features.20
    linear/{kernel,bias}            classifier.{weight,bias}

BatchNorm ``scale``/``bias``/``mean``/``var`` are PyTorch ``weight``/``bias``/``running_mean``/
``running_var``. Conv kernels are HWIO where PyTorch stores OIHW. We flatten NHWC feature maps in
(H, W, C) order, PyTorch flattens NCHW in (C, H, W) order, so the PyTorch ``classifier.weight``
``[num_classes, C*H*W]`` maps to our kernel as
``w.reshape(num_classes, C, H, W).transpose(2, 3, 1, 0).reshape(H*W*C, num_classes)``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from awm_jax.models.base import MODELS, Normalize
from awm_jax.perf import conv_general_dilated_for
from awm_jax.types import Array

# PyTorch BatchNorm2d defaults: its momentum 0.1 weights the new batch, flax's weights the old.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


@MODELS.register("small_vgg")
class SmallVGG(nn.Module):
    """(conv-BN-ELU x2, max-pool, dropout) x3, flatten, Dense.

    Attributes:
      num_classes: number of output logits.
      width: channels of the first stage; the stages use ``width * (1, 2, 4)``. 32 is the
        official network (286,560 conv-kernel entries with 3 input channels).
      dropout_rates: dropout rate after each of the three stages.
      mean, std: optional per-channel input normalisation (applied inside the model). None, the
        default, feeds raw [0, 1] pixels as the official AWM code does.
      conv_impl: how the convs are computed (:data:`awm_jax.perf.CONV_IMPLS`): ``"lax"`` (XLA's
        own) or ``"fast"`` (per-shape weight gradient, faster on CPU); variables do not depend on
        it (switch a built model with :func:`awm_jax.perf.with_conv_impl`).
    """

    num_classes: int
    width: int = 32
    dropout_rates: Sequence[float] = (0.3, 0.4, 0.4)
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    conv_impl: str = "lax"

    def __post_init__(self):
        if self.width < 1:
            raise ValueError(f"width must be a positive integer; got {self.width}.")
        conv_general_dilated_for(self.conv_impl)
        if len(self.dropout_rates) != 3 or not all(0.0 <= r < 1.0 for r in self.dropout_rates):
            raise ValueError(
                f"dropout_rates must be 3 rates in [0, 1); got {tuple(self.dropout_rates)}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        """Maps images ``float32[B, H, W, C]`` in [0, 1] to logits ``float32[B, num_classes]``.

        Args:
          x: NHWC images; H and W should be divisible by 8 (32x32 in the paper).
          train: BatchNorm uses and updates batch statistics and dropout is active when True;
            dropout then needs the ``"dropout"`` rng (``apply_model``'s ``dropout_key``).
        """
        x = Normalize(self.mean, self.std)(x)
        for stage, (multiplier, rate) in enumerate(zip((1, 2, 4), self.dropout_rates), start=1):
            for index in (1, 2):
                x = nn.Conv(self.width * multiplier, (3, 3), padding=((1, 1), (1, 1)),
                            name=f"stage{stage}_conv{index}",
                            conv_general_dilated=conv_general_dilated_for(self.conv_impl))(x)
                x = nn.BatchNorm(use_running_average=not train, momentum=_BN_MOMENTUM,
                                 epsilon=_BN_EPSILON, name=f"stage{stage}_bn{index}")(x)
                x = nn.elu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.Dropout(rate, deterministic=not train)(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, name="linear")(x)
