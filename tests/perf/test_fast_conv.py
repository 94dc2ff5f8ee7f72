"""The fast conv equals lax's conv in values and gradients; models switch to it without new
variables; AWM and training accept it."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from awm_jax.defenses.awm import AWMConfig, Frozen, make_awm_steps
from awm_jax.models import create_model, init_variables
from awm_jax.perf import (CONV_IMPLS, conv_general_dilated_for, fast_conv_general_dilated,
                          input_grad_method, phase_input_grad, weight_grad_method,
                          with_conv_impl)
from awm_jax.perf.fast_conv import tap_weight_grad
from awm_jax.training.config import TrainConfig

DIMS = ("NHWC", "HWIO", "NHWC")


def _inputs(kernel, cin, cout, size, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, size, size, cin)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(*kernel, cin, cout)).astype(np.float32))
    return x, w


def _pair(strides, padding):
    ours = lambda a, b: fast_conv_general_dilated(a, b, strides, padding, dimension_numbers=DIMS)
    ref = lambda a, b: lax.conv_general_dilated(a, b, strides, padding, dimension_numbers=DIMS)
    return ours, ref


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kernel,strides,padding,cin,cout,size", [
    ((3, 3), (1, 1), "SAME", 3, 5, 8),               # lax (stride 1, small)
    ((3, 3), (2, 2), "SAME", 4, 6, 9),               # taps, stride 2, odd size
    ((3, 3), (2, 2), ((1, 1), (1, 1)), 8, 16, 8),    # taps, ResNet's explicit padding
    ((1, 1), (2, 2), "VALID", 8, 16, 8),             # taps, 1x1 shortcut
    ((3, 3), (1, 1), ((1, 1), (1, 1)), 8, 8, 16),    # lax: stride 1
    ((3, 3), (2, 2), "SAME", 4, 4, 32),              # lax: stride 2 onto 16x16
    ((3, 3), (1, 1), "VALID", 16, 16, 34),           # lax: stride 1, 32x32 output
    ((3, 2), (1, 1), ((0, 2), (1, 0)), 3, 5, 7),     # asymmetric kernel and padding
    ((3, 3), (2, 2), ((-1, 1), (0, 2)), 3, 5, 9),    # negative padding: lax's input gradient
])
def test_values_and_gradients_equal_lax(jit, kernel, strides, padding, cin, cout, size):
    x, w = _inputs(kernel, cin, cout, size)
    ours, ref = _pair(strides, padding)
    if jit:
        ours, ref = jax.jit(ours), jax.jit(ref)
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    g = jnp.asarray(np.random.default_rng(1).normal(size=ref(x, w).shape).astype(np.float32))
    for got, want in zip(jax.vjp(ours, x, w)[1](g), jax.vjp(ref, x, w)[1](g)):
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("kernel,strides,padding,size", [
    ((3, 3), (1, 1), "SAME", 6), ((3, 3), (2, 2), "SAME", 7), ((1, 1), (2, 2), "VALID", 6),
])
def test_check_grads(kernel, strides, padding, size):
    x, w = _inputs(kernel, 3, 4, size)
    ours, _ = _pair(strides, padding)
    check_grads(ours, (x, w), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_both_weight_gradient_branches_are_exercised():
    # The small shapes the value tests above use go to lax at stride 1; the taps take 1x1
    # kernels, strided convs and large stride-1 ones (test_tap_weight_grad_equals_lax_vjp
    # checks them at stride 1 on small shapes).
    assert weight_grad_method((3, 3, 8, 8), (2, 16, 16, 8)) == "lax"
    assert weight_grad_method((3, 3, 4, 4), (2, 16, 16, 4), (2, 2)) == "lax"
    assert weight_grad_method((1, 1, 4, 8), (2, 8, 8, 8), (2, 2)) == "taps"
    assert weight_grad_method((3, 3, 4, 8), (2, 8, 8, 8), (2, 2)) == "taps"


@pytest.mark.parametrize("w_shape,out_shape,strides,method", [
    ((3, 3, 64, 64), (256, 32, 32, 64), (1, 1), "taps"),     # width 64, stage 1, unchunked
    ((3, 3, 64, 64), (32, 32, 32, 64), (1, 1), "lax"),       # the same in 8 chunks
    ((3, 3, 128, 128), (256, 16, 16, 128), (1, 1), "taps"),  # width 64, stage 2
    ((3, 3, 128, 128), (64, 16, 16, 128), (1, 1), "lax"),
    ((3, 3, 256, 256), (256, 8, 8, 256), (1, 1), "taps"),    # exactly 2**30
    ((3, 3, 256, 256), (64, 8, 8, 256), (1, 1), "lax"),
    ((3, 3, 512, 512), (32, 4, 4, 512), (1, 1), "taps"),     # 512 x 512 channels at any batch
    ((3, 3, 3, 64), (256, 32, 32, 64), (1, 1), "lax"),       # stem
    ((3, 3, 16, 16), (256, 32, 32, 16), (1, 1), "lax"),      # width 16: every stride-1 conv
    ((1, 1, 32, 64), (128, 8, 8, 64), (2, 2), "taps"),       # any 1x1
    ((1, 1, 64, 128), (32, 16, 16, 128), (2, 2), "taps"),
    ((3, 3, 64, 128), (32, 16, 16, 128), (2, 2), "taps"),    # strided 3x3
    ((3, 3, 16, 32), (128, 16, 16, 32), (2, 2), "lax"),      # the strided lax region
    ((3, 3, 32, 64), (64, 8, 8, 64), (2, 2), "taps"),
])
def test_rule_table(w_shape, out_shape, strides, method):
    assert weight_grad_method(w_shape, out_shape, strides) == method


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kernel,strides,padding,size", [
    ((3, 3), (1, 1), ((1, 1), (1, 1)), 8),
    ((3, 3), (1, 1), ((0, 0), (0, 0)), 9),
    ((3, 2), (1, 1), ((0, 2), (1, 0)), 7),
    ((3, 3), (2, 2), ((1, 1), (1, 1)), 9),
    ((3, 3), (2, 2), ((-1, 1), (0, 2)), 9),
])
def test_tap_weight_grad_equals_lax_vjp(jit, kernel, strides, padding, size):
    x, w = _inputs(kernel, 5, 7, size, batch=3)
    conv = lambda b: lax.conv_general_dilated(x, b, strides, padding, dimension_numbers=DIMS)
    out, vjp = jax.vjp(conv, w)
    g = jnp.asarray(np.random.default_rng(2).normal(size=out.shape).astype(np.float32))
    taps = lambda x_, g_: tap_weight_grad(x_, g_, kernel, strides, padding)
    got = (jax.jit(taps) if jit else taps)(x, g)
    chex.assert_shape(got, w.shape)
    np.testing.assert_allclose(got, vjp(g)[0], rtol=1e-5, atol=1e-5 * float(jnp.abs(got).max()))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kernel,strides,padding,size", [
    ((3, 3), (2, 2), ((1, 1), (1, 1)), 8),          # ResNet's strided 3x3
    ((3, 3), (2, 2), ((1, 1), (1, 1)), 9),          # odd size
    ((3, 3), (2, 2), "VALID", 8),                   # the last row is read by no window
    ((1, 1), (2, 2), ((0, 0), (0, 0)), 8),          # 1x1 shortcut: three phases are zero
    ((3, 3), (2, 2), "SAME", 9),
    ((3, 3), (3, 3), "VALID", 10),                  # stride 3
    ((5, 5), (2, 2), ((2, 1), (0, 3)), 11),         # asymmetric padding, longer sub-kernels
    ((4, 2), (3, 2), ((1, 2), (2, 0)), 12),         # unequal kernel sides and strides
    ((2, 2), (2, 2), "SAME", 7),                    # kernel == stride
])
def test_phase_input_grad_equals_lax_vjp(jit, kernel, strides, padding, size):
    x, w = _inputs(kernel, 3, 5, size)
    pads = (lax.padtype_to_pads(x.shape[1:3], kernel, strides, padding)
            if isinstance(padding, str) else padding)
    conv = lambda a: lax.conv_general_dilated(a, w, strides, pads, dimension_numbers=DIMS)
    y, vjp = jax.vjp(conv, x)
    g = jnp.asarray(np.random.default_rng(2).normal(size=y.shape).astype(np.float32))
    phases = lambda g, w: phase_input_grad(g, w, x.shape, strides, pads)
    got = (jax.jit(phases) if jit else phases)(g, w)
    chex.assert_shape(got, x.shape)
    want = vjp(g)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kernel,padding,batch", [((3, 3), ((1, 1), (1, 1)), 32),
                                                  ((1, 1), "VALID", 128)])
def test_large_strided_conv_takes_the_phases_and_equals_lax(jit, kernel, padding, batch):
    x, w = _inputs(kernel, 2, 3, 32, batch=batch)  # batch * 16 * 16 output rows
    ours, ref = _pair((2, 2), padding)
    pads = lax.padtype_to_pads(x.shape[1:3], kernel, (2, 2), padding) if isinstance(
        padding, str) else padding
    assert input_grad_method(kernel, (2, 2), pads, ref(x, w).shape) == "phases"
    dx_ours = lambda a: jax.grad(lambda b: jnp.sum(ours(b, w) ** 2))(a)
    dx_ref = lambda a: jax.grad(lambda b: jnp.sum(ref(b, w) ** 2))(a)
    if jit:
        dx_ours = jax.jit(dx_ours)
    want = dx_ref(x)
    np.testing.assert_allclose(dx_ours(x), want, rtol=1e-5,
                               atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("kernel,strides,pads,out_shape,method", [
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (128, 16, 16, 128), "phases"),  # ResNet stage 2, B 128
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (128, 8, 8, 256), "phases"),    # 8192 rows: threshold
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (128, 4, 4, 512), "lax"),       # stage 4: lax
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (32, 16, 16, 128), "phases"),
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (32, 8, 8, 256), "lax"),
    ((1, 1), (2, 2), ((0, 0), (0, 0)), (128, 16, 16, 128), "phases"),  # 1x1 from 32768 rows
    ((1, 1), (2, 2), ((0, 0), (0, 0)), (128, 8, 8, 256), "lax"),
    ((3, 1), (1, 2), ((0, 0), (0, 0)), (64, 16, 8, 16), "phases"),
    ((3, 3), (1, 1), ((1, 1), (1, 1)), (128, 32, 32, 64), "lax"),      # stride 1: fast path
    ((3, 3), (2, 2), ((-1, 0), (0, 0)), (128, 16, 16, 64), "lax"),     # negative padding
])
def test_input_grad_rule(kernel, strides, pads, out_shape, method):
    assert input_grad_method(kernel, strides, pads, out_shape) == method


def test_other_calls_fall_through_to_lax():
    x, w = _inputs((3, 3), 3, 4, 6)
    nchw = jnp.transpose(x, (0, 3, 1, 2))
    oihw = jnp.transpose(w, (3, 2, 0, 1))
    args = ((1, 1), "SAME")
    kwargs = {"dimension_numbers": ("NCHW", "OIHW", "NCHW")}
    np.testing.assert_array_equal(fast_conv_general_dilated(nchw, oihw, *args, **kwargs),
                                  lax.conv_general_dilated(nchw, oihw, *args, **kwargs))
    dilated = {"rhs_dilation": (2, 2), "dimension_numbers": DIMS}
    np.testing.assert_array_equal(fast_conv_general_dilated(x, w, *args, **dilated),
                                  lax.conv_general_dilated(x, w, *args, **dilated))


def test_flax_conv_with_fast_equals_default():
    x, _ = _inputs((3, 3), 3, 4, 8)
    default = nn.Conv(6, (3, 3), strides=(2, 2))
    fast = nn.Conv(6, (3, 3), strides=(2, 2), conv_general_dilated=fast_conv_general_dilated)
    variables = default.init(jax.random.key(0), x)
    np.testing.assert_allclose(fast.apply(variables, x), default.apply(variables, x),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,kwargs", [
    # The ResNets take ~60 s each to compile here; CI covers ResNet-18 with the fast conv
    # through test_awm_mask_step_with_fast_matches_lax.
    pytest.param("resnet18", {"width": 4}, marks=pytest.mark.slow),
    pytest.param("preact_resnet18", {"width": 4}, marks=pytest.mark.slow),
    ("small_vgg", {"width": 4}), ("small_cnn", {"features": (4, 8)}),
])
def test_models_switch_impl_with_the_same_variables(name, kwargs):
    model = create_model(name, 10, **kwargs)
    fast = with_conv_impl(model, "fast")
    assert fast.conv_impl == "fast" and model.conv_impl == "lax"
    variables = init_variables(model, jax.random.key(0), (16, 16, 3))
    assert (jax.tree_util.tree_structure(init_variables(fast, jax.random.key(0), (16, 16, 3)))
            == jax.tree_util.tree_structure(variables))
    images = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))

    def loss(params, m):
        logits = m.apply({"params": params, "batch_stats": variables["batch_stats"]}, images)
        return jnp.sum(logits ** 2)

    want = jax.grad(loss)(variables["params"], model)
    got = jax.jit(jax.grad(loss), static_argnums=1)(variables["params"], fast)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * float(jnp.abs(r).max()))


def test_conv_impl_validation():
    assert CONV_IMPLS == ("lax", "fast", "canonical")
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        conv_general_dilated_for("cudnn")
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        create_model("resnet18", 10, width=4, conv_impl="cudnn")
    with pytest.raises(ValueError, match="no conv_impl attribute"):
        with_conv_impl(nn.Dense(3), "fast")
    with pytest.raises(ValueError, match="conv_impl"):
        AWMConfig(conv_impl="cudnn")
    with pytest.raises(ValueError, match="conv_impl"):
        TrainConfig(conv_impl="cudnn")


@pytest.mark.parametrize("config_cls", [AWMConfig, TrainConfig])
def test_configs_record_conv_impl_and_round_trip(config_cls):
    assert config_cls().to_dict()["conv_impl"] == config_cls().conv_impl
    other = "lax" if config_cls().conv_impl == "fast" else "fast"
    assert config_cls(conv_impl=other).to_dict()["conv_impl"] == other
    for impl in CONV_IMPLS:
        config = config_cls(conv_impl=impl)
        assert config_cls.from_dict(config.to_dict()) == config


def test_defaults():
    assert AWMConfig().conv_impl == "fast"  # measured faster (perf_notes.md section 4)
    assert TrainConfig().conv_impl == "lax"


def test_awm_mask_step_with_fast_matches_lax():
    model = create_model("resnet18", 10, width=4)
    variables = init_variables(model, jax.random.key(0), (16, 16, 3))
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.uniform(size=(8, 16, 16, 3)).astype(np.float32)),
            "label": jnp.asarray(np.arange(8) % 10, jnp.int32)}
    frozen = Frozen(variables["params"], variables["batch_stats"])
    key = jax.random.key(3)
    masks = {}
    for impl in ("lax", "fast"):
        config = dataclasses.replace(AWMConfig(batch_size=4), conv_impl=impl)
        steps = make_awm_steps(model, config, 8)
        hparams = config.hparams()
        state = steps.init(frozen.params, data, hparams)
        state = steps.begin_epoch(state, frozen, data, hparams)
        state, _ = jax.jit(steps.trigger_step)(state, frozen, data, key, hparams)
        state, _ = jax.jit(steps.mask_step)(state, frozen, data, key, hparams)
        masks[impl] = state.mask
    for got, want in zip(jax.tree_util.tree_leaves(masks["fast"]),
                         jax.tree_util.tree_leaves(masks["lax"])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
