"""Fine-pruning: finding the last conv, the pure pruning step, and a real tiny backdoor."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from baseline_backdoor import tiny_backdoor

from awm_jax.defenses import purify
from awm_jax.defenses.fine_pruning import (
    FPConfig,
    PruneState,
    channel_mask,
    find_last_conv,
    make_prune_step,
)
from awm_jax.models.base import create_model


@pytest.fixture(scope="module")
def backdoor():
    return tiny_backdoor()


@pytest.fixture(scope="module")
def result(backdoor):
    return purify("fp", backdoor.model, backdoor.variables, backdoor.clean, jax.random.key(0),
                  num_classes=backdoor.num_classes, progress=False)


@pytest.mark.parametrize("field, value", [("acc_drop", -0.1), ("acc_drop", 1.5),
                                          ("max_prune_ratio", 1.0), ("learning_rate", 0.0),
                                          ("epochs", -1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        FPConfig(**{field: value})


class _ElevenConvs(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        for _ in range(11):
            x = nn.BatchNorm(use_running_average=not train)(nn.Conv(2, (1, 1))(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def _abstract_variables(model, image_shape):
    # Shapes only (no compile): find_last_conv reads ranks and widths, never values.
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def test_finds_the_last_called_conv_not_the_last_sorted_name():
    # JAX sorts dict keys, so "Conv_9" sorts after "Conv_10"; the forward order must win.
    model = _ElevenConvs()
    layer = find_last_conv(model, _abstract_variables(model, (2, 2, 1)), (2, 2, 1))
    assert layer.kernel_path == ("Conv_10", "kernel") and layer.bn_path == ("BatchNorm_10",)
    resnet = create_model("resnet18", 10, width=4)
    layer = find_last_conv(resnet, _abstract_variables(resnet, (16, 16, 3)), (16, 16, 3))
    assert layer.kernel_path == ("layer4_block1", "conv2", "kernel")
    assert layer.bn_path == ("layer4_block1", "bn2") and layer.channels == 32


def test_model_without_conv_is_rejected():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    model = MLP()
    variables = {"params": model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"],
                 "batch_stats": {}}
    with pytest.raises(ValueError, match="conv"):
        find_last_conv(model, variables, (4, 4, 1))


def test_prune_step_jit_equals_eager_and_respects_limits(backdoor):
    data = {"image": jnp.asarray(backdoor.clean.images), "label": jnp.asarray(
        backdoor.clean.labels)}
    layer = find_last_conv(backdoor.model, backdoor.variables, data["image"].shape[1:])
    step = make_prune_step(backdoor.model, layer)
    state = PruneState(backdoor.variables, jnp.ones((layer.channels,)))
    hparams = FPConfig(acc_drop=0.04, max_prune_ratio=0.25).hparams()
    eager, _ = step(state, data, jax.random.key(0), hparams)
    jitted, metrics = jax.jit(step)(state, data, jax.random.key(0), hparams)
    np.testing.assert_array_equal(eager.keep, jitted.keep)
    pruned = int(metrics["pruned"])
    assert pruned == int(np.sum(np.asarray(jitted.keep) == 0)) <= 0.25 * layer.channels
    accs = np.asarray(metrics["accs"])
    assert np.all(accs[:pruned + 1] >= accs[0] - 0.04 - 1e-6)
    # The pruned channels are the least active ones.
    scores = np.asarray(metrics["scores"])
    kept = np.asarray(jitted.keep) == 1
    if pruned:
        assert scores[~kept].max() <= scores[kept].min()
    mask = channel_mask(backdoor.variables["params"], layer, jitted.keep)
    assert float(jnp.sum(mask["Dense_0"]["kernel"] == 0)) == 0


def test_fp_on_a_real_backdoor(backdoor, result):
    chex.assert_trees_all_equal_structs(result.variables, backdoor.variables)
    details = result.details
    assert details["layer"] == "Conv_1/kernel" and details["batchnorm"] == "BatchNorm_1"
    assert 0 < details["pruned"] <= 0.9 * details["channels"]
    assert details["clean_acc_pruned"] >= details["clean_acc_before"] - 0.04 - 1e-6
    kernel = np.asarray(result.variables["params"]["Conv_1"]["kernel"])
    pruned = details["pruned_channels"]
    assert np.all(kernel[..., pruned] == 0)  # kept pruned through fine-tuning
    after = backdoor.evaluate(result.variables)
    assert after["acc"] > 0.9
    # Measured (seed 0): ASR 0.996 -> 0.969 with 10 of 32 channels pruned; FP is weak here
    # (a 3x3 patch on a 32-channel layer), but it does lower ASR, unlike plain FT (0.992).
    assert after["asr"] < backdoor.before["asr"] - 0.01
