"""Adversarial Neuron Pruning ("anp").

Reference: Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models"
(NeurIPS 2021) and its official code ``csdongxian/ANP_backdoor`` (``optimize_mask_cifar.py``,
``prune_neuron_cifar.py``); settings as summarised in awm-paper.md 2.6.

Every BatchNorm channel ``k`` gets a mask ``m_k`` in [0, 1] (init 1) that scales its weight.
Per iteration, on a minibatch of the defender's clean images:

1. noise ``delta, xi`` ~ U[-eps, eps] per channel; one signed-gradient *ascent* step of size
   ``eps / noise_steps`` on ``CE`` of the perturbed network, whose BN weight is
   ``scale * (m + delta)`` and bias ``bias * (1 + xi)``; noise clipped to [-eps, eps];
2. one SGD-with-momentum step on the masks for
   ``alpha * CE(natural, scale * m) + (1 - alpha) * CE(perturbed)``, masks clipped to [0, 1].

BatchNorm runs in train mode (batch statistics) as the code's ``model.train()``; the running
statistics it would update are not kept (the code prunes the original checkpoint). Finally
every channel with ``m <= threshold`` is pruned by zeroing its BN weight (``scale``), as
``prune_neuron_cifar.py`` does; the bias stays.

Defaults = the official code's: eps 0.4, one noise step, alpha 0.2, mask SGD lr 0.2 with
momentum 0.9, 2000 iterations, batch 128; threshold 0.2 (the paper's recalled default; the
code sweeps 0-0.9). The threshold is fixed in advance, never tuned on test labels.

The BN scaling is done by rewriting the params pytree (the ``scale``/``bias`` leaves of
every module that has them and running ``mean``/``var`` in ``batch_stats``), not by editing
the models. Minibatches are drawn with replacement (the code shuffles a loader).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from flax.traverse_util import flatten_dict, unflatten_dict
from tqdm.auto import tqdm

from awm_jax.defenses.base import DEFENSES, Defense, DefenseResult, build_once
from awm_jax.defenses.checkpointing import open_checkpointer
from awm_jax.defenses.divergence import raise_if_diverged
from awm_jax.defenses.finetune import ConfigDictMixin, check_positive, validate_clean
from awm_jax.models.base import apply_model
from awm_jax.types import Array, Batch, Metrics, PRNGKey, Variables


def batchnorm_paths(variables: Variables) -> list[tuple]:
    """Module paths with ``scale`` and ``bias`` params and ``mean`` running statistics."""
    params = flatten_dict(dict(variables["params"]))
    stats = flatten_dict(dict(variables.get("batch_stats", {}) or {}))
    return sorted(path[:-1] for path in params if path[-1] == "scale"
                  and (*path[:-1], "bias") in params and (*path[:-1], "mean") in stats)


def scale_batchnorm(params, weight_coeff: dict, bias_coeff: dict | None = None):
    """``params`` with BN ``scale *= weight_coeff[path]`` and ``bias *= bias_coeff[path]``.

    Args:
      params: the model's params pytree.
      weight_coeff: ``{"/".join(path): float32[C]}`` per BatchNorm module.
      bias_coeff: the same for the biases, or None for no bias change.
    """
    flat = dict(flatten_dict(dict(params)))
    for name, coeff in weight_coeff.items():
        path = tuple(name.split("/"))
        flat[(*path, "scale")] = flat[(*path, "scale")] * coeff
        if bias_coeff is not None:
            flat[(*path, "bias")] = flat[(*path, "bias")] * bias_coeff[name]
    return unflatten_dict(flat)


def uniform_noise(key: PRNGKey, like, eps: Array):
    """Noise ``U[-eps, eps]`` shaped like every leaf of ``like`` (``None`` leaves stay None).

    Leaf ``i`` (in ``jax.tree_util`` order, i.e. sorted keys) uses ``fold_in(key, i)``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    return treedef.unflatten([
        jax.random.uniform(jax.random.fold_in(key, i), leaf.shape, minval=-eps, maxval=eps)
        for i, leaf in enumerate(leaves)])


def noise_ascent(loss_fn, noise, eps: Array, steps: int):
    """ANP's inner maximisation: ``steps`` signed-gradient ascent steps of size ``eps / steps``
    on ``loss_fn(noise)``, the noise clipped to ``[-eps, eps]``; the result is a constant."""
    for _ in range(steps):
        grads = jax.grad(loss_fn)(noise)
        noise = jax.tree_util.tree_map(
            lambda n, g: jnp.clip(n + eps / steps * jnp.sign(g), -eps, eps), noise, grads)
    return jax.lax.stop_gradient(noise)


class ANPHparams(NamedTuple):
    """Swept numbers (float32 scalars)."""

    eps: Array
    alpha: Array
    mask_lr: Array
    momentum: Array
    threshold: Array


class ANPState(struct.PyTreeNode):
    """Masks being learnt, their momentum, and the frozen backdoored model.

    Attributes:
      mask: ``{"path/of/bn": float32[C]}`` in [0, 1].
      velocity: momentum buffer like ``mask``.
      params, batch_stats: the backdoored model (never updated).
      step: ``int32[]`` iterations done.
    """

    mask: dict
    velocity: dict
    params: Any
    batch_stats: Any
    step: Array


@dataclasses.dataclass(frozen=True)
class ANPConfig(ConfigDictMixin):
    """ANP settings (defaults: the official code; see the module docstring).

    Attributes:
      eps: bound of the multiplicative noise (0.4).
      noise_steps: signed ascent steps on the noise per iteration, each of size eps/steps (1).
      alpha: weight of the natural loss; the perturbed loss gets ``1 - alpha`` (0.2).
      mask_lr, momentum: SGD on the masks (0.2, 0.9).
      iterations: mask updates (2000).
      batch_size: images per update, shrunk to N when N is smaller (128).
      threshold: channels with ``mask <= threshold`` are pruned (0.2).
    """

    eps: float = 0.4
    noise_steps: int = 1
    alpha: float = 0.2
    mask_lr: float = 0.2
    momentum: float = 0.9
    iterations: int = 2000
    batch_size: int = 128
    threshold: float = 0.2

    def __post_init__(self):
        check_positive("eps", self.eps, allow_zero=True)
        for name in ("noise_steps", "iterations", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
        for name, value in (("alpha", self.alpha), ("threshold", self.threshold)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}.")
        check_positive("mask_lr", self.mask_lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum}.")

    def hparams(self) -> ANPHparams:
        return ANPHparams(*(jnp.asarray(v, jnp.float32) for v in (
            self.eps, self.alpha, self.mask_lr, self.momentum, self.threshold)))


def init_anp_state(variables: Variables) -> ANPState:
    """Masks of ones on every BatchNorm channel.

    Raises:
      ValueError: the model has no BatchNorm (ANP masks BN channels).
    """
    paths = batchnorm_paths(variables)
    if not paths:
        raise ValueError("ANP needs BatchNorm layers (it masks BN channels); the model has none.")
    flat = flatten_dict(dict(variables["params"]))
    mask = {"/".join(p): jnp.ones_like(flat[(*p, "scale")]) for p in paths}
    copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)
    return ANPState(mask=mask, velocity=jax.tree_util.tree_map(jnp.zeros_like, mask),
                    params=copy(variables["params"]), batch_stats=copy(variables["batch_stats"]),
                    step=jnp.zeros((), jnp.int32))


def make_anp_step(model: nn.Module, batch_size: int, noise_steps: int = 1):
    """Returns the pure ``step(state, data, key, hparams) -> (state, metrics)``.

    ``data`` is the defender's whole clean set; a batch of ``batch_size`` is drawn from it with
    replacement.
    """

    def ce(state, mask, noise_w, noise_b, images, labels):
        weight = jax.tree_util.tree_map(jnp.add, mask, noise_w) if noise_w is not None else mask
        bias = (jax.tree_util.tree_map(lambda n: 1.0 + n, noise_b)
                if noise_b is not None else None)
        params = scale_batchnorm(state.params, weight, bias)
        logits, _ = apply_model(model, params, state.batch_stats, images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    def step(state: ANPState, data: Batch, key: PRNGKey,
             hparams: ANPHparams) -> tuple[ANPState, Metrics]:
        index_key, weight_key, bias_key = jax.random.split(key, 3)
        index = jax.random.randint(index_key, (batch_size,), 0, data["label"].shape[0])
        images, labels = data["image"][index], data["label"][index]
        noise = (uniform_noise(weight_key, state.mask, hparams.eps),
                 uniform_noise(bias_key, state.mask, hparams.eps))
        noise = noise_ascent(lambda n: ce(state, state.mask, *n, images, labels)[0], noise,
                             hparams.eps, noise_steps)

        def objective(mask):
            natural, logits = ce(state, mask, None, None, images, labels)
            perturbed, _ = ce(state, mask, *noise, images, labels)
            loss = hparams.alpha * natural + (1.0 - hparams.alpha) * perturbed
            return loss, {"natural_ce": natural, "perturbed_ce": perturbed,
                          "accuracy": jnp.mean(logits.argmax(-1) == labels)}

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.mask)
        velocity = jax.tree_util.tree_map(lambda v, g: hparams.momentum * v + g,
                                          state.velocity, grads)
        mask = jax.tree_util.tree_map(lambda m, v: jnp.clip(m - hparams.mask_lr * v, 0.0, 1.0),
                                      state.mask, velocity)
        return state.replace(mask=mask, velocity=velocity, step=state.step + 1), {
            "loss": loss, **metrics, "finite": jnp.isfinite(loss).astype(jnp.float32)}

    return step


def prune(variables: Variables, mask: dict, threshold: Array) -> Variables:
    """Zeroes the BN ``scale`` of every channel with ``mask <= threshold`` (pure)."""
    keep = {name: (m > threshold).astype(m.dtype) for name, m in mask.items()}
    return {"params": scale_batchnorm(variables["params"], keep),
            "batch_stats": variables["batch_stats"]}


def _jitted_step(model, batch: int, noise_steps: int):
    return jax.jit(make_anp_step(model, batch, noise_steps), donate_argnums=0)


def _run_block(step, state, data, key, hparams, iterations: range, bar):
    """The iterations of one history record; each step's key is ``fold_in(key, iteration)``."""
    metrics = []
    for iteration in iterations:
        state, step_metrics = step(state, data, jax.random.fold_in(key, iteration), hparams)
        metrics.append(step_metrics)
        bar.update()
    return state, {"iteration": iterations[-1] + 1,
                   **{k: float(jnp.mean(jnp.stack([m[k] for m in metrics])))
                      for k in metrics[0] if k != "finite"}}


def _purify(model, variables, clean, key, config: ANPConfig, *, num_classes=None,
            on_epoch=None, progress=True, workdir=None, checkpoint_every=1, max_to_keep=2,
            resume=False) -> DefenseResult:
    """ANP. The iterations run in blocks of ``max(1, N // batch)`` (one pass's worth, one
    history record, one "epoch" for ``on_epoch``); with ``workdir`` the :class:`ANPState` is
    checkpointed every ``checkpoint_every`` blocks (:mod:`awm_jax.defenses.checkpointing`)."""
    start = time.perf_counter()
    data = validate_clean(clean, num_classes)
    batch = min(config.batch_size, int(data["label"].shape[0]))
    step = build_once(_jitted_step, model, batch, config.noise_steps)
    hparams = config.hparams()
    state = init_anp_state(variables)
    per_block = max(1, int(data["label"].shape[0]) // batch)
    blocks = math.ceil(config.iterations / per_block)
    excluded = 0.0
    with open_checkpointer(workdir, kind="anp", unit=f"blocks of {per_block} iterations",
                           config=config, key=key, data=data, variables=variables,
                           total_steps=blocks, checkpoint_every=checkpoint_every,
                           max_to_keep=max_to_keep, resume=resume) as checkpointer:
        restored, meta = checkpointer.restore(state)
        state, history = (state, []) if restored is None else (restored, meta["history"])
        with tqdm(total=config.iterations, initial=min(meta["step"] * per_block,
                                                       config.iterations),
                  desc="ANP", unit="step", disable=not progress) as bar:
            for block in range(meta["step"], blocks):
                iterations = range(block * per_block,
                                   min((block + 1) * per_block, config.iterations))
                state, record = _run_block(step, state, data, key, hparams, iterations, bar)
                record = {"epoch": block + 1, **record}
                raise_if_diverged(record, what="ANP", epoch=block + 1, total=blocks,
                                  unit="block", metrics=("loss", "natural_ce", "perturbed_ce"),
                                  lower={"mask_lr": config.mask_lr, "eps": config.eps},
                                  checkpointer=checkpointer.run)
                eval_start = time.perf_counter()
                if on_epoch is not None:
                    record.update(on_epoch(block + 1, prune(variables, state.mask,
                                                            hparams.threshold)))
                history.append(record)
                checkpointer.save(block + 1, state, {"history": history})
                excluded += time.perf_counter() - eval_start
    purified = prune(variables, state.mask, hparams.threshold)
    values = np.concatenate([np.asarray(m) for _, m in sorted(state.mask.items())])
    details = {"channels": int(values.size),
               "pruned": int(np.sum(values <= config.threshold)),
               "mask_mean": float(values.mean()),
               "pruned_per_layer": {name: int(np.sum(np.asarray(m) <= config.threshold))
                                    for name, m in sorted(state.mask.items())}}
    seconds = time.perf_counter() - start - excluded + checkpointer.seconds_before
    return DefenseResult(purified, history, seconds, details)


@DEFENSES.register("anp")
def anp() -> Defense:
    return Defense("anp", ANPConfig, _purify)
