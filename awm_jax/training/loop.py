"""The host loop that trains a backdoored model: poison, train with SGD, evaluate, save.

Data flows one way: ``dataset.train`` is poisoned with ``attack``, the model trains on it for
``config.epochs`` epochs, and the result is evaluated on the clean and triggered test split
(:func:`awm_jax.eval.metrics.evaluate_backdoor`). All randomness comes from ``config.seed``,
split once into named keys.

Example::

    dataset = load_digits(16)
    attack = create_attack("badnets", target=0, patch_size=3)
    config = TrainConfig(model="small_cnn", model_kwargs={"features": (16, 32)}, epochs=10)
    result = train_backdoored_model(dataset, attack, config, workdir="runs/digits-badnets")
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import shutil
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from tqdm.auto import tqdm

from awm_jax.attacks.base import Attack, triggered_test_set, validate_target
from awm_jax.checkpoint import METADATA_FILE, VARIABLES_DIR, save_model
from awm_jax.data.dataset import ImageDataset, Split
from awm_jax.eval.metrics import evaluate_backdoor, make_predict_fn, predict_in_batches
from awm_jax.models import create_model
from awm_jax.perf import with_conv_impl
from awm_jax.run_checkpoint import RunCheckpointer
from awm_jax.training.config import TrainConfig
from awm_jax.training.optimizer import create_optimizer
from awm_jax.training.poisoning import WANET_CROSS_RATIO, make_training_set
from awm_jax.training.state import TrainState, create_train_state
from awm_jax.training.steps import make_train_step
from awm_jax.types import PRNGKey, Variables


@dataclasses.dataclass
class TrainResult:
    """What :func:`train_backdoored_model` produced.

    Attributes:
      model: the flax module.
      variables: ``{"params", "batch_stats"}`` after the last epoch.
      metrics: ``{"acc", "asr", "asr_all", "ra"}`` on the test split (see
        :mod:`awm_jax.eval.metrics`).
      history: one dict per epoch: ``epoch``, ``loss`` and ``train_acc`` (means over the epoch's
        poisoned, augmented batches), ``lr`` (at the epoch's last step), ``seconds`` since the
        start, and the test metrics on epochs where they were evaluated.
      seconds: wall time of the whole run: poisoning, compilation, training and evaluation.
      config: the training configuration.
      poisoned_indices: ``int64[P]`` indices of the poisoned training images.
    """

    model: nn.Module
    variables: Variables
    metrics: dict[str, float]
    history: list[dict[str, float]]
    seconds: float
    config: TrainConfig
    poisoned_indices: np.ndarray


def _check_inputs(dataset: ImageDataset, attack: Attack | None, config: TrainConfig,
                  workdir: str | None) -> None:
    if attack is not None and attack.target is not None:
        validate_target(attack.target, dataset.num_classes)
    if config.batch_size > len(dataset.train):
        raise ValueError(f"batch_size={config.batch_size} exceeds the {len(dataset.train)} "
                         f"training images of {dataset.name!r}; use batch_size <= "
                         f"{len(dataset.train)}.")
    if workdir is not None and any(os.path.exists(os.path.join(workdir, name))
                                   for name in (METADATA_FILE, VARIABLES_DIR)):
        # Fail before training, not after it.
        raise ValueError(f"workdir {workdir} already holds a model; choose another directory.")


def _split_digest(split: Split) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(split.images).tobytes())
    digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()


def _checkpointer(checkpoint_dir, dataset: ImageDataset, poisoned: Split, attack: Attack | None,
                  config: TrainConfig, checkpoint_every: int,
                  max_to_keep: int) -> RunCheckpointer:
    # The data digests cost ~2 s for CIFAR-10; they are what stops a resume on other data (or
    # other poison, e.g. CLB against another clean model).
    fingerprint = {"dataset": dataset.name, "train_sha256": _split_digest(poisoned),
                   "test_sha256": _split_digest(dataset.test),
                   "attack": None if attack is None else attack.name,
                   "attack_params": {} if attack is None else dict(attack.params)}
    return RunCheckpointer(checkpoint_dir, kind="training", unit="epochs",
                           config=config.to_dict(), fingerprint=fingerprint,
                           total_steps=config.epochs, checkpoint_every=checkpoint_every,
                           max_to_keep=max_to_keep)


def _epoch_order(data_key: PRNGKey, epoch: int, count: int, steps: int,
                 batch_size: int) -> np.ndarray:
    """``steps * batch_size`` indices: a fresh permutation, wrapped around to fill the last batch.

    Every image is seen each epoch and every batch has the same shape (one compilation); the few
    wrapped images are seen twice in that epoch.
    """
    permutation = np.asarray(jax.random.permutation(jax.random.fold_in(data_key, epoch), count))
    return permutation[np.arange(steps * batch_size) % count]


def _run_epoch(train_step, state: TrainState, split: Split, order: np.ndarray, batch_size: int,
               train_key: PRNGKey, bar) -> tuple[TrainState, dict[str, float]]:
    """One pass over ``order``; returns the epoch's mean metrics with a single host sync."""
    step_metrics = []
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = {"image": split.images[index], "label": split.labels[index]}
        state, metrics = train_step(state, batch, train_key)
        step_metrics.append(metrics)
        bar.update()
    step_metrics = jax.device_get(step_metrics)
    return state, {"loss": float(np.mean([m["loss"] for m in step_metrics])),
                   "train_acc": float(np.mean([m["accuracy"] for m in step_metrics]))}


def train_backdoored_model(dataset: ImageDataset, attack: Attack | None, config: TrainConfig, *,
                           workdir: str | os.PathLike | None = None, progress: bool = True,
                           eval_every: int = 0,
                           checkpoint_dir: str | os.PathLike | None = None,
                           checkpoint_every: int = 1, resume: bool = False,
                           max_to_keep: int = 2, keep_checkpoints: bool = True,
                           clean_logits_fn=None,
                           cross_ratio: float = WANET_CROSS_RATIO) -> TrainResult:
    """Poisons ``dataset.train`` with ``attack`` and trains ``config.model`` on it.

    Keys: ``jax.random.key(config.seed)`` is split into ``poison`` (which images, trigger
    randomness), ``init`` (parameters), ``data`` (per-epoch order, folded with the epoch),
    ``train`` (augmentation and dropout, folded with the step inside the step function) and
    ``trigger`` (the triggered test set).

    With ``checkpoint_dir``, the whole training state (parameters, batch statistics, optimiser
    state and step counter) and the history are saved with orbax every ``checkpoint_every``
    epochs; ``resume=True`` continues from the newest checkpoint there. Since every epoch's data
    order is ``fold_in(data, epoch)`` and every step's augmentation is ``fold_in(train, step)``,
    a run killed at any moment and resumed ends bit-identical to an uninterrupted one.

    Args:
      dataset: the clean dataset; its train split is poisoned, its test split evaluates.
      attack: the backdoor attack (see :func:`awm_jax.attacks.create_attack`), or ``None`` to
        train a clean model (its metrics are then ``{"acc"}`` only).
      config: model, optimiser, schedule, augmentation, poison rate and seed.
      workdir: if given, the final model is saved there with :func:`save_result`.
      progress: show a tqdm progress bar over the training steps.
      eval_every: also evaluate on the test split every this many epochs (0: only at the end,
        which always happens).
      checkpoint_dir: where to checkpoint the run in progress (``None``: no checkpoints).
      checkpoint_every: epochs between checkpoints (the last epoch is always saved).
      resume: continue from the newest checkpoint in ``checkpoint_dir`` (a fresh start if it
        holds none).
      max_to_keep: checkpoints kept in ``checkpoint_dir``.
      keep_checkpoints: with ``workdir``, keep ``checkpoint_dir`` after the final model is saved
        (``False`` deletes it then, since the saved model supersedes it).
      clean_logits_fn: a clean model's ``images -> logits``; CLB's poison is perturbed against
        it (see :func:`awm_jax.training.poisoning.make_training_set`).
      cross_ratio: WaNet noise-mode images per poisoned image.

    Returns:
      A :class:`TrainResult`.

    Raises:
      ValueError: the attack's target is not a class of ``dataset``, ``batch_size`` exceeds the
        training set, ``eval_every`` < 0, ``workdir`` already holds a model, ``resume`` without
        ``checkpoint_dir``, checkpoints in ``checkpoint_dir`` without ``resume``, or a checkpoint
        written with another config or data.
      FloatingPointError: the mean training loss of an epoch is NaN or Inf.
    """
    if eval_every < 0:
        raise ValueError(f"eval_every must be >= 0 (0: evaluate only at the end); got "
                         f"{eval_every}.")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir to resume from; got None.")
    workdir = None if workdir is None else os.fspath(workdir)
    _check_inputs(dataset, attack, config, workdir)
    start = time.perf_counter()
    poison_key, init_key, data_key, train_key, trigger_key = jax.random.split(
        jax.random.key(config.seed), 5)
    poisoned = make_training_set(dataset.train, attack, poison_key, config.poison_rate,
                                 clean_logits_fn=clean_logits_fn, cross_ratio=cross_ratio)
    triggered = None if attack is None else triggered_test_set(dataset.test, attack,
                                                               trigger_key)

    model = create_model(config.model, dataset.num_classes, **config.model_kwargs)
    if config.conv_impl != "lax":
        model = with_conv_impl(model, config.conv_impl)
    count = len(poisoned.split)
    steps = math.ceil(count / config.batch_size)
    tx, schedule = create_optimizer(config, steps)
    state = create_train_state(model, tx, init_key, dataset.image_shape)
    # The one place the training step is jitted; the state's buffers are reused in place.
    train_step = jax.jit(make_train_step(model, tx, crop_padding=config.crop_padding,
                                         flip=config.flip), donate_argnums=0)
    predict = make_predict_fn(model)

    def evaluate(variables):
        if triggered is None:
            predictions = predict_in_batches(functools.partial(predict, variables),
                                             dataset.test.images, config.eval_batch_size)
            return {"acc": float(np.mean(predictions == dataset.test.labels))}
        return evaluate_backdoor(functools.partial(predict, variables), dataset.test, triggered,
                                 config.eval_batch_size)

    history, metrics, first_epoch = [], {}, 0
    checkpointer = None
    if checkpoint_dir is not None:
        checkpointer = _checkpointer(checkpoint_dir, dataset, poisoned.split, attack, config,
                                     checkpoint_every, max_to_keep)
        restored = checkpointer.start(state, resume)
        if restored is not None:
            state, meta = restored
            history, first_epoch = list(meta["history"]), meta["step"]
            start -= meta["seconds"]  # wall time before the interruption counts too
    try:
        state, history, metrics = _train_epochs(
            train_step, evaluate, state, poisoned.split, data_key, train_key, schedule, config,
            steps, first_epoch, history, eval_every, checkpointer, start, progress)
    finally:
        if checkpointer is not None:
            checkpointer.close()

    result = TrainResult(model=model, variables=state.variables, metrics=metrics,
                         history=history, seconds=time.perf_counter() - start, config=config,
                         poisoned_indices=np.flatnonzero(poisoned.poisoned))
    if workdir is not None:
        save_result(workdir, result, dataset, attack)
        if checkpoint_dir is not None and not keep_checkpoints:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return result


def _train_epochs(train_step, evaluate, state: TrainState, split: Split, data_key: PRNGKey,
                  train_key: PRNGKey, schedule, config: TrainConfig, steps: int,
                  first_epoch: int, history: list[dict], eval_every: int,
                  checkpointer: RunCheckpointer | None, start: float, progress: bool):
    """Epochs ``first_epoch..config.epochs-1``; returns the state, history and final metrics."""
    metrics = {}
    count = len(split)
    with tqdm(total=config.epochs * steps, desc=f"train {config.model}", unit="step",
              initial=first_epoch * steps, disable=not progress) as bar:
        for epoch in range(first_epoch, config.epochs):
            order = _epoch_order(data_key, epoch, count, steps, config.batch_size)
            state, summary = _run_epoch(train_step, state, split, order,
                                        config.batch_size, train_key, bar)
            if not math.isfinite(summary["loss"]):
                raise FloatingPointError(
                    f"training diverged in epoch {epoch + 1}/{config.epochs}: mean loss "
                    f"{summary['loss']}; lower learning_rate (now {config.learning_rate}).")
            last = epoch + 1 == config.epochs
            if last or (eval_every and (epoch + 1) % eval_every == 0):
                metrics = evaluate(state.variables)
                summary.update(metrics)
            summary.update(epoch=epoch + 1, lr=float(schedule((epoch + 1) * steps - 1)),
                           seconds=time.perf_counter() - start)
            history.append(summary)
            if checkpointer is not None:
                checkpointer.maybe_save(epoch + 1, state, {
                    "history": history, "seconds": time.perf_counter() - start})
            bar.set_postfix(epoch=epoch + 1, loss=f"{summary['loss']:.3f}",
                            acc=f"{summary['train_acc']:.3f}")
    if not metrics:  # resumed after the last epoch: the metrics were saved with it
        metrics = {k: history[-1][k] for k in ("acc", "asr", "asr_all", "ra")
                   if k in history[-1]}
    return state, history, metrics


def training_metadata(result: TrainResult, dataset: ImageDataset,
                      attack: Attack | None) -> dict[str, Any]:
    """The provenance of a trained model, for ``metadata.json`` (see :func:`save_result`)."""
    return {
        "dataset": {"name": dataset.name, "num_classes": dataset.num_classes,
                    "image_shape": list(dataset.image_shape), "train_size": len(dataset.train),
                    "test_size": len(dataset.test)},
        "attack": None if attack is None else {"name": attack.name,
                                               "params": dict(attack.params)},
        "poisoned_count": int(result.poisoned_indices.size),
        "seed": result.config.seed,
        "train_config": result.config.to_dict(),
        "metrics": result.metrics,
        "history": result.history,
        "seconds": result.seconds,
    }


def save_result(directory: str | os.PathLike, result: TrainResult, dataset: ImageDataset,
                attack: Attack | None, *, overwrite: bool = False) -> str:
    """Saves a trained model with :func:`awm_jax.checkpoint.save_model` and its provenance."""
    return save_model(directory, result.config.model, result.config.model_kwargs,
                      dataset.num_classes, dataset.image_shape, result.variables,
                      training_metadata(result, dataset, attack), overwrite=overwrite)
