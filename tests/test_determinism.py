"""Same seed and config give bit-identical results; another seed gives different ones.

Covers every place randomness enters a run: poisoning, the defender's clean draw (with its
augmented views), the augmentations, backdoor training and AWM. Inputs are tiny.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.attacks.base import create_attack, poison_training_set
from awm_jax.data.augment import random_crop_flip, random_resized_crop
from awm_jax.data.clean_subset import CleanDataConfig, draw_clean_subset
from awm_jax.data.dataset import ImageDataset, Split
from awm_jax.data.sources import load_dataset
from awm_jax.defenses import purify
from awm_jax.defenses.awm.config import AWMConfig
from awm_jax.models import create_model
from awm_jax.training.config import TrainConfig
from awm_jax.training.loop import train_backdoored_model


def _differs(a, b) -> bool:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    return any(not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(leaves_a, leaves_b))


@pytest.fixture(scope="module")
def tiny():
    """digits at 8x8: 160 training and 60 test images."""
    digits = load_dataset("digits8")
    return ImageDataset("digits8-tiny", digits.train.subset(np.arange(160)),
                        digits.test.subset(np.arange(60)), digits.class_names)


def _poison(split, seed):
    attack = create_attack("badnets", target=0, patch_size=2)
    poisoned = poison_training_set(split, attack, jax.random.key(seed), rate=0.2)
    return poisoned.split.images, poisoned.split.labels, poisoned.poisoned


def test_poisoning(tiny):
    first, again, other = (_poison(tiny.train, seed) for seed in (0, 0, 1))
    chex.assert_trees_all_equal(first, again)
    assert not np.array_equal(first[2], other[2])


def _draw(split, seed):
    clean, rest = draw_clean_subset(split, 10, jax.random.key(seed),
                                    CleanDataConfig.one_shot(augment_views=1))
    return clean.images, clean.labels, rest.labels


def test_clean_subset_draw_and_views(tiny):
    first, again, other = (_draw(tiny.test, seed) for seed in (0, 0, 1))
    chex.assert_trees_all_equal(first, again)
    assert _differs(first[0], other[0])


@pytest.mark.parametrize("augment", [
    lambda x, key: random_crop_flip(x, key, padding=2),
    lambda x, key: random_resized_crop(x, key),
], ids=["crop_flip", "resized_crop"])
def test_augmentation(tiny, augment):
    images, augment = jnp.asarray(tiny.test.images[:8]), jax.jit(augment)
    first, again, other = (augment(images, jax.random.key(seed)) for seed in (3, 3, 4))
    chex.assert_trees_all_equal(first, again)
    assert _differs(first, other)


def _train(dataset, seed):
    config = TrainConfig(model_kwargs={"features": (4,)}, epochs=1, batch_size=40, seed=seed,
                         crop_padding=1, eval_batch_size=60)
    result = train_backdoored_model(dataset, create_attack("badnets", target=0, patch_size=2),
                                    config, progress=False)
    return result.variables, result.metrics, np.asarray(result.poisoned_indices)


@pytest.fixture(scope="module")
def trained(tiny):
    """Three training runs: seed 0, seed 0 again, seed 1."""
    return [_train(tiny, seed) for seed in (0, 0, 1)]


def test_training(trained):
    first, again, other = trained
    chex.assert_trees_all_equal(first, again)
    assert _differs(first[0], other[0])


def test_awm(tiny, trained):
    variables = trained[0][0]
    model = create_model("small_cnn", tiny.num_classes, features=(4,))
    clean = Split(tiny.test.images[:20], tiny.test.labels[:20])
    config = dataclasses.replace(AWMConfig(), outer_epochs=2, inner_passes=1, batch_size=10,
                                 tau=10.0)

    def run(seed):
        result = purify("awm", model, variables, clean, jax.random.key(seed), config,
                        num_classes=tiny.num_classes, progress=False)
        return result.variables, [{k: v for k, v in record.items() if "seconds" not in k}
                                  for record in result.history]

    first, again, other = run(0), run(0), run(1)
    chex.assert_trees_all_equal(first, again)
    assert _differs(first[0], other[0])
