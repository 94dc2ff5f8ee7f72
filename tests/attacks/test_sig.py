"""SIG: a horizontal sinusoid, and clean-label poisoning of target-class images only."""

import jax
import numpy as np
import pytest

from awm_jax.attacks import create_attack, poison_training_set
from awm_jax.data.dataset import Split


@pytest.mark.parametrize("jit", [False, True])
def test_signal_is_a_horizontal_sinusoid_constant_along_columns(jit):
    attack = create_attack("sig", target=1, num_classes=4)
    images = jax.random.uniform(jax.random.key(0), (2, 6, 12, 3), minval=0.2, maxval=0.8)
    apply = jax.jit(attack.apply_trigger) if jit else attack.apply_trigger
    signal = np.asarray(apply(images, jax.random.key(1))) - np.asarray(images)
    expected = 20 / 255 * np.sin(2 * np.pi * np.arange(12) * 6 / 12)
    np.testing.assert_allclose(signal, np.broadcast_to(expected[None, None, :, None], signal.shape),
                               atol=1e-6)
    assert attack.clean_label and attack.target == 1


def test_poisoning_touches_only_target_images_and_keeps_labels():
    rng = np.random.default_rng(0)
    split = Split(rng.uniform(0.2, 0.8, (40, 4, 8, 1)).astype(np.float32),
                  (np.arange(40) % 4).astype(np.int32))
    attack = create_attack("sig", target=2, frequency=2.0)
    poisoned = poison_training_set(split, attack, jax.random.key(0), rate=0.5)
    assert poisoned.poisoned.sum() == 5 and np.all(split.labels[poisoned.poisoned] == 2)
    np.testing.assert_array_equal(poisoned.split.labels, split.labels)
    changed = np.any(poisoned.split.images != split.images, axis=(1, 2, 3))
    np.testing.assert_array_equal(changed, poisoned.poisoned)
    with pytest.raises(ValueError, match="delta"):
        create_attack("sig", delta=0.0)
