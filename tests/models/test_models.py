"""Tests for the model registry and the shared apply contract of every registered model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.models import MODELS, apply_model, create_model, init_variables

# (registry name, constructor kwargs small enough for CPU, image shape).
CASES = [
    ("small_cnn", {}, (16, 16, 1)),
    ("small_cnn", {}, (32, 32, 3)),
    ("resnet18", {"width": 8}, (32, 32, 3)),
    ("small_vgg", {"width": 8}, (32, 32, 3)),
]
CASE_IDS = [f"{name}-{'x'.join(map(str, shape))}" for name, _, shape in CASES]
NUM_CLASSES = 10


def _cheap_key(seed: int) -> jax.Array:
    # Eager threefry compiles one kernel per random shape (about 8 s for the VGG's dropout on
    # this CPU); the models only need some key, so the tests use the cheap rbg generator.
    return jax.random.key(seed, impl="unsafe_rbg")


def _fake_variables(model, shape):
    """Variables shaped like ``init_variables`` output, filled in numpy.

    On this CPU a real ResNet init compiles one threefry kernel per parameter shape (about 20 s),
    so the fixtures fill the ``eval_shape`` structure with flax-default-like values instead.
    """
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), jnp.float32)
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, jnp.float32)
        return jnp.asarray(0.01 * rng.normal(size=leaf.shape), jnp.float32)  # bias, mean

    shapes = jax.eval_shape(lambda key: init_variables(model, key, shape), jax.random.key(0))
    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _setup(index: int):
    """Model, variables and a 2-image batch for ``CASES[index]`` (built once per session)."""
    name, kwargs, shape = CASES[index]
    model = create_model(name, NUM_CLASSES, **kwargs)
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(2, *shape)), jnp.float32)
    return model, _fake_variables(model, shape), images


def _conv_kernel_entries(name: str, num_classes: int, **kwargs) -> int:
    """Counts conv-kernel entries (the leaves AWM masks) without allocating or compiling."""
    model = create_model(name, num_classes, **kwargs)
    shapes = jax.eval_shape(lambda key: init_variables(model, key, (32, 32, 3)),
                            jax.random.key(0))
    leaves = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    return sum(leaf.size for path, leaf in leaves
               if getattr(path[-1], "key", None) == "kernel" and leaf.ndim == 4)


def test_init_variables_matches_fake_structure():
    model, variables, _ = _setup(CASE_IDS.index("small_cnn-16x16x1"))
    real = init_variables(model, _cheap_key(0), (16, 16, 1))
    assert jax.tree.structure(real) == jax.tree.structure(variables)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), real, variables)


def test_registry_lists_all_models():
    assert {"small_cnn", "resnet18", "small_vgg"} <= set(MODELS.names())


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError, match="resnet18") as info:
        create_model("resnet19", NUM_CLASSES)
    for known in ("small_cnn", "resnet18", "small_vgg", "'resnet19'"):
        assert known in str(info.value)


@pytest.mark.parametrize("name", ["resnet18", "small_vgg"])
def test_bad_width_raises(name):
    with pytest.raises(ValueError, match="width"):
        create_model(name, NUM_CLASSES, width=0)


@pytest.mark.parametrize("name, num_classes, expected", [
    ("resnet18", 10, 11_159_232),  # awm-paper.md 1.1, counted from the official code.
    ("small_vgg", 10, 286_560),
    ("small_vgg", 43, 286_560),  # GTSRB: the head is not a conv, so the count is unchanged.
])
def test_conv_kernel_entries_match_official_counts(name, num_classes, expected):
    assert _conv_kernel_entries(name, num_classes) == expected


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_logits_shape_dtype_and_eval_is_pure(index):
    model, variables, images = _setup(index)
    logits, new_stats = model.apply(variables, images, train=False, mutable=["batch_stats"])
    assert logits.shape == (2, NUM_CLASSES)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    jax.tree.map(np.testing.assert_array_equal, new_stats["batch_stats"],
                 variables["batch_stats"])


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_train_mode_updates_every_batch_stat(index):
    model, variables, images = _setup(index)
    logits, new_stats = apply_model(model, variables["params"], variables["batch_stats"], images,
                                    train=True, dropout_key=_cheap_key(2))
    assert logits.shape == (2, NUM_CLASSES) and logits.dtype == jnp.float32
    assert jax.tree.structure(new_stats) == jax.tree.structure(variables["batch_stats"])
    changed = jax.tree.map(lambda new, old: bool(np.any(new != old)), new_stats,
                           variables["batch_stats"])
    assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_jit_matches_eager(index):
    model, variables, images = _setup(index)
    forward = functools.partial(apply_model, model, train=False)
    eager, _ = forward(variables["params"], variables["batch_stats"], images)
    jitted, _ = jax.jit(forward)(variables["params"], variables["batch_stats"], images)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def test_resnet_accepts_other_input_sizes():
    model, variables, _ = _setup(CASE_IDS.index("resnet18-32x32x3"))
    # Global mean pooling keeps the Dense input at 8 * width for any size divisible by 8.
    logits = model.apply(variables, jnp.zeros((1, 16, 16, 3)), train=False)
    assert logits.shape == (1, NUM_CLASSES)


def test_normalisation_happens_inside_the_model():
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model, variables, images = _setup(CASE_IDS.index("resnet18-32x32x3"))
    normalised = create_model("resnet18", NUM_CLASSES, width=8, mean=mean, std=std)
    expected = model.apply(variables, (images - jnp.array(mean)) / jnp.array(std), train=False)
    actual = normalised.apply(variables, images, train=False)  # Normalize adds no parameters.
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_vgg_dropout_is_keyed_and_off_in_eval():
    model, variables, images = _setup(CASE_IDS.index("small_vgg-32x32x3"))
    params, stats = variables["params"], variables["batch_stats"]
    run = functools.partial(apply_model, model, params, stats, images, train=True)
    first, _ = run(dropout_key=_cheap_key(3))
    again, _ = run(dropout_key=_cheap_key(3))
    other, _ = run(dropout_key=_cheap_key(4))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    with pytest.raises(Exception, match="dropout"):
        run()  # Train mode without a dropout key must fail loudly, not silently skip dropout.


def _conv_oracle(x: np.ndarray, kernel: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """PyTorch-style cross-correlation with symmetric zero padding, in numpy (NHWC, HWIO)."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    size_h, size_w = kernel.shape[:2]
    out_h = (x.shape[1] - size_h) // stride + 1
    out_w = (x.shape[2] - size_w) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]), np.float64)
    for dy in range(size_h):
        for dx in range(size_w):
            patch = x[:, dy:dy + stride * out_h:stride, dx:dx + stride * out_w:stride]
            out += patch @ kernel[dy, dx]
    return out


def test_resnet_strided_convs_pad_like_pytorch():
    # The PyTorch-weight mapping relies on pad (1, 1) for stride-2 3x3 convs; flax "SAME" would
    # pad (0, 1) on even sizes and shift every downsampled feature map by one pixel.
    model, variables, images = _setup(CASE_IDS.index("resnet18-32x32x3"))
    _, state = model.apply(variables, images, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    inter = state["intermediates"]
    block_in = np.asarray(inter["layer1_block1"]["__call__"][0], np.float64)
    block = variables["params"]["layer2_block0"]
    for name, pad in (("conv1", 1), ("shortcut_conv", 0)):
        expected = _conv_oracle(block_in, np.asarray(block[name]["kernel"], np.float64), 2, pad)
        actual = inter["layer2_block0"][name]["__call__"][0]
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
