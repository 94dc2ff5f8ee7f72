"""Host driver for AWM: validates inputs, jits the pure steps once, runs the epochs.

This is the one place where AWM's steps are jitted (with the state donated). Python drives the
epochs, the progress bar and the optional per-epoch evaluation; nothing inside a step syncs
with the host.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from awm_jax.data.dataset import Split
from awm_jax.defenses.awm.config import AWMConfig
from awm_jax.defenses.awm.mask import fold_mask, mask_statistics
from awm_jax.defenses.awm.step import AWMState, AWMSteps, Frozen, make_awm_steps, phase_keys
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
      seconds: wall time of the defense (compile included), evaluation callbacks excluded.
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


def _mean_metrics(history: list[dict]) -> dict:
    return {name: jnp.mean(jnp.stack([m[name] for m in history])) for name in history[0]}


def run_awm(model: nn.Module, variables: Variables, clean: Split, config: AWMConfig,
            key: PRNGKey, *, num_classes: int | None = None,
            on_epoch: EpochCallback | None = None, progress: bool = True) -> AWMResult:
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

    Returns:
      An :class:`AWMResult`.

    Raises:
      ValueError: invalid clean data (see the batch contract) or an empty clean set.
    """
    data = _validate_clean(clean, num_classes)
    steps = make_awm_steps(model, config, int(data["label"].shape[0]))
    driver = _Driver(steps, config)
    hparams = config.hparams()
    frozen = Frozen(variables["params"], variables["batch_stats"])
    state = steps.init(frozen.params, data, hparams)
    shrink_key, epochs_key = jax.random.split(key)
    selecting = config.mask_selection == "min_robust_loss"
    average_from = config.outer_epochs - math.ceil(config.outer_epochs / 2)
    mask_sum = None
    best = {"score": np.inf, "epoch": config.outer_epochs, "mask": None}
    history: list[dict] = []
    epoch_seconds: list[float] = []
    start = time.perf_counter()
    excluded = 0.0  # seconds spent in evaluation callbacks
    if config.shrink_epochs:
        state = _shrink(driver, state, frozen, data, shrink_key, hparams)
    bar = tqdm(range(config.outer_epochs), desc="AWM", unit="epoch", disable=not progress)
    for epoch in bar:
        epoch_start = time.perf_counter()
        epoch_key = jax.random.fold_in(epochs_key, epoch)
        # The mask phase donates the state, so keep the mask this epoch's trigger is scored on.
        previous_mask = jax.tree_util.tree_map(jnp.copy, state.mask) if selecting else None
        state, trigger_metrics = driver.trigger_phase(state, frozen, data, epoch_key, hparams)
        if selecting and epoch > 0:
            _keep_if_best(best, float(trigger_metrics["selection_score"]), epoch, previous_mask)
            history[-1]["selection_score"] = float(trigger_metrics["selection_score"])
        state, mask_metrics = driver.mask_phase(state, frozen, data, epoch_key, hparams)
        record = {"epoch": epoch + 1, **{k: float(v) for k, v in
                                         {**trigger_metrics, **mask_metrics}.items()
                                         if k != "selection_score"}}
        epoch_seconds.append(time.perf_counter() - epoch_start)
        if on_epoch is not None:
            eval_start = time.perf_counter()
            record.update(on_epoch(epoch + 1, _purified(frozen, state.mask)))
            excluded += time.perf_counter() - eval_start
        history.append(record)
        if config.mask_selection == "average" and epoch >= average_from:
            mask_sum = (jax.tree_util.tree_map(jnp.copy, state.mask) if mask_sum is None
                        else _add_masks(mask_sum, state.mask))
        bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                         if k in ("loss", "triggered_ce", "acc", "asr")})
    mask, selected = state.mask, config.outer_epochs
    if selecting:
        final_key = jax.random.fold_in(epochs_key, config.outer_epochs)
        state, trigger_metrics = driver.trigger_phase(state, frozen, data, final_key, hparams)
        history[-1]["selection_score"] = float(trigger_metrics["selection_score"])
        _keep_if_best(best, history[-1]["selection_score"], config.outer_epochs, state.mask)
        mask, selected = best["mask"], best["epoch"]
    if config.mask_selection == "average":
        count = config.outer_epochs - average_from
        mask = jax.tree_util.tree_map(lambda m: m / count, mask_sum)
        selected = average_from + 1
    seconds = time.perf_counter() - start - excluded
    compile_seconds = epoch_seconds[0] - epoch_seconds[1] if len(epoch_seconds) > 1 else None
    return AWMResult(_purified(frozen, mask), mask, selected, history, mask_statistics(mask),
                     seconds, compile_seconds)


@jax.jit
def _add_masks(total, mask):
    return jax.tree_util.tree_map(jnp.add, total, mask)


def _keep_if_best(best: dict, score: float, epoch: int, mask) -> None:
    if score < best["score"]:
        best.update(score=score, epoch=epoch, mask=mask)


def _purified(frozen: Frozen, mask) -> Variables:
    return {"params": fold_mask(frozen.params, mask), "batch_stats": frozen.batch_stats}


def _shrink(driver: _Driver, state, frozen, data, key, hparams):
    shrink_opt_state = driver.steps.shrink_init(state.mask)
    steps = driver.config.shrink_epochs * driver.steps.steps_per_phase
    for step in range(steps):
        state, shrink_opt_state, _ = driver.shrink_step(
            state, shrink_opt_state, frozen, data, jax.random.fold_in(key, step), hparams)
    return state
