"""Blend: the output is exactly the convex combination of the image and a seeded noise pattern."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.attacks import create_attack
from awm_jax.attacks.blend import blend_pattern


@pytest.mark.parametrize("jit", [False, True])
def test_output_is_the_convex_combination_with_the_seeded_pattern(jit):
    attack = create_attack("blend", target=3, alpha=0.2, pattern_seed=7, num_classes=10)
    images = jax.random.uniform(jax.random.key(0), (2, 8, 6, 3))
    apply = jax.jit(attack.apply_trigger) if jit else attack.apply_trigger
    out = np.asarray(apply(images, jax.random.key(1)))
    pattern = np.asarray(blend_pattern((8, 6, 3), 7))
    assert pattern.min() >= 0 and pattern.max() <= 1 and pattern.std() > 0.2  # uniform noise
    np.testing.assert_allclose(out, 0.8 * np.asarray(images) + 0.2 * pattern, atol=1e-6)
    assert out.dtype == np.float32 and np.all(attack.target_label(jnp.arange(4)) == 3)
    # Same seed, same pattern; another seed, another.
    np.testing.assert_array_equal(pattern, np.asarray(blend_pattern((8, 6, 3), 7)))
    assert not np.allclose(pattern, np.asarray(blend_pattern((8, 6, 3), 8)))


def test_given_pattern_and_validation():
    pattern = np.full((4, 4, 1), 0.5, np.float32)
    attack = create_attack("blend", alpha=0.5, pattern=pattern)
    out = np.asarray(attack.apply_trigger(jnp.ones((1, 4, 4, 1)), None))
    np.testing.assert_allclose(out, 0.75)
    with pytest.raises(ValueError, match="pattern shape"):
        attack.apply_trigger(jnp.ones((1, 5, 4, 1)), None)
    with pytest.raises(ValueError, match="alpha"):
        create_attack("blend", alpha=1.5)
    with pytest.raises(ValueError, match="pattern must be"):
        create_attack("blend", pattern=np.full((4, 4, 1), 2.0))
    with pytest.raises(ValueError, match="target label 10 out of range"):
        create_attack("blend", target=10, num_classes=10)
