"""BadNets: the patch lands where configured; poisoning relabels only non-target images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.attacks import create_attack, poison_training_set, triggered_test_set
from awm_jax.attacks.badnets import patch_slices
from awm_jax.data.dataset import Split


@pytest.mark.parametrize("jit", [False, True])
def test_patch_lands_one_pixel_in_from_bottom_right_like_the_official_code(jit):
    attack = create_attack("badnets", target=8, patch_size=4, row=-2, col=-2)
    images = jnp.zeros((2, 32, 32, 3))
    apply = jax.jit(attack.apply_trigger) if jit else attack.apply_trigger
    out = np.asarray(apply(images, jax.random.key(0)))
    expected = np.zeros((32, 32, 3), bool)
    expected[27:31, 27:31, :] = True  # rows/cols 27-30, as in awm-paper.md 2.3
    assert np.array_equal(out[0] == 1.0, expected) and np.array_equal(out[1] == 1.0, expected)
    assert out.shape == images.shape and out.dtype == np.float32


def test_patch_position_value_and_bounds():
    attack = create_attack("badnets", target=0, patch_size=2, row=1, col=3, value=0.5)
    out = np.asarray(attack.apply_trigger(jnp.ones((1, 8, 8, 1)), None))
    assert np.all(out[0, 1:3, 3:5] == 0.5) and (out == 0.5).sum() == 4
    with pytest.raises(ValueError, match="does not fit"):
        patch_slices((8, 8), 4, 6, 0)
    with pytest.raises(ValueError, match="patch value"):
        create_attack("badnets", value=2.0)
    with pytest.raises(ValueError, match="target label 12 out of range"):
        create_attack("badnets", target=12, num_classes=10)
    with pytest.raises(ValueError, match="unknown attack .nope.; known: .*badnets"):
        create_attack("nope")


def _split(count=200, classes=4):
    rng = np.random.default_rng(0)
    return Split(rng.uniform(0, 0.5, (count, 8, 8, 1)).astype(np.float32),
                 (np.arange(count) % classes).astype(np.int32))


def test_poisoning_relabels_only_non_target_images_at_the_rate():
    split = _split()
    attack = create_attack("badnets", target=1, patch_size=2)
    poisoned = poison_training_set(split, attack, jax.random.key(1), rate=0.2)
    non_target = split.labels != 1
    assert poisoned.poisoned.sum() == round(0.2 * non_target.sum())
    assert not np.any(poisoned.poisoned & ~non_target)  # target-class images untouched
    assert np.all(poisoned.split.labels[poisoned.poisoned] == 1)
    np.testing.assert_array_equal(poisoned.split.labels[~poisoned.poisoned],
                                  split.labels[~poisoned.poisoned])
    np.testing.assert_array_equal(poisoned.split.images[~poisoned.poisoned],
                                  split.images[~poisoned.poisoned])
    assert np.all(poisoned.split.images[poisoned.poisoned][:, -3:-1, -3:-1] == 1.0)
    np.testing.assert_array_equal(poisoned.true_labels, split.labels)
    # Seeded: the same key picks the same images, another key others.
    again = poison_training_set(split, attack, jax.random.key(1), rate=0.2)
    other = poison_training_set(split, attack, jax.random.key(2), rate=0.2)
    np.testing.assert_array_equal(again.poisoned, poisoned.poisoned)
    assert not np.array_equal(other.poisoned, poisoned.poisoned)
    with pytest.raises(ValueError, match="poison rate"):
        poison_training_set(split, attack, jax.random.key(1), rate=0.0)


def test_triggered_test_set_flags_non_target_images():
    split = _split(40)
    attack = create_attack("badnets", target=2, patch_size=2)
    test = triggered_test_set(split, attack, jax.random.key(0))
    np.testing.assert_array_equal(test.non_target, split.labels != 2)
    assert np.all(test.target_labels == 2)
    assert np.all(test.images[:, -3:-1, -3:-1] == 1.0)
