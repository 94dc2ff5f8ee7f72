"""All-to-all: labels go to (y + 1) mod K with the base attack's trigger."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.attacks import create_attack, poison_training_set, triggered_test_set
from awm_jax.data.dataset import Split


@pytest.mark.parametrize("jit", [False, True])
def test_labels_shift_by_one_with_the_wrap_and_trigger_is_the_base(jit):
    attack = create_attack("all_to_all", num_classes=4, base="badnets", patch_size=2)
    target_label = jax.jit(attack.target_label) if jit else attack.target_label
    np.testing.assert_array_equal(np.asarray(target_label(jnp.arange(4))), [1, 2, 3, 0])
    images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3))
    base = create_attack("badnets", patch_size=2)
    apply = jax.jit(attack.apply_trigger) if jit else attack.apply_trigger
    np.testing.assert_array_equal(np.asarray(apply(images, None)),
                                  np.asarray(base.apply_trigger(images, None)))
    assert attack.target is None and not attack.clean_label


def test_poisoning_and_test_set_cover_every_class():
    rng = np.random.default_rng(0)
    split = Split(rng.uniform(0, 1, (16, 12, 12, 3)).astype(np.float32),
                  (np.arange(16) % 4).astype(np.int32))
    attack = create_attack("all_to_all", num_classes=4)  # the AWM a2a: Trojan-SQ trigger
    assert attack.params["base"] == "trojan_sq"
    test = triggered_test_set(split, attack, jax.random.key(0))
    assert test.non_target.all()
    np.testing.assert_array_equal(test.target_labels, (split.labels + 1) % 4)
    poisoned = poison_training_set(split, attack, jax.random.key(1), rate=1.0)
    np.testing.assert_array_equal(poisoned.split.labels, (split.labels + 1) % 4)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        create_attack("all_to_all", num_classes=1)
    with pytest.raises(ValueError, match="clean-label"):
        create_attack("all_to_all", num_classes=4, base="sig")
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        create_attack("all_to_all", num_classes=4, base="nope")
