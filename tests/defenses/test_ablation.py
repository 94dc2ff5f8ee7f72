"""The ANP-to-AWM ablation: switches validate, endpoints equal ANP and AWM, presets run."""

import dataclasses
import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from baseline_backdoor import tiny_backdoor

from awm_jax.data.dataset import Split
from awm_jax.defenses import purify
from awm_jax.defenses.ablation import ADVERSARIES, MASKS, AblationConfig, preset
from awm_jax.defenses.ablation_steps import make_ablation_steps
from awm_jax.defenses.anp import ANPConfig
from awm_jax.defenses.awm import AWMConfig, Frozen, run_awm
from awm_jax.models import create_model, init_variables


@pytest.fixture(scope="module")
def tiny():
    model = create_model("small_cnn", 3, features=(4, 6))
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    images = jax.random.uniform(jax.random.key(1), (12, 8, 8, 1))
    clean = Split(np.asarray(images), np.arange(12, dtype=np.int32) % 3)
    return model, variables, clean


@pytest.mark.parametrize("field, value", [
    ("mask", "channel"), ("adversary", "pgd"), ("optimizer", "rmsprop"),
    ("inner_labels", "random"), ("alpha", 1.5), ("threshold", 1.2), ("gamma", -1.0),
    ("tau", 0.0), ("momentum", 1.0), ("iterations", 0), ("epochs", 0), ("noise_steps", 0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        AblationConfig(**{field: value})


def test_presets_change_one_component_per_row():
    assert AblationConfig.PRESETS == ("anp", "weight_mask", "weight_mask_trigger", "awm")
    assert preset("anp") == AblationConfig()  # the defaults are ANP's
    rows = [preset(name).to_dict() for name in AblationConfig.PRESETS]
    changed = [{k for k in a if a[k] != b[k]} for a, b in itertools.pairwise(rows)]
    assert changed[0] == {"mask", "threshold"}  # soft weight mask instead of pruned neurons
    assert {"adversary", "alpha", "optimizer", "bn_train"} <= changed[1]
    assert changed[2] == {"l1"}
    assert AblationConfig.from_dict(rows[-1]) == preset("awm")
    assert preset("awm", tau=50.0).tau == 50.0
    with pytest.raises(ValueError, match="known: anp, weight_mask"):
        preset("nc")


def test_anp_settings_reproduce_anp(tiny):
    model, variables, clean = tiny
    ours = purify("ablation", model, variables, clean, jax.random.key(3),
                  AblationConfig(iterations=5, batch_size=8), progress=False)
    anp = purify("anp", model, variables, clean, jax.random.key(3),
                 ANPConfig(iterations=5, batch_size=8), progress=False)
    chex.assert_trees_all_close(ours.variables, anp.variables, atol=1e-6, rtol=1e-5)
    assert [h["iteration"] for h in ours.history] == [h["iteration"] for h in anp.history]
    np.testing.assert_allclose([h["loss"] for h in ours.history],
                               [h["loss"] for h in anp.history], rtol=1e-5)
    np.testing.assert_allclose([h["adversarial_ce"] for h in ours.history],
                               [h["perturbed_ce"] for h in anp.history], rtol=1e-5)


def test_awm_settings_reproduce_awm(tiny):
    model, variables, clean = tiny
    settings = {"batch_size": 4, "inner_passes": 1, "tau": 5.0, "gamma": 1e-3}
    ours = purify("ablation", model, variables, clean, jax.random.key(4),
                  preset("awm", epochs=3, **settings), progress=False)
    awm = run_awm(model, variables, clean, AWMConfig(outer_epochs=3, **settings),
                  jax.random.key(4), progress=False)
    chex.assert_trees_all_close(ours.variables, awm.variables, atol=1e-6, rtol=1e-5)
    for name in ("loss", "triggered_ce", "trigger_l1", "mask_l1"):
        np.testing.assert_allclose([h["adversarial_ce" if name == "triggered_ce" else name]
                                    for h in ours.history],
                                   [h[name] for h in awm.history], rtol=1e-5)


def _mask_steps(tiny, config, count=2):
    model, variables, clean = tiny
    data = {"image": jnp.asarray(clean.images), "label": jnp.asarray(clean.labels)}
    steps = make_ablation_steps(model, config, variables, 12)
    frozen = Frozen(variables["params"], variables["batch_stats"])
    hparams = config.hparams()
    state = steps.init(data, hparams)
    if config.adversary == "trigger":
        state = jax.jit(steps.begin_epoch)(state, frozen, data, hparams)
        state, _ = jax.jit(steps.trigger_step)(state, frozen, data, jax.random.key(0), hparams)
        state = steps.end_trigger_phase(state, hparams)
    mask_step = jax.jit(steps.mask_step)
    metrics = []
    for i in range(count):
        state, step_metrics = mask_step(state, frozen, data, jax.random.key(i), hparams)
        metrics.append(step_metrics)
    return state, metrics


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("adversary", ADVERSARIES)
def test_every_combination_keeps_the_mask_in_the_unit_box(tiny, mask, adversary):
    config = AblationConfig(mask=mask, adversary=adversary, l1=True, gamma=1e-2, mask_lr=0.5,
                            batch_size=8, tau=5.0, trigger_lr=0.5)
    state, metrics = _mask_steps(tiny, config)
    values = np.concatenate([np.asarray(m).ravel() for m in jax.tree_util.tree_leaves(
        state.mask)])
    assert values.min() >= 0.0 and values.max() <= 1.0 and values.min() < 1.0
    # conv kernel entries (3x3x1x4 + 3x3x4x6) vs BatchNorm channels (4 + 6)
    assert values.size == (252 if mask == "weight" else 10)
    assert all(float(m["finite"]) == 1.0 for m in metrics)
    if adversary != "trigger":  # the noise ascent makes the perturbed loss the larger one
        assert float(metrics[0]["adversarial_ce"]) > float(metrics[0]["natural_ce"])


@pytest.mark.parametrize("mask", MASKS)
def test_l1_switch_adds_gamma_times_the_mask_norm(tiny, mask):
    base = AblationConfig(mask=mask, gamma=0.01, batch_size=8)
    (_, [off]), (_, [on]) = (_mask_steps(tiny, config, count=1)  # same mask, key and noise
                             for config in (base, dataclasses.replace(base, l1=True)))
    np.testing.assert_allclose(float(on["loss"]) - float(off["loss"]),
                               0.01 * float(on["mask_l1"]), rtol=1e-4)


def test_neuron_switches_need_batchnorm():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3)(nn.Conv(2, (3, 3))(x).reshape(x.shape[0], -1))

    params = MLP().init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))["params"]
    variables = {"params": params, "batch_stats": {}}
    with pytest.raises(ValueError, match="BatchNorm"):
        make_ablation_steps(MLP(), AblationConfig(), variables, 4)
    with pytest.raises(ValueError, match="BatchNorm"):
        make_ablation_steps(MLP(), AblationConfig(mask="weight"), variables, 4)
    make_ablation_steps(MLP(), preset("awm"), variables, 4)  # weight mask + trigger: fine


# Shrunk so that each row takes a few seconds on 2 CPU cores (tiny digits backdoor, 150 images).
_TRIGGER = {"batch_size": 32, "inner_passes": 1, "tau": 100.0}
_SMALL = {"anp": {"iterations": 40, "batch_size": 64},
          "weight_mask": {"iterations": 40, "batch_size": 64},
          "weight_mask_trigger": {"epochs": 4, **_TRIGGER},
          "awm": {"epochs": 10, "mask_lr": 0.05, **_TRIGGER}}


@pytest.mark.parametrize("row", AblationConfig.PRESETS)
def test_each_table4_row_runs_on_a_real_backdoor(row):
    backdoor = tiny_backdoor()
    config = preset(row, **_SMALL[row])
    result = purify("ablation", backdoor.model, backdoor.variables, backdoor.clean,
                    jax.random.key(0), config, num_classes=backdoor.num_classes,
                    progress=False)
    chex.assert_trees_all_equal_structs(result.variables, backdoor.variables)
    after = backdoor.evaluate(result.variables)
    assert after["acc"] > 0.85
    assert result.details["iterations"] == result.history[-1]["iteration"]
    if row == "awm":
        # Measured: ASR 0.99 -> 0.53 at ACC 0.96 (10 epochs; the official 20 go lower).
        assert after["asr"] < backdoor.before["asr"] - 0.25
