"""l0-inv: only the last 9 pixels of the bottom row change, exactly to the trigger values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.attacks import create_attack
from awm_jax.attacks.l0_inv import l0_mask_and_trigger


@pytest.mark.parametrize("jit", [False, True])
def test_only_masked_pixels_change_exactly_to_the_trigger(jit):
    attack = create_attack("l0_inv", num_classes=10)
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=0.1, maxval=0.9)
    apply = jax.jit(attack.apply_trigger) if jit else attack.apply_trigger
    out = np.asarray(apply(images, jax.random.key(1)))
    mask, trigger = l0_mask_and_trigger((32, 32, 3))
    masked = np.zeros((32, 32, 3), bool)
    masked[31, 23:32] = True  # bottom row, cols 23-31, all channels (awm-paper.md 2.3)
    np.testing.assert_array_equal(mask == 1, masked)
    np.testing.assert_array_equal(out[:, ~masked], np.asarray(images)[:, ~masked])
    np.testing.assert_array_equal(out[:, masked], np.broadcast_to(trigger[masked], (2, 27)))
    row = trigger[31, 23:32]
    assert np.all(row[0] == 0) and np.all(row[1:].any(-1))  # col 23 black, 8 coloured
    assert set(np.unique(row)) <= {0.0, 1.0} and row.sum() == 16
    assert attack.target == 0


def test_narrow_images_are_rejected():
    with pytest.raises(ValueError, match="at least 9 pixels wide"):
        create_attack("l0_inv").apply_trigger(jnp.zeros((1, 8, 8, 3)), None)
