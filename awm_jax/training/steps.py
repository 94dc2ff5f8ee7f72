"""Pure training and evaluation steps.

The factories close over the static pieces (model, optimiser, augmentation settings) and return
un-jitted functions; the host loop jits them in one place and donates the state. Steps do no
host syncs: a NaN loss comes back as a metric for the host to check.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from awm_jax.data.augment import random_crop_flip
from awm_jax.models.base import apply_model
from awm_jax.training.state import TrainState
from awm_jax.types import Array, ArrayLike, Batch, Metrics, PRNGKey

TrainStepFn = Callable[[TrainState, Batch, PRNGKey], tuple[TrainState, Metrics]]
EvalStepFn = Callable[[TrainState, Batch], Metrics]


def cross_entropy(logits: ArrayLike, labels: ArrayLike) -> Array:
    """Mean softmax cross-entropy of ``float32[B, K]`` logits against ``int32[B]`` labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _accuracy(logits: Array, labels: Array) -> Array:
    return jnp.mean(jnp.argmax(logits, -1) == labels)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *,
                    crop_padding: int = 0, flip: bool = False) -> TrainStepFn:
    """Returns ``train_step(state, batch, key) -> (state, metrics)``, one SGD update.

    The step augments the batch (random crop with ``crop_padding`` and/or flips, when enabled),
    runs the model in train mode (BatchNorm uses and updates batch statistics, dropout is on),
    and applies ``tx`` to the cross-entropy gradient. ``key`` is the run's training key: the step
    folds in ``state.step`` (as flax's lm1b example does), so the caller passes the same key every
    step and still gets fresh augmentation and dropout randomness, with no key work on the host.

    Args:
      model: the flax module.
      tx: the optimiser (weight decay and schedule included).
      crop_padding: random-crop padding in pixels; 0 disables cropping.
      flip: random horizontal flips.

    Returns:
      A pure function. ``batch`` is ``{"image": float32[B, H, W, C], "label": int32[B]}``;
      ``metrics`` is ``{"loss": float32[], "accuracy": float32[]}`` on the augmented batch,
      measured before the update.

    Raises:
      ValueError: negative ``crop_padding``.
    """
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0 (0 disables cropping); got {crop_padding}.")
    augment = crop_padding > 0 or flip

    def train_step(state: TrainState, batch: Batch, key: PRNGKey) -> tuple[TrainState, Metrics]:
        aug_key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
        images, labels = batch["image"], batch["label"]
        if augment:
            images = random_crop_flip(images, aug_key, padding=crop_padding, flip=flip)

        def loss_fn(params):
            logits, batch_stats = apply_model(model, params, state.batch_stats, images,
                                              train=True, dropout_key=dropout_key)
            return cross_entropy(logits, labels), (logits, batch_stats)

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        new_state = state.apply_gradients(tx, grads, batch_stats)
        return new_state, {"loss": loss, "accuracy": _accuracy(logits, labels)}

    return train_step


def make_eval_step(model: nn.Module) -> EvalStepFn:
    """Returns ``eval_step(state, batch) -> {"loss", "accuracy"}`` in eval mode (running BN stats).

    ``batch`` may carry an optional ``"weight": float32[B]`` (0 for padding rows, 1 otherwise),
    so that a short last batch can be padded to the fixed shape without biasing the means.
    """

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        logits, _ = apply_model(model, state.params, state.batch_stats, batch["image"])
        labels = batch["label"]
        weight = batch.get("weight", jnp.ones(labels.shape, jnp.float32))
        total = jnp.maximum(weight.sum(), 1.0)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = jnp.argmax(logits, -1) == labels
        return {"loss": jnp.sum(losses * weight) / total,
                "accuracy": jnp.sum(correct * weight) / total}

    return eval_step
