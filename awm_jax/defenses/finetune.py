"""Fine-tuning ("ft"): retrain every weight on the defender's clean images.

Reference: the fine-tuning baseline of the backdoor-defense literature, e.g. Liu et al.,
"Fine-Pruning" (RAID 2018) Sec. 3 and Li et al., "Neural Attention Distillation" (ICLR 2021),
whose teacher is exactly this fine-tuning. There is no single official code. Defaults: the
optimiser of NAD's ``config.py`` (SGD, momentum 0.9, weight decay 1e-4, batch 64, but plain
rather than Nesterov momentum), a constant learning rate of 0.01 and 10 epochs (NAD's teacher
fine-tuning as we recall it from the paper, not checked against its code), BatchNorm in train
mode, no augmentation (``crop_padding``/``flip`` switch on the light CIFAR-style one).

The module also holds the pieces FP and NAD reuse: :func:`make_sgd_step` (one PyTorch-style
SGD update, ``weight_decay`` added to the gradient before momentum, an optional 0/1 pruning
mask kept applied) and :func:`run_epochs` (the host loop over shuffled minibatches).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from tqdm.auto import tqdm

from awm_jax.data.augment import random_crop_flip
from awm_jax.data.dataset import Split
from awm_jax.defenses.base import DEFENSES, Defense, DefenseResult, build_once
from awm_jax.defenses.checkpointing import open_checkpointer
from awm_jax.defenses.divergence import raise_if_diverged
from awm_jax.models.base import apply_model
from awm_jax.types import (
    Array,
    Batch,
    Metrics,
    PRNGKey,
    Variables,
    validate_images,
    validate_labels,
)

LossFn = Callable[..., tuple[Array, tuple[Any, Metrics]]]


class SGDHparams(NamedTuple):
    """Swept numbers of an SGD fine-tune; float32 scalars (stackable for ``vmap``)."""

    learning_rate: Array
    momentum: Array
    weight_decay: Array


class FTState(struct.PyTreeNode):
    """Model weights being fine-tuned and the optimiser's momentum buffer.

    Attributes:
      params, batch_stats: the model's variables.
      velocity: momentum buffer, same tree as ``params``.
      mask: ``None`` or a 0/1 pytree like ``params`` that stays multiplied into them (pruning).
      step: ``int32[]`` updates done.
    """

    params: Any
    batch_stats: Any
    velocity: Any
    mask: Any
    step: Array

    @property
    def variables(self) -> Variables:
        return {"params": self.params, "batch_stats": self.batch_stats}


def init_ft_state(variables: Variables, mask=None) -> FTState:
    """Starts from ``variables`` (masked, if ``mask`` is given) with a zero momentum buffer."""
    params = variables["params"]
    if mask is not None:
        params = jax.tree_util.tree_map(jnp.multiply, params, mask)
    return FTState(params=params, batch_stats=variables["batch_stats"],
                   velocity=jax.tree_util.tree_map(jnp.zeros_like, params), mask=mask,
                   step=jnp.zeros((), jnp.int32))


def ce_loss_fn(model: nn.Module) -> LossFn:
    """``(params, state, images, labels, key, hparams) -> (CE, (batch_stats, metrics))``.

    The model runs in train mode: BatchNorm uses and updates batch statistics.
    """

    def loss_fn(params, state, images, labels, key, hparams):
        del hparams
        logits, batch_stats = apply_model(model, params, state.batch_stats, images, train=True,
                                          dropout_key=key)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce, (batch_stats, {"ce": ce, "accuracy": jnp.mean(logits.argmax(-1) == labels)})

    return loss_fn


def make_sgd_step(loss_fn: LossFn, *, crop_padding: int = 0, flip: bool = False,
                  nesterov: bool = False) -> Callable[..., tuple[Any, Metrics]]:
    """Returns the pure ``step(state, batch, key, hparams) -> (state, metrics)``.

    ``state`` is an :class:`FTState` (or any PyTreeNode with its fields); ``hparams`` has at
    least the :class:`SGDHparams` fields. The update is PyTorch's ``SGD``: ``g += wd * p``,
    ``v = mu * v + g``, ``p -= lr * (g + mu * v if nesterov else v)``; masked entries of
    ``state.mask`` get zero gradient and stay zero.
    """

    def step(state, batch: Batch, key: PRNGKey, hparams) -> tuple[Any, Metrics]:
        aug_key, loss_key = jax.random.split(key)
        images, labels = batch["image"], batch["label"]
        if crop_padding > 0 or flip:
            images = random_crop_flip(images, aug_key, padding=crop_padding, flip=flip)
        (loss, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, images, labels, loss_key, hparams)
        tree = jax.tree_util.tree_map
        grads = tree(lambda g, p: g + hparams.weight_decay * p, grads, state.params)
        if state.mask is not None:
            grads = tree(jnp.multiply, grads, state.mask)
        velocity = tree(lambda v, g: hparams.momentum * v + g, state.velocity, grads)
        direction = (tree(lambda g, v: g + hparams.momentum * v, grads, velocity) if nesterov
                     else velocity)
        params = tree(lambda p, d: p - hparams.learning_rate * d, state.params, direction)
        if state.mask is not None:
            params = tree(jnp.multiply, params, state.mask)
        metrics = {"loss": loss, **metrics, "finite": jnp.isfinite(loss).astype(jnp.float32)}
        return state.replace(params=params, batch_stats=batch_stats, velocity=velocity,
                             step=state.step + 1), metrics

    return step


def validate_clean(clean: Split, num_classes: int | None) -> dict[str, Array]:
    """The defender's split as a device batch, checked against the batch contract."""
    images = validate_images(clean.images, "clean images")
    labels = validate_labels(clean.labels, num_classes if num_classes else 1 << 30,
                             count=images.shape[0], name="clean labels")
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


def run_epochs(step, state, data: dict[str, Array], key: PRNGKey, hparams, *, epochs: int,
               batch_size: int, on_epoch=None, progress: bool = True, desc: str = "FT",
               variables_of=lambda s: s.variables, first_epoch: int = 0,
               history: list[dict] | None = None, after_epoch=None,
               lower: Mapping[str, Any] | None = None,
               checkpointer=None) -> tuple[Any, list[dict], float]:
    """Drives a jitted ``step`` over ``epochs`` shuffled passes of ``data``.

    ``hparams`` is the step's hyperparameter pytree, or a function of the (0-based) epoch that
    returns it (a learning-rate schedule; its leaves stay arrays, so nothing recompiles).
    Each epoch permutes the images with ``fold_in(key, epoch)`` and takes
    ``max(1, N // b)`` batches of ``b = min(batch_size, N)`` (the remainder is dropped, so one
    shape compiles). Returns ``(state, history, seconds)``; callback time is excluded.

    A restored run passes its ``state``, the epochs it had finished as ``first_epoch`` and
    their ``history``; since every epoch's keys come from ``fold_in(key, epoch)`` it continues
    exactly as the uninterrupted run. ``after_epoch(epochs_done, state, history)`` is called
    after every epoch (e.g. to checkpoint).

    Raises:
      FloatingPointError: an epoch's mean loss is NaN or infinite, before ``after_epoch`` saves
        it; the message names ``desc``, the epoch, the hyperparameters of ``lower`` (default:
        ``learning_rate``) and ``checkpointer``'s newest checkpoint
        (:func:`~awm_jax.defenses.divergence.raise_if_diverged`).
    """
    count = int(data["label"].shape[0])
    batch = min(batch_size, count)
    history = list(history or [])
    excluded, start = 0.0, time.perf_counter()
    for epoch in tqdm(range(first_epoch, epochs), desc=desc, unit="epoch",
                      disable=not progress, initial=first_epoch, total=epochs):
        order_key, epoch_key = jax.random.split(jax.random.fold_in(key, epoch))
        order = jax.random.permutation(order_key, count)
        metrics = []
        epoch_hparams = hparams(epoch) if callable(hparams) else hparams
        for index in range(max(1, count // batch)):
            rows = order[index * batch:(index + 1) * batch]
            minibatch = {"image": data["image"][rows], "label": data["label"][rows]}
            state, step_metrics = step(state, minibatch, jax.random.fold_in(epoch_key, index),
                                       epoch_hparams)
            metrics.append(step_metrics)
        record = {"epoch": epoch + 1, **{k: float(jnp.mean(jnp.stack([m[k] for m in metrics])))
                                         for k in metrics[0] if k != "finite"}}
        raise_if_diverged(record, what=desc, epoch=epoch + 1, total=epochs,
                          lower=lower or ("learning_rate",), checkpointer=checkpointer)
        if on_epoch is not None:
            eval_start = time.perf_counter()
            record.update(on_epoch(epoch + 1, variables_of(state)))
            excluded += time.perf_counter() - eval_start
        history.append(record)
        if after_epoch is not None:
            eval_start = time.perf_counter()
            after_epoch(epoch + 1, state, history)
            excluded += time.perf_counter() - eval_start
    return state, history, time.perf_counter() - start - excluded


def check_positive(name: str, value, allow_zero: bool = False) -> None:
    if not (value >= 0 if allow_zero else value > 0):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}; got {value}.")


def check_fields(config, allow_zero_epochs: bool = False) -> None:
    """Shared range checks for the SGD fields of FT, FP and NAD configs.

    ``epochs`` must be >= 1 (zero epochs of fine-tuning is no defense at all) unless
    ``allow_zero_epochs``, which FP uses for its prune-only variant.
    """
    check_positive("learning_rate", config.learning_rate)
    if not 0.0 <= config.momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1); got {config.momentum}.")
    check_positive("weight_decay", config.weight_decay, allow_zero=True)
    check_positive("epochs", config.epochs, allow_zero=allow_zero_epochs)
    check_positive("batch_size", config.batch_size)
    check_positive("crop_padding", config.crop_padding, allow_zero=True)


class ConfigDictMixin:
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(known)}.")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class FTConfig(ConfigDictMixin):
    """Fine-tuning settings (see the module docstring for where each default comes from).

    Attributes:
      learning_rate: constant SGD learning rate (0.01).
      momentum: SGD momentum (0.9).
      weight_decay: L2 added to the gradient (1e-4, NAD's code).
      epochs: passes over the clean images (10).
      batch_size: minibatch size, shrunk to N when N is smaller (64, NAD's code).
      crop_padding: random-crop padding in pixels, 0 = off.
      flip: random horizontal flips (wrong for digits and signs).
      nesterov: Nesterov momentum (NAD's code uses it; off for plain FT).
    """

    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 10
    batch_size: int = 64
    crop_padding: int = 0
    flip: bool = False
    nesterov: bool = False

    def __post_init__(self):
        check_fields(self)

    def hparams(self) -> SGDHparams:
        return SGDHparams(*(jnp.asarray(v, jnp.float32) for v in (
            self.learning_rate, self.momentum, self.weight_decay)))


def _jitted_sgd_step(model, crop_padding, flip, nesterov):
    return jax.jit(make_sgd_step(ce_loss_fn(model), crop_padding=crop_padding, flip=flip,
                                 nesterov=nesterov), donate_argnums=0)


def sgd_hparams(config) -> SGDHparams:
    """The :class:`SGDHparams` of any config with the :class:`FTConfig` fields."""
    return SGDHparams(*(jnp.asarray(v, jnp.float32) for v in (
        config.learning_rate, config.momentum, config.weight_decay)))


def finetune(model: nn.Module, variables: Variables, data: dict[str, Array], key: PRNGKey,
             config, *, mask=None, on_epoch=None, progress: bool = True, desc: str = "FT",
             state: FTState | None = None, first_epoch: int = 0,
             history: list[dict] | None = None, after_epoch=None,
             lower: Mapping[str, Any] | None = None, checkpointer=None):
    """Fine-tunes ``variables`` (optionally under a fixed 0/1 ``mask``); returns
    ``(variables, history, seconds)``. ``config`` needs the :class:`FTConfig` fields.

    ``state``/``first_epoch``/``history`` continue a restored run and ``after_epoch`` is called
    after every epoch with ``(epochs_done, state, history)``; a non-finite loss stops the run
    with a FloatingPointError that suggests lowering ``lower`` (default: ``learning_rate`` and
    its value) and names ``checkpointer``'s newest checkpoint (see :func:`run_epochs`).
    """
    step = build_once(_jitted_sgd_step, model, config.crop_padding, config.flip,
                      config.nesterov)
    if state is None:
        state = init_ft_state(jax.tree_util.tree_map(jnp.array, variables), mask)
    state, history, seconds = run_epochs(step, state, data, key, sgd_hparams(config),
                                         epochs=config.epochs, batch_size=config.batch_size,
                                         on_epoch=on_epoch, progress=progress, desc=desc,
                                         first_epoch=first_epoch, history=history,
                                         after_epoch=after_epoch,
                                         lower=lower or {"learning_rate": config.learning_rate},
                                         checkpointer=checkpointer)
    return state.variables, history, seconds


def _purify(model, variables, clean, key, config: FTConfig, *, num_classes=None, on_epoch=None,
            progress=True, workdir=None, checkpoint_every=1, max_to_keep=2,
            resume=False) -> DefenseResult:
    """Fine-tuning; with ``workdir`` the :class:`FTState` is checkpointed every
    ``checkpoint_every`` epochs (:mod:`awm_jax.defenses.checkpointing`)."""
    data = validate_clean(clean, num_classes)
    with open_checkpointer(workdir, kind="ft", unit="epochs", config=config, key=key, data=data,
                           variables=variables, total_steps=config.epochs,
                           checkpoint_every=checkpoint_every, max_to_keep=max_to_keep,
                           resume=resume) as checkpointer:
        state, meta = checkpointer.restore(init_ft_state(variables))
        purified, history, seconds = finetune(
            model, variables, data, key, config, on_epoch=on_epoch, progress=progress,
            state=state, first_epoch=meta["step"], history=meta.get("history"),
            after_epoch=lambda done, s, h: checkpointer.save(done, s, {"history": h}),
            checkpointer=checkpointer.run)
    steps = config.epochs * max(1, len(clean) // min(config.batch_size, len(clean)))
    return DefenseResult(purified, history, seconds + checkpointer.seconds_before,
                         {"steps": steps})


@DEFENSES.register("ft")
def ft() -> Defense:
    return Defense("ft", FTConfig, _purify)
