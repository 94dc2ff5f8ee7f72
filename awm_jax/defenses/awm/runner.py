"""Host driver for AWM: validates inputs, jits the pure steps once, runs the epochs.

This is the one place where AWM's steps are jitted (with the state donated). Python drives the
epochs, the progress bar, the optional per-epoch evaluation and the optional checkpoints
(:mod:`awm_jax.defenses.awm.checkpointing`); nothing inside a step syncs with the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from awm_jax.data.dataset import Split
from awm_jax.defenses.awm.checkpointing import AWMCheckpointer, Progress, fingerprint
from awm_jax.defenses.awm.config import AWMConfig
from awm_jax.defenses.awm.mask import fold_mask, mask_statistics
from awm_jax.defenses.awm.step import AWMState, AWMSteps, Frozen, make_awm_steps, phase_keys
from awm_jax.defenses.divergence import raise_if_diverged
from awm_jax.types import PRNGKey, Variables, validate_images, validate_labels

EpochCallback = Callable[[int, Variables], dict[str, float]]


@dataclasses.dataclass
class AWMResult:
    """What :func:`run_awm` returns.

    Attributes:
      variables: the purified model's ``{"params", "batch_stats"}`` with the mask folded in.
      mask: the selected soft mask.
      selected_epoch: the epoch (1-based) whose mask was returned; for ``"average"`` the first
        epoch of the averaged window.
      history: one dict per epoch: mean step metrics, selection score, and the callback's values.
      mask_stats: :func:`mask_statistics` of the returned mask.
      seconds: wall time of the defense (compile included), evaluation callbacks excluded; a
        resumed run adds the time its checkpoint had recorded (the whole run's time).
      compile_seconds: time of the first epoch minus that of the second (an estimate).
    """

    variables: Variables
    mask: object
    selected_epoch: int
    history: list[dict]
    mask_stats: dict[str, float]
    seconds: float
    compile_seconds: float | None


def _validate_clean(clean: Split, num_classes: int | None) -> dict[str, jnp.ndarray]:
    images = validate_images(clean.images, "clean images")
    labels = validate_labels(clean.labels, num_classes if num_classes else 1 << 30,
                             count=images.shape[0], name="clean labels")
    return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


class _Driver:
    """Jitted phases of one configuration, driven from Python (``loop="python"``) or as scans."""

    def __init__(self, steps: AWMSteps, config: AWMConfig):
        self.steps, self.config = steps, config
        self.begin_epoch = jax.jit(steps.begin_epoch, donate_argnums=0)
        self.trigger_step = jax.jit(steps.trigger_step, donate_argnums=0)
        self.end_trigger_phase = jax.jit(steps.end_trigger_phase, donate_argnums=0)
        self.selection_score = jax.jit(steps.selection_score)
        self.mask_step = jax.jit(steps.mask_step, donate_argnums=0)
        self.end_epoch = jax.jit(steps.end_epoch, donate_argnums=0)
        self.scanned_trigger_phase = jax.jit(steps.trigger_phase, donate_argnums=0)
        self.scanned_mask_phase = jax.jit(steps.mask_phase, donate_argnums=0)
        self.shrink_step = jax.jit(steps.shrink_step, donate_argnums=(0, 1))

    def trigger_phase(self, state: AWMState, frozen, data, key, hparams):
        if self.config.loop == "scan":
            return self.scanned_trigger_phase(state, frozen, data, key, hparams)
        state = self.begin_epoch(state, frozen, data, hparams)
        history = []
        for step_key in phase_keys(key, self.steps.steps_per_phase)[0]:
            state, metrics = self.trigger_step(state, frozen, data, step_key, hparams)
            history.append(metrics)
        state = self.end_trigger_phase(state, hparams)
        metrics = _mean_metrics(history)
        metrics["trigger_l1"] = jnp.sum(jnp.abs(state.trigger))
        if self.config.mask_selection == "min_robust_loss":
            metrics["selection_score"] = self.selection_score(state, frozen, data, hparams)
        return state, metrics

    def mask_phase(self, state: AWMState, frozen, data, key, hparams):
        if self.config.loop == "scan":
            return self.scanned_mask_phase(state, frozen, data, key, hparams)
        history = []
        for step_key in phase_keys(key, self.steps.steps_per_phase)[1]:
            state, metrics = self.mask_step(state, frozen, data, step_key, hparams)
            history.append(metrics)
        return self.end_epoch(state), _mean_metrics(history)


@functools.lru_cache(maxsize=8)
def _cached_driver(model: nn.Module, config: AWMConfig, num_clean: int) -> _Driver:
    return _Driver(make_awm_steps(model, config, num_clean), config)


def _driver(model: nn.Module, config: AWMConfig, num_clean: int) -> _Driver:
    """The jitted steps of one setup, reused so that a second run (a resume, a repeat) with an
    equal model and config does not compile again."""
    try:
        return _cached_driver(model, config, num_clean)
    except TypeError:  # an unhashable module attribute: build the steps uncached.
        return _Driver(make_awm_steps(model, config, num_clean), config)


def _mean_metrics(history: list[dict]) -> dict:
    return {name: jnp.mean(jnp.stack([m[name] for m in history])) for name in history[0]}


def run_awm(model: nn.Module, variables: Variables, clean: Split, config: AWMConfig,
            key: PRNGKey, *, num_classes: int | None = None,
            on_epoch: EpochCallback | None = None, progress: bool = True,
            workdir: str | os.PathLike | None = None, checkpoint_every: int = 1,
            max_to_keep: int = 2, resume: bool = False) -> AWMResult:
    """Purifies a backdoored model with AWM from the defender's clean images.

    Args:
      model: the flax module of the backdoored model.
      variables: its ``{"params", "batch_stats"}``.
      clean: the defender's clean images ``float32[N, H, W, C]`` and labels ``int32[N]``.
      config: AWM settings (defaults: the official code's).
      key: PRNG key for batch draws.
      num_classes: if given, clean labels are checked against it.
      on_epoch: optional ``(epoch, purified_variables) -> metrics`` called after every epoch
        (e.g. test ACC/ASR for a plot); its time is not counted in ``seconds``.
      progress: show a progress bar.
      workdir: if given, the run's progress is checkpointed there with orbax
        (:mod:`awm_jax.defenses.awm.checkpointing`).
      checkpoint_every: save after every this many epochs (and after the last one).
      max_to_keep: checkpoints kept in ``workdir``.
      resume: continue from the newest checkpoint in ``workdir``; with none there the run
        starts fresh. Without ``resume``, a ``workdir`` holding checkpoints is an error, so a
        finished or killed run is never silently overwritten. A resumed run ends with the same
        masks and metrics, bit for bit, as an uninterrupted run with the same inputs (on the
        same device type).

    Returns:
      An :class:`AWMResult`.

    Raises:
      ValueError: invalid clean data (see the batch contract), an empty clean set, ``resume``
        without ``workdir``, checkpoints in ``workdir`` without ``resume``, or a checkpoint
        written with another config or other inputs.
      FloatingPointError: an epoch's step metrics are NaN or infinite; the message names the
        epoch and the last good checkpoint, which is kept.
    """
    if resume and workdir is None:
        raise ValueError("resume=True needs a workdir to resume from; got workdir=None.")
    data = _validate_clean(clean, num_classes)
    driver = _driver(model, config, int(data["label"].shape[0]))
    steps = driver.steps
    hparams = config.hparams()
    frozen = Frozen(variables["params"], variables["batch_stats"])
    shrink_key, epochs_key = jax.random.split(key)
    run = Progress(state=steps.init(frozen.params, data, hparams), history=[], epochs_done=0,
                   best_score=np.inf, best_epoch=config.outer_epochs)
    checkpointer = None
    if workdir is not None:
        checkpointer = AWMCheckpointer(workdir, config, fingerprint(key, data, variables),
                                       checkpoint_every=checkpoint_every,
                                       max_to_keep=max_to_keep)
    start = time.perf_counter()
    timing = {"excluded": 0.0, "epochs": []}  # callback seconds; per-epoch seconds
    seconds_before = 0.0  # of the epochs a restored checkpoint had run
    try:
        restored = checkpointer.start(run, resume) if checkpointer is not None else None
        if restored is not None:
            run = restored
            seconds_before = run.seconds
        elif config.shrink_epochs:
            run.state = _shrink(driver, run.state, frozen, data, shrink_key, hparams)
        bar = tqdm(range(run.epochs_done, config.outer_epochs), desc="AWM", unit="epoch",
                   disable=not progress, initial=run.epochs_done, total=config.outer_epochs)
        for epoch in bar:
            record = _run_epoch(driver, run, frozen, data, jax.random.fold_in(epochs_key, epoch),
                                hparams, on_epoch, timing)
            _check_finite(record, epoch + 1, checkpointer)
            run.history.append(record)
            run.epochs_done = epoch + 1
            run.seconds = seconds_before + time.perf_counter() - start - timing["excluded"]
            if checkpointer is not None:
                checkpointer.maybe_save(run)
            bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                             if k in ("loss", "triggered_ce", "acc", "asr")})
    finally:
        if checkpointer is not None:
            checkpointer.close()
    mask, selected = _select(driver, run, frozen, data, epochs_key, hparams)
    seconds = seconds_before + time.perf_counter() - start - timing["excluded"]
    epoch_seconds = timing["epochs"]
    compile_seconds = epoch_seconds[0] - epoch_seconds[1] if len(epoch_seconds) > 1 else None
    return AWMResult(_purified(frozen, mask), mask, selected, run.history, mask_statistics(mask),
                     seconds, compile_seconds)


def _run_epoch(driver: _Driver, run: Progress, frozen, data, epoch_key, hparams,
               on_epoch: EpochCallback | None, timing: dict) -> dict:
    """One epoch (``run.epochs_done`` + 1): updates ``run``'s state and selection bookkeeping
    and returns the epoch's history record (not yet appended)."""
    config, epoch = driver.config, run.epochs_done
    epoch_start = time.perf_counter()
    selecting = config.mask_selection == "min_robust_loss"
    # The mask phase donates the state, so keep the mask this epoch's trigger is scored on.
    previous_mask = jax.tree_util.tree_map(jnp.copy, run.state.mask) if selecting else None
    run.state, trigger_metrics = driver.trigger_phase(run.state, frozen, data, epoch_key,
                                                      hparams)
    if selecting and epoch > 0:
        _keep_if_best(run, float(trigger_metrics["selection_score"]), epoch, previous_mask)
        run.history[-1]["selection_score"] = float(trigger_metrics["selection_score"])
    run.state, mask_metrics = driver.mask_phase(run.state, frozen, data, epoch_key, hparams)
    record = {"epoch": epoch + 1, **{k: float(v) for k, v in
                                     {**trigger_metrics, **mask_metrics}.items()
                                     if k != "selection_score"}}
    timing["epochs"].append(time.perf_counter() - epoch_start)
    if on_epoch is not None:
        eval_start = time.perf_counter()
        record.update(on_epoch(epoch + 1, _purified(frozen, run.state.mask)))
        timing["excluded"] += time.perf_counter() - eval_start
    if config.mask_selection == "average" and epoch >= _average_from(config):
        run.mask_sum = (jax.tree_util.tree_map(jnp.copy, run.state.mask) if run.mask_sum is None
                        else _add_masks(run.mask_sum, run.state.mask))
    return record


def _average_from(config: AWMConfig) -> int:
    """The 0-based first epoch whose mask ``"average"`` selection averages."""
    return config.outer_epochs - math.ceil(config.outer_epochs / 2)


def _select(driver: _Driver, run: Progress, frozen, data, epochs_key, hparams):
    """The returned mask and its (1-based) epoch, per ``config.mask_selection``."""
    config = driver.config
    if config.mask_selection == "min_robust_loss":
        final_key = jax.random.fold_in(epochs_key, config.outer_epochs)
        state, trigger_metrics = driver.trigger_phase(run.state, frozen, data, final_key,
                                                      hparams)
        run.history[-1]["selection_score"] = float(trigger_metrics["selection_score"])
        _keep_if_best(run, run.history[-1]["selection_score"], config.outer_epochs, state.mask)
        return run.best_mask, run.best_epoch
    if config.mask_selection == "average":
        count = config.outer_epochs - _average_from(config)
        return jax.tree_util.tree_map(lambda m: m / count, run.mask_sum), \
            _average_from(config) + 1
    return run.state.mask, config.outer_epochs


def _check_finite(record: dict, epoch: int, checkpointer: AWMCheckpointer | None) -> None:
    """Raises FloatingPointError if a step metric of ``record`` is NaN or infinite."""
    raise_if_diverged(record, what="AWM", epoch=epoch, metrics=_STEP_METRICS,
                      lower=("trigger_lr", "mask_lr", "gamma"), checkpointer=checkpointer)


_STEP_METRICS = frozenset({"loss", "clean_ce", "triggered_ce", "mask_l1", "trigger_ce",
                           "trigger_l1"})


@jax.jit
def _add_masks(total, mask):
    return jax.tree_util.tree_map(jnp.add, total, mask)


def _keep_if_best(run: Progress, score: float, epoch: int, mask) -> None:
    if score < run.best_score:
        run.best_score, run.best_epoch, run.best_mask = score, epoch, mask


def _purified(frozen: Frozen, mask) -> Variables:
    return {"params": fold_mask(frozen.params, mask), "batch_stats": frozen.batch_stats}


def _shrink(driver: _Driver, state, frozen, data, key, hparams):
    shrink_opt_state = driver.steps.shrink_init(state.mask)
    steps = driver.config.shrink_epochs * driver.steps.steps_per_phase
    for step in range(steps):
        state, shrink_opt_state, _ = driver.shrink_step(
            state, shrink_opt_state, frozen, data, jax.random.fold_in(key, step), hparams)
    return state
