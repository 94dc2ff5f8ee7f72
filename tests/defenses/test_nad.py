"""NAD: attention maps against NAD's at.py, layer choice, the pure step, a real tiny backdoor."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from baseline_backdoor import tiny_backdoor

from awm_jax.defenses import purify
from awm_jax.defenses.finetune import make_sgd_step
from awm_jax.defenses.nad import (
    NADConfig,
    NADState,
    attention_loss,
    attention_map,
    default_layers,
    nad_loss_fn,
    resolve_layers,
)
from awm_jax.models.base import create_model, init_variables


@pytest.fixture(scope="module")
def backdoor():
    return tiny_backdoor()


@pytest.mark.parametrize("field, value", [("beta", -1.0), ("power", 0.0), ("learning_rate", 0.0),
                                          ("teacher_epochs", -1), ("layers", ()),
                                          ("layers", "BatchNorm_0"), ("last_layers", 0),
                                          ("lr_decay", 0.0), ("lr_decay_epochs", (-1,))])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        NADConfig(**{field: value})


def test_attention_map_matches_numpy_oracle():
    a = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(2, 3, 4, 5)).astype(np.float32)

    def oracle(x):  # at.py on NCHW, here NHWC
        am = (np.abs(x) ** 2).sum(-1)
        return am / (np.sqrt((am ** 2).sum(axis=(1, 2), keepdims=True)) + 1e-6)

    np.testing.assert_allclose(attention_map(jnp.asarray(a)), oracle(a), rtol=1e-5)
    np.testing.assert_allclose(attention_loss(jnp.asarray(a), jnp.asarray(b)),
                               np.mean((oracle(a) - oracle(b)) ** 2), rtol=1e-5)
    assert float(attention_loss(jnp.asarray(a), jnp.asarray(a))) == 0.0


def test_default_layers_are_stage_outputs_or_batchnorms():
    resnet = create_model("resnet18", 10, width=4)
    # Shapes only (no compile): the layer choice reads the forward pass, never values.
    resnet_variables = jax.eval_shape(resnet.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    stages = tuple(f"layer{i}_block1" for i in range(1, 5))
    assert default_layers(resnet, resnet_variables, (16, 16, 3)) == stages
    # last_layers trims only the automatic choice; the official preset keeps the last stage.
    assert resolve_layers(resnet, resnet_variables, (16, 16, 3), NADConfig()) == stages[1:]
    assert resolve_layers(resnet, resnet_variables, (16, 16, 3),
                          NADConfig.preset("official")) == stages[-1:]
    assert resolve_layers(resnet, resnet_variables, (16, 16, 3),
                          NADConfig(last_layers=None)) == stages
    cnn = create_model("small_cnn", 10, features=(4, 8))
    variables = init_variables(cnn, jax.random.key(0), (8, 8, 1))
    assert default_layers(cnn, variables, (8, 8, 1)) == ("BatchNorm_0", "BatchNorm_1")
    assert resolve_layers(cnn, variables, (8, 8, 1),
                          NADConfig(last_layers=1, layers=("BatchNorm_0",))) == ("BatchNorm_0",)
    with pytest.raises(ValueError, match="Conv_7"):
        resolve_layers(cnn, variables, (8, 8, 1), NADConfig(layers=("Conv_7",)))


def test_presets_and_learning_rate_schedule():
    official = NADConfig.preset("official")
    assert (official.beta, official.learning_rate, official.last_layers) == (5000.0, 0.1, 1)
    assert [official.learning_rate_at(e) for e in range(4)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01])
    assert NADConfig.preset("paper", epochs=3).epochs == 3
    assert [NADConfig(lr_decay_epochs=(1, 3), lr_decay=0.5).learning_rate_at(e)
            for e in range(5)] == pytest.approx([0.01, 0.005, 0.005, 0.0025, 0.0025])
    with pytest.raises(ValueError, match="unknown NAD preset 'nope'; known: official, paper"):
        NADConfig.preset("nope")


def test_step_jit_equals_eager_and_beta_zero_is_plain_ce():
    model = create_model("small_cnn", 3, features=(4, 8))
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    teacher = init_variables(model, jax.random.key(1), (8, 8, 1))
    batch = {"image": jax.random.uniform(jax.random.key(2), (6, 8, 8, 1)),
             "label": jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)}
    state = NADState(params=variables["params"], batch_stats=variables["batch_stats"],
                     velocity=jax.tree_util.tree_map(jnp.zeros_like, variables["params"]),
                     mask=None, step=jnp.zeros((), jnp.int32), teacher=teacher)
    step = make_sgd_step(nad_loss_fn(model, ("BatchNorm_0", "BatchNorm_1"), 2.0),
                         nesterov=True)
    hparams = NADConfig().hparams()
    eager, _ = step(state, batch, jax.random.key(3), hparams)
    jitted, metrics = jax.jit(step)(state, batch, jax.random.key(3), hparams)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5, rtol=1e-4)
    assert float(metrics["at"]) > 0
    np.testing.assert_allclose(metrics["loss"], metrics["ce"] + 1000 * metrics["at"], rtol=1e-5)
    zero = hparams._replace(beta=jnp.float32(0.0))
    _, zero_metrics = jax.jit(step)(state, batch, jax.random.key(3), zero)
    np.testing.assert_allclose(zero_metrics["loss"], zero_metrics["ce"], rtol=1e-6)


def test_nad_erases_a_real_backdoor(backdoor):
    # The "paper" preset (beta 5000 on every layer, lr 0.1) is the one measured on digits.
    result = purify("nad", backdoor.model, backdoor.variables, backdoor.clean,
                    jax.random.key(0), NADConfig.preset("paper"),
                    num_classes=backdoor.num_classes, progress=False)
    chex.assert_trees_all_equal_structs(result.variables, backdoor.variables)
    assert result.details["layers"] == ["BatchNorm_0", "BatchNorm_1"]
    after = backdoor.evaluate(result.variables)
    # Measured (key 0): ACC 0.977 -> 0.857, ASR 0.996 -> 0.008 (keys 1, 2: ASR 0.22, 0.02;
    # the same training with beta = 0 leaves ASR 0.86-0.89).
    assert after["acc"] > 0.75
    assert after["asr"] < 0.3
    assert len(result.history) == NADConfig().epochs and result.history[-1]["at"] >= 0
