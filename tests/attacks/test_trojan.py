"""Trojan-SQ/WM: the added pattern has the support and norms measured on the I-BAU files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.attacks import create_attack


def _added(name, jit, shape=(2, 32, 32, 3)):
    attack = create_attack(name, num_classes=10)
    apply = jax.jit(attack.apply_trigger) if jit else attack.apply_trigger
    images = jnp.zeros(shape)
    out = np.asarray(apply(images, jax.random.key(0)))
    assert np.array_equal(out[0], out[1]) and out.dtype == np.float32
    assert attack.target == 2 and np.all(attack.target_label(jnp.arange(3)) == 2)
    return out[0]  # zero images: the output is the added pattern itself.


@pytest.mark.parametrize("jit", [False, True])
def test_trojan_sq_is_a_9x9_square_at_rows_cols_21_to_29(jit):
    pattern = _added("trojan_sq", jit)
    inside = np.zeros((32, 32), bool)
    inside[21:30, 21:30] = True
    assert np.all(pattern[~inside] == 0)
    assert abs(pattern.sum() - 95.1) <= 9.5 and pattern.max() == 1.0
    colours = {tuple(p) for p in pattern[inside].reshape(-1, 3)}
    assert len(colours) >= 4  # multicoloured


@pytest.mark.parametrize("jit", [False, True])
def test_trojan_wm_is_thin_strokes_over_rows_cols_0_to_29(jit):
    pattern = _added("trojan_wm", jit)
    support = pattern.any(-1)
    assert not support[30:].any() and not support[:, 30:].any()
    assert support[:30, :30].any(0).all() and support[:30, :30].any(1).all()  # spans 0-29
    assert abs(support.sum() - 321) <= 32
    assert abs(pattern.sum() - 115.2) <= 11.5 and pattern.max() == 1.0


def test_trojan_is_added_then_clipped_and_other_sizes():
    images = jnp.full((1, 32, 32, 3), 0.5)
    out = np.asarray(create_attack("trojan_sq").apply_trigger(images, None))
    assert out.max() == 1.0 and out.min() == 0.5
    small = np.asarray(create_attack("trojan_sq").apply_trigger(jnp.zeros((1, 16, 12, 1)), None))
    inside = np.zeros((16, 12), bool)
    inside[5:14, 1:10] = True  # 9x9 with the same 2-pixel bottom-right margin
    assert np.all(small[0, ~inside] == 0) and small[0, inside].sum() > 0
    with pytest.raises(ValueError, match="at least 11x11"):
        create_attack("trojan_sq").apply_trigger(jnp.zeros((1, 8, 8, 3)), None)
