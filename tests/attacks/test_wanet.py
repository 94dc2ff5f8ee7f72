"""WaNet: a fixed, small, smooth warp; identity at strength 0; noise mode keeps it small."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.attacks import create_attack
from awm_jax.attacks.wanet import (bilinear_sample, wanet_noise, warp_coordinates,
                                   warp_noise)

H, W = 24, 20


def _ramps():
    rows, cols = np.meshgrid(np.arange(H) / (H - 1), np.arange(W) / (W - 1), indexing="ij")
    return jnp.asarray(np.stack([rows, cols], -1)[None], jnp.float32)  # [1, H, W, 2]


@pytest.mark.parametrize("jit", [False, True])
def test_strength_zero_is_the_identity(jit):
    attack = create_attack("wanet", strength=0.0, num_classes=10)
    images = jax.random.uniform(jax.random.key(0), (2, H, W, 3))
    apply = jax.jit(attack.apply_trigger) if jit else attack.apply_trigger
    np.testing.assert_array_equal(np.asarray(apply(images, None)), np.asarray(images))


@pytest.mark.parametrize("jit", [False, True])
def test_warp_moves_pixels_by_at_most_about_strength(jit):
    strength = 0.5
    attack = create_attack("wanet", strength=strength, pattern_seed=3)
    apply = jax.jit(attack.apply_trigger) if jit else attack.apply_trigger
    images = _ramps()
    out = np.asarray(apply(images, None))
    # Bilinear sampling of a linear ramp returns the sampling position: the displacement itself.
    moved = (out - np.asarray(images)) * np.array([H - 1, W - 1])
    assert 0.05 < np.abs(moved).max() <= strength * 1.25
    interior = moved[0, 1:-1, 1:-1]  # the border is clamped to the image, as in grid_sample
    assert np.abs(np.diff(interior, axis=0)).max() < 0.25
    assert np.abs(np.diff(interior, axis=1)).max() < 0.25
    coords = warp_coordinates((H, W), warp_noise((H, W), 3), strength)
    np.testing.assert_allclose(out[0], np.asarray(coords) / np.array([H - 1, W - 1]), atol=1e-5)


def test_same_seed_same_field_and_gradients_flow():
    np.testing.assert_array_equal(np.asarray(warp_noise((H, W), 1)), np.asarray(warp_noise((H, W), 1)))
    assert not np.allclose(np.asarray(warp_noise((H, W), 1)), np.asarray(warp_noise((H, W), 2)))
    coords = warp_coordinates((H, W), warp_noise((H, W), 1), 0.5)[None]
    grad = jax.grad(lambda x: bilinear_sample(x, coords).sum())(jnp.ones((1, H, W, 1)))
    np.testing.assert_allclose(float(grad.sum()), H * W, rtol=1e-5)  # weights sum to one


def test_noise_mode_is_random_per_key_and_stays_near_the_warp():
    attack = create_attack("wanet", pattern_seed=3)
    images = jnp.tile(_ramps(), (2, 1, 1, 1))
    warped = np.asarray(jax.jit(attack.apply_trigger)(images, None))
    field = {k: attack.params[k] for k in ("pattern_seed", "k", "strength", "grid_rescale")}
    noise_fn = jax.jit(lambda x, key: wanet_noise(x, key, **field))
    noisy, again, other = (np.asarray(noise_fn(images, jax.random.key(seed))) for seed in (0, 0, 1))
    np.testing.assert_allclose(noisy, again, atol=1e-6)
    assert not np.allclose(noisy, other) and not np.allclose(noisy[0], noisy[1])
    extra = np.abs(noisy - warped) * np.array([H - 1, W - 1])
    assert 0 < extra.max() <= 0.5 + 1e-4  # the grid noise moves pixels by at most half a pixel
    with pytest.raises(ValueError, match="strength"):
        create_attack("wanet", strength=-1.0)
