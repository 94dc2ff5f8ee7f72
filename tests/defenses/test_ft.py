"""Fine-tuning baseline: config checks, the pure step, and a run on a real tiny backdoor."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from baseline_backdoor import tiny_backdoor

from awm_jax.cli import main
from awm_jax.defenses import purify
from awm_jax.defenses.finetune import FTConfig, ce_loss_fn, init_ft_state, make_sgd_step
from awm_jax.models.base import create_model, init_variables
from awm_jax.training.loop import save_result


@pytest.fixture(scope="module")
def backdoor():
    return tiny_backdoor()


@pytest.mark.parametrize("field, value", [("learning_rate", 0.0), ("momentum", 1.0),
                                          ("weight_decay", -1e-4), ("epochs", -1),
                                          ("batch_size", 0), ("crop_padding", -1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        FTConfig(**{field: value})


def test_config_round_trips_and_rejects_unknown_keys():
    config = FTConfig(epochs=3, flip=True)
    assert FTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        FTConfig.from_dict({"lr": 0.1})


def _tiny():
    model = create_model("small_cnn", 3, features=(4,))
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    batch = {"image": jax.random.uniform(jax.random.key(1), (6, 8, 8, 1)),
             "label": jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)}
    return model, variables, batch


@pytest.mark.parametrize("nesterov", [False, True])
def test_step_jit_equals_eager_and_matches_sgd_by_hand(nesterov):
    model, variables, batch = _tiny()
    step = make_sgd_step(ce_loss_fn(model), nesterov=nesterov)
    hparams = FTConfig().hparams()
    key = jax.random.key(2)
    eager, _ = step(init_ft_state(variables), batch, key, hparams)
    jitted, metrics = jax.jit(step)(init_ft_state(variables), batch, key, hparams)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5, rtol=1e-5)
    # From a zero momentum buffer: p1 = p0 - lr * (g + wd p0) * (1 + mu if nesterov else 1).
    grads = jax.grad(lambda p: ce_loss_fn(model)(p, init_ft_state(variables), batch["image"],
                                                  batch["label"], key, hparams)[0])(
        variables["params"])
    factor = 1.9 if nesterov else 1.0
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.01 * factor * (g + 1e-4 * p),
                                      variables["params"], grads)
    chex.assert_trees_all_close(jitted.params, expected, atol=1e-6)
    assert int(jitted.step) == 1 and float(metrics["finite"]) == 1.0


def test_masked_entries_stay_zero():
    model, variables, batch = _tiny()
    mask = jax.tree_util.tree_map(jnp.ones_like, variables["params"])
    mask["Conv_0"]["kernel"] = mask["Conv_0"]["kernel"].at[..., 1].set(0.0)
    step = jax.jit(make_sgd_step(ce_loss_fn(model)))
    state = init_ft_state(variables, mask)
    for i in range(3):
        state, _ = step(state, batch, jax.random.key(i), FTConfig(learning_rate=0.5).hparams())
    kernel = np.asarray(state.params["Conv_0"]["kernel"])
    assert np.all(kernel[..., 1] == 0) and np.any(kernel[..., 0] != 0)


def test_ft_keeps_accuracy_on_a_real_backdoor(backdoor):
    assert backdoor.before["acc"] > 0.9 and backdoor.before["asr"] > 0.9
    result = purify("ft", backdoor.model, backdoor.variables, backdoor.clean, jax.random.key(0),
                    num_classes=backdoor.num_classes, progress=False,
                    on_epoch=lambda epoch, v: {"acc": backdoor.evaluate(v)["acc"]})
    chex.assert_trees_all_equal_structs(result.variables, backdoor.variables)
    after = backdoor.evaluate(result.variables)
    assert after["acc"] > 0.9
    # Measured: plain FT with 150 images leaves ASR at ~0.99 (it is the weak baseline), so
    # only the history and the unchanged-input contract are checked here.
    assert len(result.history) == FTConfig().epochs and "acc" in result.history[-1]
    assert result.details["steps"] == FTConfig().epochs * (150 // 64)
    assert backdoor.evaluate(backdoor.variables) == backdoor.before  # input not donated


def test_cli_purify_with_ft_writes_a_report(backdoor, tmp_path):
    save_result(tmp_path / "bd", backdoor.trained, backdoor.dataset, backdoor.attack)
    code = main(["purify", "--checkpoint", str(tmp_path / "bd"), "--defense", "ft",
                 "--n-clean", "150", "--out", str(tmp_path / "ft"), "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["defense"] == "ft" and report["config"] == FTConfig().to_dict()
    assert report["after"]["acc"] > 0.9 and (tmp_path / "ft" / "purified").is_dir()
