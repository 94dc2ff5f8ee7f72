"""Neural Cleanse ("nc"): reverse-engineer a trigger per class, flag outliers, unlearn.

Reference: Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, "Neural Cleanse: Identifying and
Mitigating Backdoor Attacks in Neural Networks" (IEEE S&P 2019) and its official Keras code
``bolunwang/backdoor`` (``visualizer.py``, ``gtsrb_visualize_example.py``,
``mad_outlier_detection.py``); awm-paper.md 2.6 lists NC as a likely AWM baseline.

1. **Reverse engineering** (paper Sec. IV-C, Eq. 3). For every class ``t`` at once (one
   program, :func:`make_trigger_step` vmapped over classes) find a mask ``m`` (``[H, W, 1]``,
   shared by the channels) and a pattern ``p`` (``[H, W, C]``) minimising
   ``CE(f((1 - m) * x + m * p), t) + lambda_t * ||m||_1`` over the defender's clean images,
   with ``m = (tanh(a) + 1) / 2`` and ``p = (tanh(b) + 1) / 2`` (the paper's tanh
   reparametrisation, in our [0, 1] pixel space) and Adam (lr 0.1, betas 0.5/0.9 as the code).
   ``lambda_t`` follows the code's **adaptive** schedule per class (``adaptive_cost=True``):
   it starts at 0, is set to ``init_cost`` once the reversed trigger succeeds on >= 99% of a
   pass for ``patience`` passes in a row, then is multiplied by 2 after ``patience`` successful
   passes and divided by ``2 ** 1.5`` after ``patience`` failing ones; the kept mask is the one
   with the smallest L1 among passes that reached 99% (else the last). Early stopping as the
   code: once ``lambda`` has gone both up and down and the best L1 has not improved for 25
   passes. ``adaptive_cost=False`` keeps ``lambda = init_cost`` fixed. A "pass" (the code's
   ``step``) is ``batches_per_epoch`` minibatches (1000 samples / batch 32 = 31).
2. **Detection** (Sec. IV-C, ``mad_outlier_detection.py``): anomaly index
   ``|l1_t - median| / (1.4826 * MAD)`` of the masks' L1 norms; classes below the median with
   index > 2 are flagged.
3. **Mitigation by unlearning** (Sec. VI-C): if a class is flagged, fine-tune all weights on
   the clean images of which a random 20% carry a reversed trigger of a flagged class (several
   flagged classes take turns) and keep their true labels; paper: one epoch. The optimiser is
   our fine-tuning's (SGD lr 0.01, momentum 0.9, wd 1e-4, batch 64); the paper only says the
   original training configuration. If nothing is flagged the model is returned unchanged and
   ``details["unlearned"]`` is False.

Differences from the code: the classes share each minibatch (drawn without replacement from
the clean set), and a class that early-stops is frozen while the others go on; the loop ends
when every class has stopped. The paper unlearns with 10% of the training set (5,000 CIFAR
images) for one epoch; with a few hundred clean images one epoch is only a handful of SGD
steps, so raise ``unlearn_epochs`` for one-shot-sized clean sets (the tests use 10).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm.auto import tqdm

from awm_jax.defenses.base import DEFENSES, Defense, DefenseResult, build_once
from awm_jax.defenses.checkpointing import open_checkpointer
from awm_jax.defenses.divergence import raise_if_diverged
from awm_jax.defenses.finetune import (
    ConfigDictMixin,
    FTConfig,
    check_positive,
    finetune,
    init_ft_state,
    validate_clean,
)
from awm_jax.models.base import apply_model
from awm_jax.types import Array, ArrayLike, Batch, Metrics, PRNGKey, Variables

MAD_CONSISTENCY = 1.4826  # MAD -> standard deviation for normally distributed norms.


@dataclasses.dataclass(frozen=True)
class NCConfig(ConfigDictMixin):
    """Neural Cleanse settings (defaults: the official code / paper; see the module docstring).

    Attributes:
      learning_rate, beta1, beta2: Adam on the mask and pattern (0.1, 0.5, 0.9).
      init_cost: the L1 weight lambda once set, or the fixed lambda (1e-3).
      adaptive_cost: the code's lambda schedule; False keeps ``init_cost`` (True).
      epochs: at most this many passes (the code's ``STEPS``, 1000).
      batches_per_epoch, batch_size: minibatches per pass and their size (31, 32).
      attack_succ_threshold: reversed-trigger success needed to keep a mask (0.99).
      patience: passes before lambda changes (5).
      cost_multiplier: lambda up-factor; the down-factor is its 1.5th power (2).
      early_stop, early_stop_patience: stop a class after this many passes without a smaller
        mask (True, 25 = 5 * patience).
      anomaly_threshold: flag classes whose anomaly index exceeds this (2).
      unlearn_fraction: share of clean images that carry a reversed trigger (0.2).
      unlearn_epochs, unlearn_learning_rate, unlearn_momentum, unlearn_weight_decay,
        unlearn_batch_size: the unlearning fine-tune (1 as the paper; 0.01, 0.9, 1e-4, 64).
    """

    learning_rate: float = 0.1
    beta1: float = 0.5
    beta2: float = 0.9
    init_cost: float = 1e-3
    adaptive_cost: bool = True
    epochs: int = 1000
    batches_per_epoch: int = 31
    batch_size: int = 32
    attack_succ_threshold: float = 0.99
    patience: int = 5
    cost_multiplier: float = 2.0
    early_stop: bool = True
    early_stop_patience: int = 25
    anomaly_threshold: float = 2.0
    unlearn_fraction: float = 0.2
    unlearn_epochs: int = 1
    unlearn_learning_rate: float = 0.01
    unlearn_momentum: float = 0.9
    unlearn_weight_decay: float = 1e-4
    unlearn_batch_size: int = 64

    def __post_init__(self):
        for name in ("learning_rate", "init_cost", "anomaly_threshold",
                     "unlearn_learning_rate"):
            check_positive(name, getattr(self, name))
        for name in ("epochs", "batches_per_epoch", "batch_size", "patience",
                     "early_stop_patience", "unlearn_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
        check_positive("unlearn_epochs", self.unlearn_epochs, allow_zero=True)
        check_positive("unlearn_weight_decay", self.unlearn_weight_decay, allow_zero=True)
        for name in ("beta1", "beta2", "unlearn_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)}.")
        for name in ("attack_succ_threshold", "unlearn_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]; got {getattr(self, name)}.")
        if not self.cost_multiplier > 1.0:
            raise ValueError(f"cost_multiplier must be > 1; got {self.cost_multiplier}.")

    def hparams(self) -> ScheduleHparams:
        f32 = lambda v: jnp.asarray(v, jnp.float32)
        return ScheduleHparams(
            init_cost=f32(self.init_cost), threshold=f32(self.attack_succ_threshold),
            up=f32(self.cost_multiplier), down=f32(self.cost_multiplier ** 1.5),
            patience=jnp.asarray(self.patience, jnp.int32),
            early_stop_patience=jnp.asarray(self.early_stop_patience, jnp.int32))


class ScheduleHparams(NamedTuple):
    """Numbers of the lambda schedule (scalars, shared by every class)."""

    init_cost: Array
    threshold: Array
    up: Array
    down: Array
    patience: Array
    early_stop_patience: Array


class TriggerState(struct.PyTreeNode):
    """One class's trigger search (vmapped: every field but ``variables`` gets a class axis).

    Attributes:
      target: ``int32[]`` the class the trigger should produce.
      mask_param, pattern_param: tanh-space ``float32[H, W, 1]`` and ``float32[H, W, C]``.
      opt_state: Adam's state over ``(mask_param, pattern_param)``.
      cost: ``float32[]`` current lambda.
      sums: ``float32[3]`` this pass's summed CE, mask L1 and attack success; ``count``
        ``int32[]`` its minibatches.
      set_counter, up_counter, down_counter, stall_counter: ``int32[]`` schedule counters.
      up_flag, down_flag, done: ``bool[]`` lambda went up / down; the class stopped early.
      best_mask, best_pattern, best_l1: the smallest successful mask so far (``best_l1`` is
        the pass-mean L1, ``inf`` until a pass succeeds); ``stall_best`` the early-stop record.
      variables: the frozen model (shared, no class axis).
    """

    target: Array
    mask_param: Array
    pattern_param: Array
    opt_state: Any
    cost: Array
    sums: Array
    count: Array
    set_counter: Array
    up_counter: Array
    down_counter: Array
    stall_counter: Array
    up_flag: Array
    down_flag: Array
    done: Array
    best_mask: Array
    best_pattern: Array
    best_l1: Array
    stall_best: Array
    variables: Any


def decode(param: Array) -> Array:
    """The paper's ``(tanh(a) + 1) / 2``: any real -> (0, 1)."""
    return (jnp.tanh(param) + 1.0) / 2.0


def encode(value: Array) -> Array:
    """Inverse of :func:`decode`, clipped away from 0 and 1."""
    return jnp.arctanh(jnp.clip(2.0 * value - 1.0, -1.0 + 1e-6, 1.0 - 1e-6))


def stamp(images: Array, mask: Array, pattern: Array) -> Array:
    """``(1 - m) * x + m * p`` for ``images [B, H, W, C]``, ``mask [H, W, 1]``, ``pattern
    [H, W, C]`` (or with a leading batch axis matching ``images``)."""
    return (1.0 - mask) * images + mask * pattern


def make_optimizer(config: NCConfig) -> optax.GradientTransformation:
    return optax.adam(config.learning_rate, b1=config.beta1, b2=config.beta2)


def init_trigger_states(variables: Variables, key: PRNGKey, num_classes: int,
                        image_shape: tuple[int, int, int], optimizer,
                        adaptive_cost: bool, init_cost: float) -> TriggerState:
    """States for every class, stacked on a leading class axis (``variables`` unstacked).

    Masks and patterns start uniform in [0, 1] (the code's random init); lambda starts at 0
    under the adaptive schedule, else at ``init_cost``.
    """
    height, width, channels = image_shape

    def one(target, class_key):
        mask_key, pattern_key = jax.random.split(class_key)
        mask = encode(jax.random.uniform(mask_key, (height, width, 1)))
        pattern = encode(jax.random.uniform(pattern_key, (height, width, channels)))
        zero = jnp.zeros((), jnp.int32)
        return TriggerState(
            target=target, mask_param=mask, pattern_param=pattern,
            opt_state=optimizer.init((mask, pattern)),
            cost=jnp.asarray(0.0 if adaptive_cost else init_cost, jnp.float32),
            sums=jnp.zeros((3,), jnp.float32), count=zero, set_counter=zero,
            up_counter=zero, down_counter=zero, stall_counter=zero,
            up_flag=jnp.zeros((), bool), down_flag=jnp.zeros((), bool),
            done=jnp.zeros((), bool), best_mask=decode(mask), best_pattern=decode(pattern),
            best_l1=jnp.asarray(jnp.inf, jnp.float32),
            stall_best=jnp.asarray(jnp.inf, jnp.float32), variables=None)

    states = jax.vmap(one)(jnp.arange(num_classes, dtype=jnp.int32),
                           jax.random.split(key, num_classes))
    # A copy, so that donating the states never frees the caller's arrays.
    return states.replace(variables=jax.tree_util.tree_map(jnp.array, dict(variables)))


def class_axes(state: TriggerState) -> TriggerState:
    """The ``vmap`` axes prefix: 0 for every field, None (shared) for ``variables``."""
    return jax.tree_util.tree_map(lambda _: 0, state.replace(variables=None))


def _freeze_if_done(old: TriggerState, new: TriggerState) -> TriggerState:
    keep = lambda a, b: jnp.where(old.done, a, b)
    frozen = jax.tree_util.tree_map(keep, old.replace(variables=None),
                                    new.replace(variables=None))
    return frozen.replace(variables=old.variables)


def make_trigger_step(model: nn.Module, optimizer: optax.GradientTransformation):
    """Returns one class's pure ``step(state, batch, key) -> (state, metrics)``.

    One Adam step on ``CE(f(stamp(x)), target) + cost * ||mask||_1`` with the model in eval
    mode; the pass sums in ``state.sums`` accumulate for :func:`make_end_epoch`. A class that
    has stopped early is left unchanged. ``key`` is unused (the step is deterministic).
    """

    def loss_fn(params, state: TriggerState, images):
        mask, pattern = decode(params[0]), decode(params[1])
        variables = state.variables
        logits, _ = apply_model(model, variables["params"], variables["batch_stats"],
                                stamp(images, mask, pattern))
        labels = jnp.full((images.shape[0],), state.target, jnp.int32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        l1 = jnp.sum(jnp.abs(mask))
        success = jnp.mean(logits.argmax(-1) == state.target)
        return ce + state.cost * l1, (ce, l1, success)

    def step(state: TriggerState, batch: Batch, key: PRNGKey) -> tuple[TriggerState, Metrics]:
        del key
        params = (state.mask_param, state.pattern_param)
        (loss, (ce, l1, success)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, batch["image"])
        updates, opt_state = optimizer.update(grads, state.opt_state, params)
        mask_param, pattern_param = optax.apply_updates(params, updates)
        new = state.replace(mask_param=mask_param, pattern_param=pattern_param,
                            opt_state=opt_state, count=state.count + 1,
                            sums=state.sums + jnp.stack([ce, l1, success]))
        metrics = {"loss": loss, "ce": ce, "l1": l1, "attack_success": success,
                   "finite": jnp.isfinite(loss).astype(jnp.float32)}
        return _freeze_if_done(state, new), metrics

    return step


def make_end_epoch(adaptive_cost: bool, early_stop: bool):
    """Returns one class's pure ``end_epoch(state, hparams) -> (state, metrics)``.

    Keeps the best successful mask, counts passes without improvement, applies the lambda
    schedule (``visualizer.py``'s order: best mask, early stop, then lambda) and clears the pass
    sums. A stopped class is left unchanged.
    """

    def end_epoch(state: TriggerState, hparams: ScheduleHparams):
        ce, l1, success = state.sums / jnp.maximum(state.count, 1)
        hit = success >= hparams.threshold
        better = hit & (l1 < state.best_l1)
        mask, pattern = decode(state.mask_param), decode(state.pattern_param)
        best_l1 = jnp.where(better, l1, state.best_l1)
        found = jnp.isfinite(best_l1)
        stall = jnp.where(found & (best_l1 >= state.stall_best), state.stall_counter + 1,
                          jnp.where(found, 0, state.stall_counter))
        done = (stall >= hparams.early_stop_patience) if early_stop else jnp.zeros((), bool)
        if adaptive_cost:
            done = done & state.up_flag & state.down_flag
        zero = jnp.int32(0)
        set_counter = jnp.where((state.cost == 0) & hit, state.set_counter + 1, zero)
        reset = set_counter >= hparams.patience if adaptive_cost else jnp.zeros((), bool)
        cost = jnp.where(reset, hparams.init_cost, state.cost)
        up = jnp.where(hit, jnp.where(reset, zero, state.up_counter) + 1, zero)
        down = jnp.where(hit, zero, jnp.where(reset, zero, state.down_counter) + 1)
        go_up = (up >= hparams.patience) & adaptive_cost
        go_down = ~go_up & (down >= hparams.patience) & adaptive_cost
        new = state.replace(
            cost=jnp.where(go_up, cost * hparams.up, jnp.where(go_down, cost / hparams.down,
                                                                cost)),
            sums=jnp.zeros_like(state.sums), count=jnp.zeros_like(state.count),
            set_counter=jnp.where(reset, zero, set_counter),
            up_counter=jnp.where(go_up, zero, up), down_counter=jnp.where(go_down, zero, down),
            up_flag=(state.up_flag & ~reset) | go_up,
            down_flag=(state.down_flag & ~reset) | go_down,
            stall_counter=stall, stall_best=jnp.minimum(best_l1, state.stall_best), done=done,
            best_l1=best_l1, best_mask=jnp.where(better, mask, state.best_mask),
            best_pattern=jnp.where(better, pattern, state.best_pattern))
        metrics = {"ce": ce, "l1": l1, "attack_success": success, "cost": state.cost}
        return _freeze_if_done(state, new), metrics

    return end_epoch


def final_triggers(state: TriggerState) -> tuple[Array, Array, Array]:
    """Per-class ``(masks [K, H, W, 1], patterns [K, H, W, C], reached bool[K])``: the best
    successful trigger, or the last one where no pass reached the success threshold."""
    reached = jnp.isfinite(state.best_l1)
    pick = lambda best, last: jnp.where(reached[:, None, None, None], best, last)
    return (pick(state.best_mask, decode(state.mask_param)),
            pick(state.best_pattern, decode(state.pattern_param)), reached)


def anomaly_index(norms: ArrayLike) -> Array:
    """``|l1 - median| / (1.4826 * MAD)`` for ``float32[K]`` mask norms (Sec. IV-C).

    With MAD = 0 a norm at the median has index 0 and any other norm ``inf``.
    """
    norms = jnp.asarray(norms, jnp.float32)
    deviation = jnp.abs(norms - jnp.median(norms))
    mad = MAD_CONSISTENCY * jnp.median(deviation)
    return jnp.where(deviation == 0, 0.0, deviation / jnp.where(mad > 0, mad, 0.0))


def flag_classes(norms: ArrayLike, threshold: float = 2.0) -> Array:
    """``bool[K]``: norms below the median whose anomaly index exceeds ``threshold``."""
    norms = jnp.asarray(norms, jnp.float32)
    return (norms < jnp.median(norms)) & (anomaly_index(norms) > threshold)


def unlearning_set(data: Batch, masks: Array, patterns: Array, flagged: np.ndarray,
                   fraction: float, key: PRNGKey) -> dict[str, Array]:
    """The clean set with ``round(fraction * N)`` random images stamped, labels kept.

    Args:
      data: ``{"image": float32[N, H, W, C], "label": int32[N]}``.
      masks, patterns: ``[K, H, W, 1]`` and ``[K, H, W, C]`` reversed triggers.
      flagged: indices of the flagged classes (non-empty); stamped images cycle through them.
      fraction: share of images to stamp.
      key: chooses the images.
    """
    count = round(fraction * int(data["label"].shape[0]))
    rows = jax.random.permutation(key, data["label"].shape[0])[:count]
    which = jnp.asarray(flagged, jnp.int32)[jnp.arange(count) % len(flagged)]
    stamped = stamp(data["image"][rows], masks[which], patterns[which])
    return {"image": data["image"].at[rows].set(stamped), "label": data["label"]}


def _jitted_search_steps(model: nn.Module, config: NCConfig, count: int, num_classes: int):
    """The jitted ``(all classes' step, end of pass)`` of one setup."""
    optimizer = make_optimizer(config)
    # A prefix of every state's structure: a class axis on every field but the model.
    axes = TriggerState(**{f: 0 for f in TriggerState.__dataclass_fields__
                           if f != "variables"}, variables=None)
    per_class = jax.vmap(make_trigger_step(model, optimizer), in_axes=(axes, None, 0),
                         out_axes=(axes, 0))
    batch = min(config.batch_size, count)

    def all_classes_step(state, data, key):
        rows_key, step_key = jax.random.split(key)
        rows = jax.random.permutation(rows_key, count)[:batch]
        minibatch = {"image": data["image"][rows], "label": data["label"][rows]}
        return per_class(state, minibatch, jax.random.split(step_key, num_classes))

    end_epoch = jax.vmap(make_end_epoch(config.adaptive_cost, config.early_stop),
                         in_axes=(axes, None), out_axes=(axes, 0))
    return (jax.jit(all_classes_step, donate_argnums=0),
            jax.jit(end_epoch, donate_argnums=0))


def reverse_engineer(model: nn.Module, variables: Variables, data: Batch, key: PRNGKey,
                     config: NCConfig, num_classes: int, progress: bool = True, *,
                     state: TriggerState | None = None, first_pass: int = 0,
                     after_pass=None, checkpointer=None):
    """Runs the vmapped trigger search; returns ``(state, passes run)``.

    A restored run passes its ``state`` and the passes it had finished as ``first_pass``;
    every pass's keys are ``fold_in(run_key, pass)``, so it continues exactly as the
    uninterrupted run. ``after_pass(passes_done, state, finished)`` is called after every pass
    (``finished``: the search ends there), e.g. to checkpoint.

    Raises:
      FloatingPointError: a class's mean loss ``CE + cost * |m|_1`` over a pass is NaN or
        infinite (checked before ``after_pass``; ``checkpointer``'s newest checkpoint is named).
        A class without a successful trigger (``best_l1 = inf``) is not a divergence.
    """
    optimizer = make_optimizer(config)
    init_key, run_key = jax.random.split(key)
    initial = init_trigger_states(variables, init_key, num_classes, data["image"].shape[1:],
                                  optimizer, config.adaptive_cost, config.init_cost)
    state = initial if state is None else state
    step, end_epoch = build_once(_jitted_search_steps, model, config,
                                 int(data["label"].shape[0]), num_classes)
    hparams = config.hparams()
    passes = first_pass
    for epoch in tqdm(range(first_pass, config.epochs), desc="NC", unit="pass",
                      disable=not progress, initial=first_pass, total=config.epochs):
        epoch_key = jax.random.fold_in(run_key, epoch)
        losses = []
        for index in range(config.batches_per_epoch):
            state, metrics = step(state, data, jax.random.fold_in(epoch_key, index))
            losses.append(metrics["loss"])
        state, _ = end_epoch(state, hparams)
        passes = epoch + 1
        raise_if_diverged({"loss": np.asarray(jnp.mean(jnp.stack(losses), axis=0))},
                          what="NC trigger search", epoch=passes, total=config.epochs,
                          unit="pass", lower={"learning_rate": config.learning_rate,
                                              "init_cost": config.init_cost},
                          checkpointer=checkpointer)
        finished = bool(jnp.all(state.done)) or passes == config.epochs
        if after_pass is not None:
            after_pass(passes, state, finished)
        if finished:
            break
    return state, passes


def _num_classes(model, variables, image_shape, num_classes):
    shape = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, *image_shape)), train=False),
                           dict(variables)).shape
    if num_classes is not None and num_classes != shape[-1]:
        raise ValueError(f"num_classes={num_classes} but the model has {shape[-1]} outputs.")
    return int(shape[-1])


def mitigate(model: nn.Module, variables: Variables, data: Batch, masks: Array, patterns: Array,
             key: PRNGKey, config: NCConfig, *, on_epoch=None, progress: bool = True,
             **resumed):
    """Outlier test on the masks' L1 norms, then unlearning if a class is flagged.

    Returns ``(variables, history, seconds, details)``; ``variables`` is the input itself (not
    a copy) and ``history`` empty when no class is flagged. ``resumed`` (``state``,
    ``first_epoch``, ``history``, ``after_epoch``, ``checkpointer``) continues or checkpoints
    the unlearning as :func:`~awm_jax.defenses.finetune.finetune`, which also stops it with a
    FloatingPointError if its loss turns non-finite.
    """
    norms = np.asarray(jnp.sum(jnp.abs(masks), axis=(1, 2, 3)))
    flagged = np.flatnonzero(np.asarray(flag_classes(norms, config.anomaly_threshold)))
    details = {"mask_l1": norms.tolist(),
               "anomaly_index": np.asarray(anomaly_index(norms)).tolist(),
               "flagged": flagged.tolist(),
               "unlearned": bool(flagged.size and config.unlearn_epochs)}
    if not details["unlearned"]:
        return variables, [], 0.0, details
    stamp_key, unlearn_key = jax.random.split(key)
    unlearn_data = unlearning_set(data, masks, patterns, flagged, config.unlearn_fraction,
                                  stamp_key)
    purified, history, seconds = finetune(
        model, variables, unlearn_data, unlearn_key, _unlearn_config(config), on_epoch=on_epoch,
        progress=progress, desc="NC unlearn",
        lower={"unlearn_learning_rate": config.unlearn_learning_rate}, **resumed)
    return purified, history, seconds, details


def _unlearn_config(config: NCConfig) -> FTConfig:
    return FTConfig(learning_rate=config.unlearn_learning_rate,
                    momentum=config.unlearn_momentum, weight_decay=config.unlearn_weight_decay,
                    epochs=config.unlearn_epochs, batch_size=config.unlearn_batch_size)


def _purify(model, variables, clean, key, config: NCConfig, *, num_classes=None,
            on_epoch=None, progress=True, workdir=None, checkpoint_every=1, max_to_keep=2,
            resume=False) -> DefenseResult:
    """Neural Cleanse. With ``workdir`` the run is checkpointed: steps ``1..P`` are trigger-
    search passes (every class's :class:`TriggerState`: triggers, Adam state, lambda schedule
    counters, best masks; the search's last pass is always saved), steps ``epochs + e`` the
    unlearning epochs (the search state plus the :class:`FTState`)
    (:mod:`awm_jax.defenses.checkpointing`)."""
    start = time.perf_counter()
    data = validate_clean(clean, num_classes)
    num_classes = _num_classes(model, variables, data["image"].shape[1:], num_classes)
    search_key, mitigate_key = jax.random.split(key)
    search_target = init_trigger_states(
        variables, jax.random.key(0), num_classes, data["image"].shape[1:],
        make_optimizer(config), config.adaptive_cost, config.init_cost).replace(variables=None)

    def target(meta):
        if meta["phase"] == "search":
            return {"search": search_target}
        return {"search": search_target, "ft": init_ft_state(variables)}

    with open_checkpointer(workdir, kind="nc", unit="passes, then epochs + unlearning epochs",
                           config=config, key=key, data=data, variables=variables,
                           total_steps=config.epochs + config.unlearn_epochs,
                           checkpoint_every=checkpoint_every, max_to_keep=max_to_keep,
                           resume=resume) as checkpointer:
        arrays, meta = checkpointer.restore(target_for_meta=target)
        state, passes = None, meta.get("passes", 0)
        if arrays is not None:
            state = arrays["search"].replace(
                variables=jax.tree_util.tree_map(jnp.array, dict(variables)))
        if not meta.get("search_finished", False):
            state, passes = reverse_engineer(
                model, variables, data, search_key, config, num_classes, progress,
                state=state, first_pass=passes,
                after_pass=lambda done, s, finished: checkpointer.save(
                    done, {"search": s.replace(variables=None)},
                    {"phase": "search", "passes": done, "search_finished": finished},
                    force=finished), checkpointer=checkpointer.run)
        masks, patterns, reached = final_triggers(state)
        search_seconds = time.perf_counter() - start
        searched = {"phase": "unlearn", "passes": passes, "search_finished": True}
        purified, history, seconds, details = mitigate(
            model, variables, data, masks, patterns, mitigate_key, config, on_epoch=on_epoch,
            progress=progress, state=None if arrays is None else arrays.get("ft"),
            first_epoch=max(0, meta["step"] - config.epochs), history=meta.get("history"),
            after_epoch=lambda done, s, h: checkpointer.save(
                config.epochs + done, {"search": state.replace(variables=None), "ft": s},
                {**searched, "history": h}), checkpointer=checkpointer.run)
    details.update(reached=np.asarray(reached).tolist(), cost=np.asarray(state.cost).tolist(),
                   passes=passes)
    return DefenseResult(purified, history,
                         search_seconds + seconds + checkpointer.seconds_before, details)


@DEFENSES.register("nc")
def nc() -> Defense:
    return Defense("nc", NCConfig, _purify)
