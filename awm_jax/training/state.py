"""The training state: a pytree of arrays only, so it jits, donates, vmaps and checkpoints whole.

The model and the optax transformation are static and stay outside the state (the step factories
in :mod:`awm_jax.training.steps` close over them), so every leaf here is an array.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from awm_jax.models.base import init_variables
from awm_jax.types import Array, BatchStats, Params, PRNGKey


class TrainState(struct.PyTreeNode):
    """Everything that changes during training.

    Attributes:
      step: ``int32[]`` number of optimiser updates applied so far.
      params: the model's parameters.
      batch_stats: BatchNorm running statistics (``{}`` for models without BatchNorm).
      opt_state: the optax state of ``tx``.
    """

    step: Array
    params: Params
    batch_stats: BatchStats
    opt_state: optax.OptState

    @property
    def variables(self) -> dict:
        """``{"params", "batch_stats"}``, the pytree that models and checkpoints use."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def apply_gradients(self, tx: optax.GradientTransformation, grads: Params,
                        batch_stats: BatchStats) -> "TrainState":
        """One optimiser update with ``grads``; also stores the new BatchNorm statistics."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                            batch_stats=batch_stats, opt_state=opt_state)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: PRNGKey,
                       image_shape: Sequence[int]) -> TrainState:
    """Initialises the model's variables with ``key`` and the optimiser state for them.

    Args:
      model: a registered model (see :func:`awm_jax.models.create_model`).
      tx: the optimiser.
      key: PRNG key for parameter initialisation.
      image_shape: ``(H, W, C)`` of the inputs.

    Raises:
      ValueError: ``image_shape`` is not three positive sizes.
    """
    if len(image_shape) != 3 or any(int(s) < 1 for s in image_shape):
        raise ValueError(f"image_shape must be (H, W, C) with positive sizes; got {image_shape}.")
    image_shape = tuple(int(s) for s in image_shape)

    def init(key):
        variables = init_variables(model, key, image_shape)
        return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          batch_stats=variables["batch_stats"],
                          opt_state=tx.init(variables["params"]))

    # One compilation instead of one eager kernel per parameter shape (~1 s less on a 2-core
    # CPU for small_cnn); the values are the same either way.
    return jax.jit(init)(key)
