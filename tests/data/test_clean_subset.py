"""The defender's clean draw: seeded, disjoint from evaluation, k per class, one-shot views."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.data.augment import random_crop_flip, random_resized_crop
from awm_jax.data.clean_subset import (
    CleanDataConfig,
    clean_data_config,
    draw_clean_subset,
)
from awm_jax.data.dataset import Split
from awm_jax.data.digits import load_digits


def _pool(count=60, classes=3):
    images = np.linspace(0, 1, count * 16, dtype=np.float32).reshape(count, 4, 4, 1)
    return Split(images, (np.arange(count) % classes).astype(np.int32))


def test_draw_is_seeded_and_disjoint_from_the_rest():
    pool = _pool()
    clean, rest = draw_clean_subset(pool, 3, jax.random.key(0), CleanDataConfig(n_clean=10))
    again, _ = draw_clean_subset(pool, 3, jax.random.key(0), CleanDataConfig(n_clean=10))
    other, _ = draw_clean_subset(pool, 3, jax.random.key(1), CleanDataConfig(n_clean=10))
    assert len(clean) == 10 and len(rest) == 50
    np.testing.assert_array_equal(clean.images, again.images)
    assert not np.array_equal(clean.images, other.images)
    drawn = {img.tobytes() for img in clean.images}
    assert not drawn & {img.tobytes() for img in rest.images}


def test_per_class_and_one_shot_views():
    pool = _pool()
    clean, _ = draw_clean_subset(pool, 3, jax.random.key(0), CleanDataConfig(n_clean=None,
                                                                              per_class=2))
    np.testing.assert_array_equal(np.bincount(clean.labels), [2, 2, 2])
    config = CleanDataConfig.one_shot(crop_scale=(0.5, 1.0), flip=False)
    shot, rest = draw_clean_subset(pool, 3, jax.random.key(0), config)
    assert len(shot) == 3 * 10 and len(rest) == 57
    np.testing.assert_array_equal(np.bincount(shot.labels), [10, 10, 10])
    np.testing.assert_array_equal(shot.labels[3:6], shot.labels[:3])  # views follow originals
    assert shot.images.min() >= 0 and shot.images.max() <= 1


def test_draw_errors_name_the_problem():
    pool = _pool(6)
    with pytest.raises(ValueError, match="n_clean=10 is larger than the pool of 6"):
        draw_clean_subset(pool, 3, jax.random.key(0), CleanDataConfig(n_clean=10))
    with pytest.raises(ValueError, match="class 3 has 0 image"):
        draw_clean_subset(pool, 4, jax.random.key(0), CleanDataConfig(n_clean=None, per_class=1))
    with pytest.raises(ValueError, match="per_class must be >= 1"):
        CleanDataConfig(per_class=0)


@pytest.mark.parametrize("jit", [False, True])
def test_random_resized_crop_full_box_is_identity_and_flip_mirrors(jit):
    images = jax.random.uniform(jax.random.key(0), (3, 8, 8, 2))
    crop = jax.jit(random_resized_crop, static_argnums=(2, 3, 4)) if jit else random_resized_crop
    same = crop(images, jax.random.key(1), (1.0, 1.0), (1.0, 1.0), False)
    np.testing.assert_allclose(same, images, atol=1e-5)
    views = crop(images, jax.random.key(2), (0.3, 0.6), (0.75, 1.33), True)
    assert views.shape == images.shape and float(views.min()) >= 0 and float(views.max()) <= 1
    with pytest.raises(ValueError, match="crop scale"):
        random_resized_crop(images, jax.random.key(0), (0.0, 1.0))


def test_random_crop_flip_shifts_content():
    image = jnp.zeros((1, 6, 6, 1)).at[0, 2, 2, 0].set(1.0)
    out = random_crop_flip(jnp.repeat(image, 16, 0), jax.random.key(0), padding=1, flip=False)
    positions = {tuple(np.argwhere(np.asarray(o)[..., 0] == 1.0)[0]) for o in out}
    assert positions <= {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)} and len(positions) > 1


def test_digits_ship_offline_with_the_batch_contract():
    data = load_digits()
    assert data.image_shape == (16, 16, 1) and len(data.train) == 1347 and len(data.test) == 450
    assert data.train.images.dtype == np.float32 and data.train.labels.dtype == np.int32
    assert 0.0 <= data.train.images.min() and data.train.images.max() <= 1.0
    assert data.num_classes == 10 and data.class_counts("test").sum() == 450


def test_clean_data_config_follows_the_cli_flags_precedence():
    assert clean_data_config() == CleanDataConfig()
    assert clean_data_config(n_clean=100, per_class=2) == CleanDataConfig(n_clean=None,
                                                                          per_class=2)
    assert clean_data_config(n_clean=100, per_class=2, one_shot=True) == CleanDataConfig.one_shot()
    assert clean_data_config(one_shot=True, augment_views=0, flip=False) == CleanDataConfig(
        n_clean=None, per_class=1, augment_views=0, flip=False)
