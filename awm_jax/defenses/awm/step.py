"""AWM's pure step functions (awm-paper.md 1.3-1.4).

One epoch of AWM is

1. ``begin_epoch``: reset the trigger to zero, fix the inner-phase labels (the masked model's
   predictions on every clean image, or the true labels), set this epoch's mask learning rate;
2. ``T`` x ``trigger_step``: gradient *ascent* on the universal trigger ``delta``;
3. ``end_trigger_phase``: the once-per-epoch L1 rescale of ``delta`` (official code);
4. ``T`` x ``mask_step``: gradient descent on the mask for
   ``alpha CE(x) + beta CE(clip(x + delta)) + gamma |m|_1`` and a clip of the mask to [0, 1];
5. ``end_epoch``: count the epoch.

``trigger_phase`` (1-3) and ``mask_phase`` (4-5) run the steps under ``lax.scan`` and
``epoch_step`` composes the two: the inner trigger steps nest inside the outer mask update, and the whole epoch is one pure function that ``vmap`` can batch over
hyperparameters and keys. The host runner (:mod:`awm_jax.defenses.awm.runner`) can instead
drive the same jitted steps from Python, which is faster for conv nets on CPU.

Every step is ``(state, frozen, data, key, hparams) -> (state, metrics)`` where ``frozen`` holds
the backdoored model's fixed weights, ``data`` is the defender's whole clean set
``{"image": float32[N, H, W, C], "label": int32[N]}`` and minibatches of ``batch_size`` are drawn
from it with replacement (as the official ``RandomSampler(replacement=True)``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from awm_jax.defenses.awm.chunking import (
    choose_chunks,
    chunk_budget_bytes,
    estimate_buffer_bytes,
)
from awm_jax.defenses.awm.config import AWMConfig, AWMHparams
from awm_jax.defenses.awm.mask import apply_mask, clip_mask, create_mask, mask_l1
from awm_jax.defenses.awm.trigger import l1_rescale, project_l1_ball
from awm_jax.models.base import apply_model
from awm_jax.perf import with_conv_impl
from awm_jax.types import Array, Batch, Mask, Metrics, PRNGKey


class Frozen(NamedTuple):
    """The backdoored model's weights, which AWM never changes."""

    params: dict
    batch_stats: dict


class AWMState(struct.PyTreeNode):
    """Everything AWM updates.

    Attributes:
      mask: soft mask pytree in [0, 1] (``None`` on unmasked leaves).
      opt_state: state of the mask optimizer (learning rate inside, as an array).
      trigger: ``float32[H, W, C]`` current universal trigger.
      inner_labels: ``int32[N]`` labels the trigger ascent uses this epoch.
      epoch: ``int32[]`` completed epochs.
    """

    mask: Mask
    opt_state: optax.OptState
    trigger: Array
    inner_labels: Array
    epoch: Array


class AWMSteps(NamedTuple):
    """The pure functions of one AWM configuration (none of them is jitted here)."""

    init: Callable[..., AWMState]
    begin_epoch: Callable[..., AWMState]
    trigger_step: Callable[..., tuple[AWMState, Metrics]]
    end_trigger_phase: Callable[..., AWMState]
    selection_score: Callable[..., Array]
    mask_step: Callable[..., tuple[AWMState, Metrics]]
    end_epoch: Callable[[AWMState], AWMState]
    trigger_phase: Callable[..., tuple[AWMState, Metrics]]
    mask_phase: Callable[..., tuple[AWMState, Metrics]]
    epoch_step: Callable[..., tuple[AWMState, Metrics]]
    shrink_init: Callable
    shrink_step: Callable
    mask_buffer_bytes: Callable[..., int]
    mask_chunks_for: Callable[..., int]
    batch_size: int
    steps_per_phase: int


def _cross_entropy(logits: Array, labels: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _mask_optimizer(config: AWMConfig) -> optax.GradientTransformation:
    factory = optax.adam if config.mask_optimizer == "adam" else optax.sgd
    return optax.inject_hyperparams(factory)(learning_rate=config.mask_lr)


def _with_learning_rate(opt_state, learning_rate: Array):
    hyperparams = dict(opt_state.hyperparams)
    hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
    return opt_state._replace(hyperparams=hyperparams)


def draw_indices(data: Batch, key: PRNGKey, batch_size: int) -> Array:
    """``int32[batch_size]`` indices into ``data`` drawn uniformly with replacement."""
    return jax.random.randint(key, (batch_size,), 0, data["label"].shape[0])


def make_awm_steps(model: nn.Module, config: AWMConfig, num_clean: int) -> AWMSteps:
    """Builds the pure AWM steps for ``model`` and ``num_clean`` defender images.

    The batch is ``min(config.batch_size, num_clean)`` and each phase has
    ``max(1, num_clean // batch) * config.inner_passes`` steps, so that N < batch size still
    trains (the official code runs zero steps then). A model with a ``conv_impl`` attribute runs
    with ``config.conv_impl`` (same variables).

    Raises:
      ValueError: ``num_clean`` < 1.
    """
    if num_clean < 1:
        raise ValueError(f"AWM needs at least one clean image; got {num_clean}.")
    if hasattr(model, "conv_impl"):
        model = with_conv_impl(model, config.conv_impl)
    batch_size = min(config.batch_size, num_clean)
    steps_per_phase = max(1, num_clean // batch_size) * config.inner_passes
    tx = _mask_optimizer(config)
    shrink_tx = optax.adam(config.shrink_lr)

    def logits_fn(mask, frozen: Frozen, images):
        params = apply_mask(frozen.params, mask)
        return apply_model(model, params, frozen.batch_stats, images)[0]

    def init(params, data: Batch, hparams: AWMHparams) -> AWMState:
        mask = create_mask(params, config.mask_scope)
        opt_state = _with_learning_rate(tx.init(mask), hparams.mask_lr)
        return AWMState(mask=mask, opt_state=opt_state,
                        trigger=jnp.zeros(data["image"].shape[1:], jnp.float32),
                        inner_labels=jnp.asarray(data["label"], jnp.int32),
                        epoch=jnp.zeros((), jnp.int32))

    def begin_epoch(state: AWMState, frozen: Frozen, data: Batch,
                    hparams: AWMHparams) -> AWMState:
        if config.inner_labels == "predicted":
            # The mask is fixed during the inner phase, so one prediction per clean image
            # equals the code's per-batch predictions and costs N forwards instead of T*b.
            # lax.map hands over single images (vmapped in chunks of ``batch_size``).
            predict = lambda image: logits_fn(state.mask, frozen, image[None])[0].argmax(-1)
            labels = jax.lax.map(predict, data["image"], batch_size=batch_size)
        else:
            labels = jnp.asarray(data["label"], jnp.int32)
        learning_rate = hparams.mask_lr * hparams.lr_decay ** state.epoch.astype(jnp.float32)
        return state.replace(trigger=jnp.zeros_like(state.trigger),
                             inner_labels=labels.astype(jnp.int32),
                             opt_state=_with_learning_rate(state.opt_state, learning_rate))

    def trigger_step(state: AWMState, frozen: Frozen, data: Batch, key: PRNGKey,
                     hparams: AWMHparams) -> tuple[AWMState, Metrics]:
        index = draw_indices(data, key, batch_size)
        images, labels = data["image"][index], state.inner_labels[index]
        params = apply_mask(frozen.params, state.mask)

        def ascent_objective(trigger):
            triggered = images + trigger
            if config.clip_inner:
                triggered = jnp.clip(triggered, 0.0, 1.0)
            logits = apply_model(model, params, frozen.batch_stats, triggered)[0]
            return _cross_entropy(logits, labels)

        loss, grad = jax.value_and_grad(ascent_objective)(state.trigger)
        trigger = state.trigger + hparams.trigger_lr * grad
        if config.trigger_constraint == "project_step":
            trigger = project_l1_ball(trigger, hparams.tau)
        return state.replace(trigger=trigger), {"trigger_ce": loss}

    def end_trigger_phase(state: AWMState, hparams: AWMHparams) -> AWMState:
        if config.trigger_constraint == "rescale_epoch":
            return state.replace(trigger=l1_rescale(state.trigger, hparams.tau))
        return state

    def outer_objective(mask, frozen: Frozen, images, labels, trigger, hparams: AWMHparams,
                        weight: float = 1.0):
        """``weight * (alpha CE(x) + beta CE(clip(x + delta)) + gamma |m|_1)`` and its metrics
        (each metric times ``weight``), so that chunks whose weights sum to 1 add up to the
        whole batch's loss and metrics."""
        triggered = images + trigger
        if config.clip_outer:
            triggered = jnp.clip(triggered, 0.0, 1.0)
        # One forward over clean and triggered images together: BN is in eval mode, so this
        # equals two separate forwards and keeps the convolutions large.
        logits = logits_fn(mask, frozen, jnp.concatenate([images, triggered]))
        clean_logits, triggered_logits = jnp.split(logits, 2)
        clean_ce = _cross_entropy(clean_logits, labels)
        triggered_ce = _cross_entropy(triggered_logits, labels)
        beta = 1.0 - hparams.alpha if config.tie_beta else hparams.beta
        l1 = mask_l1(mask)
        loss = hparams.alpha * clean_ce + beta * triggered_ce + hparams.gamma * l1
        metrics = {"loss": loss, "clean_ce": clean_ce, "triggered_ce": triggered_ce,
                   "mask_l1": l1,
                   "clean_acc": jnp.mean(clean_logits.argmax(-1) == labels),
                   "triggered_acc": jnp.mean(triggered_logits.argmax(-1) == labels)}
        return weight * loss, {name: weight * value for name, value in metrics.items()}

    def gradient(mask, frozen: Frozen, images, labels, trigger, hparams: AWMHparams,
                 weight: float = 1.0):
        return jax.grad(outer_objective, has_aux=True)(mask, frozen, images, labels, trigger,
                                                       hparams, weight)

    def chunk_count(mask, frozen: Frozen, images, labels, trigger, hparams: AWMHparams) -> int:
        """``config.mask_chunks``, or for ``"auto"`` the count :mod:`.chunking` picks from
        these arguments' shapes (per member under ``vmap``)."""
        if config.mask_chunks != "auto":
            return min(config.mask_chunks, batch_size)
        buffer_bytes = estimate_buffer_bytes(gradient, mask, frozen, images, labels,
                                             trigger, hparams)
        return choose_chunks(buffer_bytes, batch_size, chunk_budget_bytes())

    def abstract_batch(state: AWMState, frozen: Frozen, data: Batch, hparams: AWMHparams):
        images = jax.ShapeDtypeStruct((batch_size, *data["image"].shape[1:]),
                                      data["image"].dtype)
        labels = jax.ShapeDtypeStruct((batch_size,), data["label"].dtype)
        return state.mask, frozen, images, labels, state.trigger, hparams

    def mask_buffer_bytes(state: AWMState, frozen: Frozen, data: Batch,
                          hparams: AWMHparams) -> int:
        """The estimated temporary memory of the whole-batch mask gradient
        (:func:`.chunking.estimate_buffer_bytes`; shapes only, nothing is computed)."""
        return estimate_buffer_bytes(gradient, *abstract_batch(state, frozen, data,
                                                                     hparams))

    def mask_chunks_for(state: AWMState, frozen: Frozen, data: Batch,
                        hparams: AWMHparams) -> int:
        """The number of chunks ``mask_step`` splits its batch into for these inputs."""
        return chunk_count(*abstract_batch(state, frozen, data, hparams))

    def mask_gradient(mask, frozen: Frozen, images, labels, trigger, hparams: AWMHparams):
        """The outer loss's mask gradient over the batch, accumulated over
        ``config.mask_chunks`` chunks computed one after another."""
        chunks = chunk_count(mask, frozen, images, labels, trigger, hparams)
        if chunks == 1:
            return gradient(mask, frozen, images, labels, trigger, hparams)
        grads = metrics = None
        for index in range(chunks):
            start, stop = batch_size * index // chunks, batch_size * (index + 1) // chunks
            chunk = images[start:stop]
            if grads is not None:
                # The next chunk's forward waits for this chunk's backward, so XLA can give
                # both the same temporary buffer instead of running them side by side.
                grads, metrics, chunk = jax.lax.optimization_barrier((grads, metrics, chunk))
            chunk_grads, chunk_metrics = gradient(mask, frozen, chunk, labels[start:stop],
                                                  trigger, hparams, (stop - start) / batch_size)
            if grads is None:
                grads, metrics = chunk_grads, chunk_metrics
            else:
                grads = jax.tree.map(jnp.add, grads, chunk_grads)
                metrics = jax.tree.map(jnp.add, metrics, chunk_metrics)
        return grads, metrics

    def mask_step(state: AWMState, frozen: Frozen, data: Batch, key: PRNGKey,
                  hparams: AWMHparams) -> tuple[AWMState, Metrics]:
        index = draw_indices(data, key, batch_size)
        images, labels = data["image"][index], data["label"][index]
        grads, metrics = mask_gradient(state.mask, frozen, images, labels, state.trigger,
                                       hparams)
        updates, opt_state = tx.update(grads, state.opt_state, state.mask)
        mask = clip_mask(optax.apply_updates(state.mask, updates))
        return state.replace(mask=mask, opt_state=opt_state), metrics

    def end_epoch(state: AWMState) -> AWMState:
        return state.replace(epoch=state.epoch + 1)

    def selection_score(state: AWMState, frozen: Frozen, data: Batch,
                        hparams: AWMHparams) -> Array:
        """``mean CE(x) + mean CE(clip(x + trigger))`` of the current mask over all clean images.

        Called right after a trigger phase, it scores the mask that the trigger was recovered
        against: a worst-case robustness estimate that needs no test data.
        """
        del hparams

        def per_image(example):
            image, label = example
            both = jnp.stack([image, jnp.clip(image + state.trigger, 0.0, 1.0)])
            logits = logits_fn(state.mask, frozen, both)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits, jnp.stack([label, label])).sum()

        return jax.lax.map(per_image, (data["image"], data["label"]),
                           batch_size=batch_size).mean()

    def trigger_phase(state: AWMState, frozen: Frozen, data: Batch, key: PRNGKey,
                      hparams: AWMHparams) -> tuple[AWMState, Metrics]:
        """begin_epoch, T trigger steps under ``lax.scan``, end_trigger_phase (and the score)."""
        state = begin_epoch(state, frozen, data, hparams)
        state, metrics = jax.lax.scan(
            lambda s, k: trigger_step(s, frozen, data, k, hparams), state,
            phase_keys(key, steps_per_phase)[0])
        state = end_trigger_phase(state, hparams)
        metrics = {name: value.mean() for name, value in metrics.items()}
        metrics["trigger_l1"] = jnp.sum(jnp.abs(state.trigger))
        if config.mask_selection == "min_robust_loss":
            metrics["selection_score"] = selection_score(state, frozen, data, hparams)
        return state, metrics

    def mask_phase(state: AWMState, frozen: Frozen, data: Batch, key: PRNGKey,
                   hparams: AWMHparams) -> tuple[AWMState, Metrics]:
        """T mask steps under ``lax.scan`` with the trigger fixed, then end_epoch."""
        state, metrics = jax.lax.scan(
            lambda s, k: mask_step(s, frozen, data, k, hparams), state,
            phase_keys(key, steps_per_phase)[1])
        return end_epoch(state), {name: value.mean() for name, value in metrics.items()}

    def epoch_step(state: AWMState, frozen: Frozen, data: Batch, key: PRNGKey,
                   hparams: AWMHparams) -> tuple[AWMState, Metrics]:
        """One whole AWM epoch as one pure function (the inner phase nests inside)."""
        state, trigger_metrics = trigger_phase(state, frozen, data, key, hparams)
        state, mask_metrics = mask_phase(state, frozen, data, key, hparams)
        return state, {**trigger_metrics, **mask_metrics}

    def shrink_step(state: AWMState, shrink_opt_state, frozen: Frozen, data: Batch,
                    key: PRNGKey, hparams: AWMHparams):
        """The code's optional pre-phase: Adam on ``CE(x) + gamma |m|_1``, no trigger."""
        index = draw_indices(data, key, batch_size)
        images, labels = data["image"][index], data["label"][index]

        def objective(mask):
            ce = _cross_entropy(logits_fn(mask, frozen, images), labels)
            return ce + hparams.gamma * mask_l1(mask), ce

        (loss, ce), grads = jax.value_and_grad(objective, has_aux=True)(state.mask)
        updates, shrink_opt_state = shrink_tx.update(grads, shrink_opt_state, state.mask)
        mask = clip_mask(optax.apply_updates(state.mask, updates))
        return state.replace(mask=mask), shrink_opt_state, {"shrink_loss": loss, "clean_ce": ce}

    return AWMSteps(init=init, begin_epoch=begin_epoch, trigger_step=trigger_step,
                    end_trigger_phase=end_trigger_phase, selection_score=selection_score,
                    mask_step=mask_step, end_epoch=end_epoch, trigger_phase=trigger_phase,
                    mask_phase=mask_phase, epoch_step=epoch_step, shrink_init=shrink_tx.init,
                    shrink_step=shrink_step, mask_buffer_bytes=mask_buffer_bytes,
                    mask_chunks_for=mask_chunks_for,
                    batch_size=batch_size,
                    steps_per_phase=steps_per_phase)


def phase_keys(key: PRNGKey, steps_per_phase: int) -> tuple[Array, Array]:
    """The per-step keys of one epoch's trigger and mask phases, shared by both loop modes."""
    trigger_key, mask_key = jax.random.split(key)
    return (jax.random.split(trigger_key, steps_per_phase),
            jax.random.split(mask_key, steps_per_phase))
