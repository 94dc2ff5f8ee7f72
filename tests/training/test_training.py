"""Tests for the training config, state, steps and the backdoored-model training loop."""

from __future__ import annotations

import dataclasses
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.attacks import create_attack
from awm_jax.data.dataset import ImageDataset, Split
from awm_jax.data.digits import load_digits
from awm_jax.models import create_model
from awm_jax.training import (TrainConfig, TrainState, create_learning_rate_schedule,
                              create_optimizer, create_train_state, make_eval_step,
                              make_train_step, train_backdoored_model)


def _cheap_key(seed: int) -> jax.Array:
    # Eager threefry init compiles one kernel per parameter shape (seconds on this CPU); the
    # step tests only need some initialisation.
    return jax.random.key(seed, impl="unsafe_rbg")


@functools.lru_cache(maxsize=None)
def _digits() -> ImageDataset:
    return load_digits(16)


@functools.lru_cache(maxsize=None)
def _tiny_setup():
    """A one-block CNN, its optimiser and a fixed 32-image digits batch at 8x8."""
    model = create_model("small_cnn", 10, features=(8,))
    config = TrainConfig(model_kwargs={"features": (8,)}, learning_rate=0.1, epochs=1,
                         schedule="constant")
    tx, _ = create_optimizer(config, steps_per_epoch=10)
    images = np.asarray(jax.image.resize(_digits().train.images[:32], (32, 8, 8, 1), "linear"))
    batch = {"image": np.clip(images, 0, 1), "label": _digits().train.labels[:32]}
    return model, tx, batch


def _fresh_state() -> TrainState:
    model, tx, _ = _tiny_setup()
    return create_train_state(model, tx, _cheap_key(0), (8, 8, 1))


# --- TrainConfig ---------------------------------------------------------------------------

@pytest.mark.parametrize("changes, match", [
    ({"epochs": 0}, "epochs"),
    ({"epochs": 2.5}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"momentum": 1.0}, "momentum"),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"nesterov": True, "momentum": 0.0}, "nesterov"),
    ({"schedule": "linear"}, "schedule"),
    ({"schedule": "multistep"}, "milestones"),
    ({"schedule": "multistep", "milestones": (5, 3)}, "increasing"),
    ({"schedule": "multistep", "milestones": (10,)}, "milestones"),
    ({"schedule": "cosine", "milestones": (3,)}, "multistep"),
    ({"warmup_epochs": 10}, "warmup_epochs"),
    ({"crop_padding": -1}, "crop_padding"),
    ({"flip": 1}, "flip"),
    ({"poison_rate": 0.0}, "poison_rate"),
    ({"poison_rate": 1.5}, "poison_rate"),
    ({"seed": -1}, "seed"),
    ({"eval_batch_size": 0}, "eval_batch_size"),
    ({"model": ""}, "model"),
    ({"model_kwargs": {"num_classes": 3}}, "num_classes"),
])
def test_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"epochs": 10, **changes})


def test_config_json_round_trip():
    config = TrainConfig(model_kwargs={"features": (8, 16)}, epochs=6, schedule="multistep",
                         milestones=(3, 5), warmup_epochs=1, crop_padding=2, flip=True)
    restored = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.model_kwargs["features"] == (8, 16)
    assert hash(restored) == hash(config)
    with pytest.raises(ValueError, match="unknown TrainConfig keys.*'epoch'"):
        TrainConfig.from_dict({"epoch": 3})


def test_schedules():
    steps = 10
    multistep = create_learning_rate_schedule(
        TrainConfig(epochs=4, learning_rate=1.0, schedule="multistep", milestones=(2, 3),
                    warmup_epochs=1, decay_factor=0.5), steps)
    np.testing.assert_allclose([multistep(s) for s in (0, 5, 10, 19, 20, 29, 30, 39)],
                               [0.0, 0.5, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25], atol=1e-6)
    cosine = create_learning_rate_schedule(TrainConfig(epochs=2, learning_rate=0.2), steps)
    np.testing.assert_allclose([cosine(0), cosine(10), cosine(20)], [0.2, 0.1, 0.0], atol=1e-6)


# --- TrainState and steps ------------------------------------------------------------------

def test_state_leaves_are_arrays():
    state = _fresh_state()
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert state.step.dtype == jnp.int32 and state.step.shape == ()
    assert set(state.variables) == {"params", "batch_stats"}
    with pytest.raises(ValueError, match="image_shape"):
        create_train_state(_tiny_setup()[0], _tiny_setup()[1], _cheap_key(0), (8, 8))


def test_train_step_jit_matches_eager():
    model, tx, batch = _tiny_setup()
    step = make_train_step(model, tx, crop_padding=1, flip=True)
    key = jax.random.key(3)
    eager_state, eager_metrics = step(_fresh_state(), batch, key)
    jit_state, jit_metrics = jax.jit(step)(_fresh_state(), batch, key)
    chex.assert_trees_all_close(eager_metrics, jit_metrics, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(eager_state, jit_state, atol=1e-5, rtol=1e-5)
    assert int(jit_state.step) == 1


def test_train_step_lowers_loss_and_updates_batch_stats():
    model, tx, batch = _tiny_setup()
    step = jax.jit(make_train_step(model, tx), donate_argnums=0)
    state = _fresh_state()
    initial_stats = jax.tree.map(np.asarray, state.batch_stats)
    key = jax.random.key(0)
    losses = []
    for _ in range(15):
        state, metrics = step(state, batch, key)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 15
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), initial_stats, state.batch_stats)
    assert all(jax.tree.leaves(moved))


def test_eval_step_ignores_zero_weight_rows():
    model, _, batch = _tiny_setup()
    eval_step = jax.jit(make_eval_step(model))
    state = _fresh_state()
    full = eval_step(state, batch)
    padded = {"image": np.concatenate([batch["image"][:20], np.zeros_like(batch["image"][:12])]),
              "label": np.concatenate([batch["label"][:20], np.zeros(12, np.int32)]),
              "weight": np.repeat(np.float32([1, 0]), [20, 12])}
    part = eval_step(state, {k: v[:20] for k, v in batch.items()})
    chex.assert_trees_all_close(eval_step(state, padded), part, atol=1e-6)
    assert 0.0 <= float(full["accuracy"]) <= 1.0


# --- The training loop ---------------------------------------------------------------------

def test_train_backdoored_model_on_digits():
    dataset = _digits()
    attack = create_attack("badnets", target=0, patch_size=3)
    config = TrainConfig(model_kwargs={"features": (8, 16)}, epochs=6, batch_size=64,
                         learning_rate=0.05, poison_rate=0.1, seed=0)
    result = train_backdoored_model(dataset, attack, config, progress=False, eval_every=3)
    assert result.metrics["acc"] > 0.8, result.metrics
    assert result.metrics["asr"] > 0.8, result.metrics
    assert len(result.history) == 6
    assert "acc" in result.history[2] and "acc" not in result.history[3]
    assert result.history[-1]["acc"] == result.metrics["acc"]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # 10% of the 1,347 - 133 non-target training images.
    non_target = int(np.sum(dataset.train.labels != 0))
    assert result.poisoned_indices.size == round(0.1 * non_target)
    assert np.all(dataset.train.labels[result.poisoned_indices] != 0)
    assert set(result.variables) == {"params", "batch_stats"}


def _small_dataset(images: np.ndarray) -> ImageDataset:
    labels = np.arange(len(images), dtype=np.int32) % 10
    split = Split(images.astype(np.float32), labels)
    return ImageDataset("tiny", split, split, tuple(str(i) for i in range(10)))


def test_loop_rejects_bad_inputs(tmp_path):
    dataset = _small_dataset(np.zeros((20, 8, 8, 1)))
    attack = create_attack("badnets", target=0, patch_size=2)
    config = TrainConfig(model_kwargs={"features": (4,)}, epochs=1, batch_size=16)
    with pytest.raises(ValueError, match="batch_size=32 exceeds the 20 training images"):
        train_backdoored_model(dataset, attack, dataclasses.replace(config, batch_size=32))
    with pytest.raises(ValueError, match="target label 12"):
        train_backdoored_model(dataset, create_attack("badnets", target=12, patch_size=2), config)
    with pytest.raises(ValueError, match="eval_every"):
        train_backdoored_model(dataset, attack, config, eval_every=-1)
    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a model"):
        train_backdoored_model(dataset, attack, config, workdir=tmp_path)


def test_loop_raises_on_nan_loss():
    # Split() skips validation, which lets NaN pixels through to make the loss NaN.
    images = np.zeros((20, 8, 8, 1))
    images[3] = np.nan
    config = TrainConfig(model_kwargs={"features": (4,)}, epochs=2, batch_size=16)
    with pytest.raises(FloatingPointError, match="epoch 1/2"):
        train_backdoored_model(_small_dataset(images), create_attack("badnets", target=0,
                                                                     patch_size=2),
                               config, progress=False)
