"""A small CNN for tiny inputs (digits, smoke tests)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from awm_jax.models.base import MODELS, Normalize
from awm_jax.perf import conv_general_dilated_for
from awm_jax.types import Array


@MODELS.register("small_cnn")
class SmallCNN(nn.Module):
    """conv-BN-ReLU blocks with 2x2 max-pooling after each, then flatten and one dense layer.

    Attributes:
      num_classes: number of output logits.
      features: channels of each conv block; one 2x2 max-pool follows each block.
      mean, std: optional per-channel input normalisation (applied inside the model).
      conv_impl: how the convs are computed (:data:`awm_jax.perf.CONV_IMPLS`): ``"lax"`` (XLA's
        own) or ``"fast"`` (per-shape weight gradient, faster on CPU); variables do not depend on
        it (switch a built model with :func:`awm_jax.perf.with_conv_impl`).
    """

    num_classes: int
    features: Sequence[int] = (16, 32)
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    conv_impl: str = "lax"

    def __post_init__(self):
        conv_general_dilated_for(self.conv_impl)
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        x = Normalize(self.mean, self.std)(x)
        for width in self.features:
            x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False,
                        conv_general_dilated=conv_general_dilated_for(self.conv_impl))(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)
