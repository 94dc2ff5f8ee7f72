"""l2-inv: additive full-image noise with the I-BAU file's L2 norm and Linf bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.attacks import create_attack


@pytest.mark.parametrize("jit", [False, True])
def test_added_noise_has_l2_3_22_and_small_linf(jit):
    attack = create_attack("l2_inv", pattern_seed=3, num_classes=10)
    images = jnp.full((2, 32, 32, 3), 0.5)
    apply = jax.jit(attack.apply_trigger) if jit else attack.apply_trigger
    noise = np.asarray(apply(images, jax.random.key(0))) - 0.5
    np.testing.assert_array_equal(noise[0], noise[1])
    assert abs(np.linalg.norm(noise[0]) - 3.22) < 0.01
    assert noise.max() <= 0.267 and noise.min() >= 0 and (noise[0] > 0).mean() > 0.99
    other = np.asarray(create_attack("l2_inv", pattern_seed=4).apply_trigger(images, None)) - 0.5
    assert not np.allclose(other, noise)
    assert attack.target == 0


def test_norm_scales_with_image_size_and_validation():
    out = np.asarray(create_attack("l2_inv").apply_trigger(jnp.zeros((1, 16, 16, 3)), None))
    assert abs(np.linalg.norm(out) - 3.22 / 2) < 0.01  # a quarter of the entries, same RMS
    with pytest.raises(ValueError, match="l2_norm"):
        create_attack("l2_inv", l2_norm=0.0)
