"""The one apply contract shared by every model.

A model is a ``flax.linen`` module whose ``__call__(x, train)`` takes NHWC float32 pixels in
``[0, 1]`` and returns logits ``float32[B, num_classes]``. Any input normalisation happens inside
the module, so that attacks and recovered triggers act on raw pixels. Variables are the pytree
``{"params": ..., "batch_stats": ...}``; models without BatchNorm have an empty ``batch_stats``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from awm_jax.registry import Registry
from awm_jax.types import Array, PRNGKey, Variables

MODELS: Registry = Registry("model")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; identity when ``mean`` is None."""

    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        if self.mean is None:
            return x
        mean = jnp.asarray(self.mean, x.dtype)
        std = jnp.asarray(self.std if self.std is not None else [1.0] * len(self.mean), x.dtype)
        return (x - mean) / std


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Builds the registered model ``name`` with ``num_classes`` outputs.

    Raises:
      ValueError: unknown model name (the message lists the known ones) or ``num_classes < 2``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}.")
    return MODELS.get(name)(num_classes=num_classes, **kwargs)


def init_variables(model: nn.Module, key: PRNGKey, image_shape: Sequence[int]) -> Variables:
    """Initialises ``{"params", "batch_stats"}`` for images of shape ``(H, W, C)``."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init(key, dummy, train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def check_images_fit(model: nn.Module, variables: Variables, image_shape: Sequence[int],
                     name: str = "images") -> None:
    """Checks, without computing anything, that ``model`` runs on images of ``image_shape``.

    A dataset of another size or channel count than the one a model was trained on otherwise
    fails deep inside flax (a parameter shape error) or, for models that pool globally, not at all.

    Raises:
      ValueError: the model's variables do not accept ``(1, *image_shape)`` inputs.
    """
    dummy = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), dict(variables), dummy)
    except Exception as err:  # flax raises several scope and shape errors; report them as one.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(
            f"{name} of shape {tuple(image_shape)} (H, W, C) do not fit the model "
            f"{type(model).__name__} ({type(err).__name__}: {first_line}). Use images of the "
            "size and channel count it was trained on (resize with image_size= when loading).") \
            from err


def apply_model(model: nn.Module, params, batch_stats, images: Array, train: bool = False,
                dropout_key: PRNGKey | None = None) -> tuple[Array, dict]:
    """Pure forward pass.

    Args:
      model: the flax module.
      params: parameter pytree (possibly already multiplied by a mask).
      batch_stats: BatchNorm running statistics (``{}`` if none).
      images: ``float32[B, H, W, C]`` in ``[0, 1]``.
      train: BatchNorm uses batch statistics and dropout is active when True.
      dropout_key: PRNG key for dropout; required in train mode by models with dropout.

    Returns:
      ``(logits float32[B, num_classes], new_batch_stats)``; in eval mode ``new_batch_stats`` is
      ``batch_stats`` unchanged.
    """
    variables = {"params": params, "batch_stats": batch_stats}
    if not train:
        return model.apply(variables, images, train=False), batch_stats
    rngs = {"dropout": dropout_key} if dropout_key is not None else {}
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                  rngs=rngs)
    return logits, updates.get("batch_stats", batch_stats)
