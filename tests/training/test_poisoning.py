"""The victim's training set: CLB needs a clean model, WaNet adds noise-mode cross images."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.attacks import create_attack
from awm_jax.data.dataset import Split
from awm_jax.data.digits import load_digits
from awm_jax.training import train_backdoored_model
from awm_jax.training.poisoning import make_training_set
from tests.training.train_resume_child import CONFIG


def _split(count=200, size=12, seed=0) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.2, 0.8, (count, size, size, 3)).astype(np.float32)
    return Split(images, (np.arange(count) % 10).astype(np.int32))


def test_no_attack_leaves_the_split_alone():
    split = _split()
    result = make_training_set(split, None, jax.random.key(0), 0.1)
    assert not result.poisoned.any()
    np.testing.assert_array_equal(result.split.images, split.images)


def test_clb_needs_a_clean_model():
    with pytest.raises(ValueError, match="clean model: pass clean_logits_fn"):
        make_training_set(_split(), create_attack("clb", target=0), jax.random.key(0), 0.5)


def test_clb_poison_is_adversarial_inside_the_budget():
    split = _split()
    attack = create_attack("clb", target=0, patch_size=2)
    weights = jax.random.normal(jax.random.key(1), (12 * 12 * 3, 10))

    def logits_fn(images):
        return images.reshape(images.shape[0], -1) @ weights

    result = make_training_set(split, attack, jax.random.key(0), 0.5, clean_logits_fn=logits_fn)
    chosen = np.flatnonzero(result.poisoned)
    assert chosen.size == 10 and (split.labels[chosen] == 0).all()  # clean label: target class
    np.testing.assert_array_equal(result.split.labels, split.labels)
    # Away from the corner patches, the change is the PGD perturbation: nonzero, within eps.
    inner = (result.split.images[chosen] - split.images[chosen])[:, 2:-2, 2:-2]
    assert np.abs(inner).max() <= attack.params["eps"] + 1e-6
    assert np.abs(inner).mean() > attack.params["eps"] / 4
    # ... and it raises the clean model's loss on the target label.
    before = -jax.nn.log_softmax(logits_fn(jnp.asarray(split.images[chosen])))[:, 0].mean()
    after = -jax.nn.log_softmax(logits_fn(jnp.asarray(result.split.images[chosen])))[:, 0].mean()
    assert after > before


def test_wanet_noise_mode_adds_cross_images_with_true_labels():
    split = _split()
    attack = create_attack("wanet", target=0, strength=2.0)
    plain = make_training_set(split, attack, jax.random.key(0), 0.1, cross_ratio=0)
    noisy = make_training_set(split, attack, jax.random.key(0), 0.1, cross_ratio=2.0)
    np.testing.assert_array_equal(plain.poisoned, noisy.poisoned)
    np.testing.assert_array_equal(plain.split.labels, noisy.split.labels)
    poisoned = int(plain.poisoned.sum())
    changed = np.flatnonzero((noisy.split.images != plain.split.images).any(axis=(1, 2, 3)))
    assert changed.size == 2 * poisoned
    assert not noisy.poisoned[changed].any()
    np.testing.assert_array_equal(noisy.split.labels[changed], split.labels[changed])
    # A cross image is the warp plus noise: close to, but not equal to, the plain warp.
    warped = np.asarray(attack.apply_trigger(jnp.asarray(split.images[changed]), None))
    difference = np.abs(noisy.split.images[changed] - warped)
    assert 0 < difference.mean() < np.abs(split.images[changed] - warped).mean() * 2


def test_wanet_cross_images_need_room():
    with pytest.raises(ValueError, match="WaNet noise mode needs .* unpoisoned images"):
        make_training_set(_split(), create_attack("wanet", target=0), jax.random.key(0), 0.5,
                          cross_ratio=2.0)


def test_a_clean_model_reports_accuracy_only():
    config = dataclasses.replace(CONFIG, epochs=1)
    result = train_backdoored_model(load_digits(8), None, config, progress=False)
    assert set(result.metrics) == {"acc"} and result.poisoned_indices.size == 0
    assert result.metrics["acc"] > 0.5
