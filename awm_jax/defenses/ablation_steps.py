"""Pure steps of the ANP-to-AWM ablation (:mod:`awm_jax.defenses.ablation`).

Built from the two methods' own pieces: ANP's BN rewriting, noise and ascent
(:mod:`awm_jax.defenses.anp`) and AWM's weight mask, L1 term, trigger rescale and batch draws
(:mod:`awm_jax.defenses.awm`). Every step is ``(state, frozen, data, key, hparams) ->
(state, metrics)`` over the defender's whole clean set ``data`` (batches drawn with
replacement), as in :mod:`awm_jax.defenses.awm.step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.traverse_util import flatten_dict

from awm_jax.defenses.anp import (
    batchnorm_paths,
    noise_ascent,
    scale_batchnorm,
    uniform_noise,
)
from awm_jax.defenses.awm.mask import apply_mask, clip_mask, create_mask, mask_l1
from awm_jax.defenses.awm.step import Frozen, draw_indices
from awm_jax.defenses.awm.trigger import l1_rescale
from awm_jax.models.base import apply_model
from awm_jax.types import Array, Batch, Metrics, PRNGKey, Variables


class AblationHparams(NamedTuple):
    """Swept numbers (float32 scalars)."""

    alpha: Array
    gamma: Array
    eps: Array
    tau: Array
    trigger_lr: Array
    mask_lr: Array
    momentum: Array


class AblationState(struct.PyTreeNode):
    """What the ablation updates.

    Attributes:
      mask: ``{"bn/path": float32[C]}`` (neuron mask) or an AWM weight-mask pytree, in [0, 1].
      opt_state: the mask optimiser's state (its hyperparameters inside, as arrays).
      trigger: ``float32[H, W, C]`` universal trigger (zeros unless the adversary is a trigger).
      inner_labels: ``int32[N]`` labels of this epoch's trigger ascent.
      step: ``int32[]`` mask steps done.
    """

    mask: Any
    opt_state: optax.OptState
    trigger: Array
    inner_labels: Array
    step: Array


class AblationSteps(NamedTuple):
    """The pure functions of one ablation configuration (none is jitted here)."""

    init: Callable[..., AblationState]
    begin_epoch: Callable[..., AblationState]
    trigger_step: Callable[..., tuple[AblationState, Metrics]]
    end_trigger_phase: Callable[..., AblationState]
    mask_step: Callable[..., tuple[AblationState, Metrics]]
    batch_size: int
    steps_per_epoch: int


def _cross_entropy(logits: Array, labels: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _scale_weights(params, coeff):
    """``params * coeff`` on the leaves where ``coeff`` is not None (no clipping)."""
    return jax.tree_util.tree_map(lambda c, p: p if c is None else p * c, coeff, params,
                                  is_leaf=lambda x: x is None)


def _optimizer(config) -> optax.GradientTransformation:
    if config.optimizer == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=config.mask_lr)
    return optax.inject_hyperparams(optax.sgd)(learning_rate=config.mask_lr,
                                               momentum=config.momentum)


def make_ablation_steps(model: nn.Module, config, variables: Variables,
                        num_clean: int) -> AblationSteps:
    """Builds the pure steps for ``model`` (shapes from ``variables``) and N clean images.

    Raises:
      ValueError: ``num_clean`` < 1, or a neuron mask / neuron noise on a model without
        BatchNorm.
    """
    if num_clean < 1:
        raise ValueError(f"the ablation needs at least one clean image; got {num_clean}.")
    bn = batchnorm_paths(variables)
    if not bn and "neuron" in (config.mask, config.adversary.split("_")[0]):
        raise ValueError("a neuron mask or neuron noise needs BatchNorm layers (ANP scales BN "
                         "channels); the model has none.")
    flat = flatten_dict(dict(variables["params"]))
    neurons = {"/".join(p): jax.ShapeDtypeStruct(flat[(*p, "scale")].shape, jnp.float32)
               for p in bn}
    weights = jax.eval_shape(lambda p: create_mask(p, config.mask_scope), variables["params"])
    batch_size = min(config.batch_size, num_clean)
    steps_per_epoch = max(1, num_clean // batch_size) * config.inner_passes
    tx = _optimizer(config)

    def network(params, mask, neuron_noise=None, weight_noise=None):
        """The frozen params under ``mask`` and, optionally, the adversary's noise."""
        neuron = mask if config.mask == "neuron" else None
        weight = mask if config.mask == "weight" else None
        if neuron_noise is not None:  # ANP: scale * (m + delta), bias * (1 + xi)
            delta, xi = neuron_noise
            coeff = (jax.tree_util.tree_map(jnp.add, neuron, delta) if neuron is not None
                     else jax.tree_util.tree_map(lambda d: 1.0 + d, delta))
            params = scale_batchnorm(params, coeff, jax.tree_util.tree_map(lambda x: 1.0 + x, xi))
        elif neuron is not None:
            params = scale_batchnorm(params, neuron)
        if weight_noise is not None:  # kernel * (m + delta)
            coeff = (jax.tree_util.tree_map(jnp.add, weight, weight_noise) if weight is not None
                     else jax.tree_util.tree_map(lambda d: 1.0 + d, weight_noise))
            params = _scale_weights(params, coeff)
        elif weight is not None:
            params = apply_mask(params, weight)
        return params

    def logits_of(params, frozen: Frozen, images):
        return apply_model(model, params, frozen.batch_stats, images, train=config.bn_train)[0]

    def init(data: Batch, hparams) -> AblationState:
        mask = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, jnp.float32),
                                      neurons if config.mask == "neuron" else weights)
        opt_state = tx.init(mask)
        hyper = dict(opt_state.hyperparams)
        # Copies: the state is donated to the jitted steps, ``hparams`` is not.
        hyper["learning_rate"] = jnp.array(hparams.mask_lr, jnp.float32, copy=True)
        if config.optimizer == "sgd":
            hyper["momentum"] = jnp.array(hparams.momentum, jnp.float32, copy=True)
        return AblationState(mask=mask, opt_state=opt_state._replace(hyperparams=hyper),
                             trigger=jnp.zeros(data["image"].shape[1:], jnp.float32),
                             inner_labels=jnp.array(data["label"], jnp.int32, copy=True),
                             step=jnp.zeros((), jnp.int32))

    def begin_epoch(state: AblationState, frozen: Frozen, data: Batch,
                    hparams) -> AblationState:
        """Zero trigger; the ascent's labels (AWM's begin_epoch without the lr decay)."""
        del hparams
        labels = jnp.asarray(data["label"], jnp.int32)
        if config.inner_labels == "predicted":
            params = network(frozen.params, state.mask)
            if config.bn_train:  # batch statistics: one forward over the whole clean set
                labels = logits_of(params, frozen, data["image"]).argmax(-1)
            else:
                labels = jax.lax.map(
                    lambda image: logits_of(params, frozen, image[None])[0].argmax(-1),
                    data["image"], batch_size=batch_size)
        return state.replace(trigger=jnp.zeros_like(state.trigger),
                             inner_labels=labels.astype(jnp.int32))

    def trigger_step(state: AblationState, frozen: Frozen, data: Batch, key: PRNGKey,
                     hparams) -> tuple[AblationState, Metrics]:
        """AWM's inner step: plain ascent on CE of ``x + trigger`` (unclipped, as the code)."""
        index = draw_indices(data, key, batch_size)
        images, labels = data["image"][index], state.inner_labels[index]
        params = network(frozen.params, state.mask)
        loss, grad = jax.value_and_grad(
            lambda t: _cross_entropy(logits_of(params, frozen, images + t), labels))(
            state.trigger)
        return state.replace(trigger=state.trigger + hparams.trigger_lr * grad), \
            {"trigger_ce": loss}

    def end_trigger_phase(state: AblationState, hparams) -> AblationState:
        return state.replace(trigger=l1_rescale(state.trigger, hparams.tau))

    def adversarial_losses(state, frozen, images, labels, noise_keys, hparams):
        """``mask -> (natural CE, adversarial CE, clean logits)`` for this step's adversary;
        ``noise_keys`` = ``(weight_key, bias_key)`` of the noise adversaries."""
        if config.adversary == "trigger":
            triggered = jnp.clip(images + state.trigger, 0.0, 1.0)

            def losses(mask):
                params = network(frozen.params, mask)
                if config.bn_train:
                    clean, adv = logits_of(params, frozen, images), logits_of(
                        params, frozen, triggered)
                else:  # eval-mode BN: one forward over both halves, as AWM's step
                    clean, adv = jnp.split(logits_of(
                        params, frozen, jnp.concatenate([images, triggered])), 2)
                return _cross_entropy(clean, labels), _cross_entropy(adv, labels), clean

            return losses
        weight_key, bias_key = noise_keys
        if config.adversary == "neuron_noise":
            noise = (uniform_noise(weight_key, neurons, hparams.eps),
                     uniform_noise(bias_key, neurons, hparams.eps))
            perturbed = lambda mask, n: network(frozen.params, mask, neuron_noise=n)
        else:
            noise = uniform_noise(weight_key, weights, hparams.eps)
            perturbed = lambda mask, n: network(frozen.params, mask, weight_noise=n)
        ce = lambda params: _cross_entropy(logits_of(params, frozen, images), labels)
        noise = noise_ascent(lambda n: ce(perturbed(state.mask, n)), noise, hparams.eps,
                             config.noise_steps)

        def losses(mask):
            clean = logits_of(network(frozen.params, mask), frozen, images)
            return _cross_entropy(clean, labels), ce(perturbed(mask, noise)), clean

        return losses

    def mask_step(state: AblationState, frozen: Frozen, data: Batch, key: PRNGKey,
                  hparams) -> tuple[AblationState, Metrics]:
        """One descent step on the mask, then a clip to [0, 1]."""
        if config.adversary == "trigger":  # AWM draws the batch with the step key itself
            index, noise_keys = draw_indices(data, key, batch_size), None
        else:  # ANP splits it three ways: batch, weight noise, bias noise
            index_key, *noise_keys = jax.random.split(key, 3)
            index = draw_indices(data, index_key, batch_size)
        images, labels = data["image"][index], data["label"][index]
        losses = adversarial_losses(state, frozen, images, labels, noise_keys, hparams)

        def objective(mask):
            natural, adversarial, logits = losses(mask)
            loss = hparams.alpha * natural + (1.0 - hparams.alpha) * adversarial
            l1 = mask_l1(mask)
            if config.l1:
                loss = loss + hparams.gamma * l1
            return loss, {"loss": loss, "natural_ce": natural, "adversarial_ce": adversarial,
                          "mask_l1": l1, "accuracy": jnp.mean(logits.argmax(-1) == labels)}

        grads, metrics = jax.grad(objective, has_aux=True)(state.mask)
        updates, opt_state = tx.update(grads, state.opt_state, state.mask)
        mask = clip_mask(optax.apply_updates(state.mask, updates))
        metrics["finite"] = jnp.isfinite(metrics["loss"]).astype(jnp.float32)
        return state.replace(mask=mask, opt_state=opt_state, step=state.step + 1), metrics

    return AblationSteps(init, begin_epoch, trigger_step, end_trigger_phase, mask_step,
                         batch_size, steps_per_epoch)

