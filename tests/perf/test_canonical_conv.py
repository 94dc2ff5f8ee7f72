"""The canonical-VJP conv equals lax's conv in values and gradients, and keeps scans canonical."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from awm_jax.perf import canonical_conv_general_dilated as cconv

DIMS = ("NHWC", "HWIO", "NHWC")


def _inputs(kernel, cin=3, cout=5, size=7, batch=2):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, cin)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(*kernel, cin, cout)).astype(np.float32))
    return x, w


@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3), (1, 1), ((1, 1), (1, 1))), ((3, 3), (1, 1), "SAME"), ((3, 3), (1, 1), "VALID"),
    ((1, 1), (1, 1), ((0, 0), (0, 0))), ((3, 2), (1, 1), ((0, 2), (1, 0))),
    ((3, 3), (2, 2), ((1, 1), (1, 1))),  # falls through to lax
])
def test_values_and_gradients_equal_lax(kernel, strides, padding):
    x, w = _inputs(kernel)
    ours = lambda a, b: cconv(a, b, strides, padding, dimension_numbers=DIMS)
    ref = lambda a, b: lax.conv_general_dilated(a, b, strides, padding, dimension_numbers=DIMS)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    g = jnp.asarray(np.random.default_rng(1).normal(size=ref(x, w).shape).astype(np.float32))
    for got, want in zip(jax.vjp(ours, x, w)[1](g), jax.vjp(ref, x, w)[1](g)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    check_grads(ours, (x, w), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_flax_conv_opt_in_equals_default():
    x, _ = _inputs((3, 3))
    plain = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
    opted = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    conv_general_dilated=cconv)
    variables = plain.init(jax.random.key(0), x)
    loss = lambda module: lambda v: jnp.sum(module.apply(v, x) ** 2)
    np.testing.assert_allclose(opted.apply(variables, x), plain.apply(variables, x), rtol=1e-6)
    got, want = jax.grad(loss(opted))(variables), jax.grad(loss(plain))(variables)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                           got, want)


def test_backward_convs_stay_canonical_inside_scan():
    x, w = _inputs((3, 3), cin=4, cout=4)

    def step(w, _):
        grad = jax.grad(lambda v: jnp.sum(cconv(x, v, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=DIMS) ** 2))(w)
        return w - 1e-3 * grad, None

    hlo = jax.jit(lambda v: lax.scan(step, v, None, length=3)[0]).lower(w).compile().as_text()
    labels = set(re.findall(r"dim_labels=([a-z0-9_>-]+)", hlo))
    assert labels == {"b01f_01io->b01f"}, labels
