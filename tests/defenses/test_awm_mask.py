"""Masks: which leaves, application, clipping, L1, statistics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.defenses.awm import mask as mask_lib
from awm_jax.models import create_model, init_variables


@pytest.fixture(scope="module")
def params():
    model = create_model("small_cnn", 3, features=(4, 6))
    return init_variables(model, jax.random.key(0), (8, 8, 1))["params"]


def _masked_paths(mask):
    leaves = jax.tree_util.tree_flatten_with_path(mask)[0]
    return sorted(tuple(getattr(e, "key", e) for e in path) for path, _ in leaves)


def test_default_scope_masks_only_conv_kernels(params):
    mask = mask_lib.create_mask(params)
    assert _masked_paths(mask) == [("Conv_0", "kernel"), ("Conv_1", "kernel")]
    chex.assert_trees_all_equal_shapes(
        mask["Conv_0"]["kernel"], params["Conv_0"]["kernel"])
    assert mask["Dense_0"]["kernel"] is None and mask["Dense_0"]["bias"] is None
    assert mask_lib.mask_size(mask) == 1 * 9 * 4 + 4 * 9 * 6


def test_conv_dense_scope_adds_dense_kernel(params):
    mask = mask_lib.create_mask(params, "conv_dense")
    assert ("Dense_0", "kernel") in _masked_paths(mask)
    assert ("Dense_0", "bias") not in _masked_paths(mask)


def test_unknown_scope_and_empty_selection_raise(params):
    with pytest.raises(ValueError, match="unknown mask scope 'bn'"):
        mask_lib.create_mask(params, "bn")
    with pytest.raises(ValueError, match="selects no parameter"):
        mask_lib.create_mask(params, lambda path, leaf: False)


@pytest.mark.parametrize("jit", [False, True])
def test_apply_mask_multiplies_clipped_mask(params, jit):
    mask = mask_lib.create_mask(params)
    mask["Conv_0"]["kernel"] = jnp.full_like(mask["Conv_0"]["kernel"], 1.5)
    mask["Conv_1"]["kernel"] = jnp.full_like(mask["Conv_1"]["kernel"], -0.5).at[0, 0, 0, 0].set(0.25)
    masked = (jax.jit(mask_lib.apply_mask) if jit else mask_lib.apply_mask)(params, mask)
    chex.assert_trees_all_close(masked["Conv_0"]["kernel"], params["Conv_0"]["kernel"])
    expected = np.zeros_like(params["Conv_1"]["kernel"])
    expected[0, 0, 0, 0] = 0.25 * params["Conv_1"]["kernel"][0, 0, 0, 0]
    np.testing.assert_allclose(masked["Conv_1"]["kernel"], expected, rtol=1e-6)
    chex.assert_trees_all_equal(masked["Dense_0"], params["Dense_0"])
    chex.assert_trees_all_equal(mask_lib.fold_mask(params, mask), masked)


def test_clip_and_l1_and_statistics(params):
    mask = mask_lib.create_mask(params)
    mask["Conv_0"]["kernel"] = jnp.linspace(-1.0, 2.0, 36).reshape(3, 3, 1, 4)
    clipped = mask_lib.clip_mask(mask)
    values = np.concatenate([np.ravel(m) for m in jax.tree_util.tree_leaves(clipped)])
    assert values.min() >= 0.0 and values.max() <= 1.0
    expected_l1 = np.abs(np.linspace(-1.0, 2.0, 36)).sum() + 4 * 9 * 6
    np.testing.assert_allclose(mask_lib.mask_l1(mask), expected_l1, rtol=1e-5)
    stats = mask_lib.mask_statistics(clipped)
    assert stats["size"] == 36 + 216
    np.testing.assert_allclose(stats["frac_below_0.5"], np.mean(
        np.clip(np.linspace(-1.0, 2.0, 36), 0, 1) < 0.5) * 36 / 252)
