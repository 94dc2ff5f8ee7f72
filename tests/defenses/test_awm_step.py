"""AWM's pure steps: ascent ascends, descent descends, vmap and scan agree with loops."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.data.dataset import Split
from awm_jax.defenses.awm import AWMConfig, Frozen, make_awm_steps, run_awm
from awm_jax.models import create_model, init_variables

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def setup():
    model = create_model("small_cnn", NUM_CLASSES, features=(4, 6))
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    images = jax.random.uniform(jax.random.key(1), (12, 8, 8, 1))
    labels = jnp.arange(12, dtype=jnp.int32) % NUM_CLASSES
    data = {"image": images, "label": labels}
    frozen = Frozen(variables["params"], variables["batch_stats"])
    return model, variables, frozen, data


def _steps(setup, **overrides):
    model, _, frozen, data = setup
    config = AWMConfig(**{"batch_size": 4, "inner_passes": 1, "tau": 5.0, **overrides})
    steps = make_awm_steps(model, config, data["label"].shape[0])
    state = steps.init(frozen.params, data, config.hparams())
    return config, steps, steps.begin_epoch(state, frozen, data, config.hparams())


@pytest.mark.parametrize("jit", [False, True])
def test_trigger_step_increases_the_loss_it_ascends(setup, jit):
    _, _, frozen, data = setup
    config, steps, state = _steps(setup, trigger_lr=0.5)
    step = jax.jit(steps.trigger_step) if jit else steps.trigger_step
    key = jax.random.key(3)
    state, before = step(state, frozen, data, key, config.hparams())
    _, after = step(state, frozen, data, key, config.hparams())  # same batch, moved trigger
    assert float(after["trigger_ce"]) > float(before["trigger_ce"])


@pytest.mark.parametrize("jit", [False, True])
def test_mask_step_lowers_its_loss_and_keeps_mask_in_unit_box(setup, jit):
    _, _, frozen, data = setup
    config, steps, state = _steps(setup, mask_lr=0.05, gamma=1e-3)
    state = state.replace(trigger=0.3 * jnp.ones_like(state.trigger))
    step = jax.jit(steps.mask_step) if jit else steps.mask_step
    key = jax.random.key(4)
    state, before = step(state, frozen, data, key, config.hparams())
    _, after = step(state, frozen, data, key, config.hparams())
    assert float(after["loss"]) < float(before["loss"])
    for leaf in jax.tree_util.tree_leaves(state.mask):
        assert float(leaf.min()) >= 0.0 and float(leaf.max()) <= 1.0


def test_outer_loss_matches_hand_computation(setup):
    model, _, frozen, data = setup
    config, steps, state = _steps(setup, alpha=0.7, beta=0.2, gamma=1e-3)
    trigger = 0.1 * jnp.ones_like(state.trigger)
    state = state.replace(trigger=trigger)
    key = jax.random.key(5)
    _, metrics = steps.mask_step(state, frozen, data, key, config.hparams())
    index = np.asarray(jax.random.randint(key, (4,), 0, 12))
    images, labels = np.asarray(data["image"])[index], np.asarray(data["label"])[index]

    def ce(x):
        logits = np.asarray(model.apply({"params": frozen.params,
                                         "batch_stats": frozen.batch_stats}, x))
        logits = logits - logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -log_probs[np.arange(4), labels].mean()

    l1 = 1 * 9 * 4 + 4 * 9 * 6  # all-ones mask
    expected = 0.7 * ce(images) + 0.2 * ce(np.clip(images + 0.1, 0, 1)) + 1e-3 * l1
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("chunks", [2, 3])
def test_chunked_mask_step_equals_the_whole_batch(setup, jit, chunks):
    _, _, frozen, data = setup
    key = jax.random.key(10)
    outcomes = []
    for mask_chunks in (1, chunks):
        config, steps, state = _steps(setup, mask_lr=0.05, gamma=1e-3, batch_size=6,
                                      mask_chunks=mask_chunks)
        state = state.replace(trigger=0.2 * jnp.ones_like(state.trigger))
        step = jax.jit(steps.mask_step) if jit else steps.mask_step
        outcomes.append(step(state, frozen, data, key, config.hparams()))
    (whole_state, whole_metrics), (chunked_state, chunked_metrics) = outcomes
    chex.assert_trees_all_close(chunked_state.mask, whole_state.mask, atol=1e-6)
    chex.assert_trees_all_close(chunked_metrics, whole_metrics, rtol=1e-5, atol=1e-6)
    assert any(float(jnp.abs(leaf - 1.0).max()) > 1e-3  # the step moved the mask
               for leaf in jax.tree_util.tree_leaves(whole_state.mask))


def test_chunked_mask_step_vmaps_like_its_members(setup):
    _, _, frozen, data = setup
    config, steps, state = _steps(setup, mask_lr=0.05, gamma=1e-3, mask_chunks=2)
    hparams = [config.hparams(), dataclasses.replace(config, alpha=0.5).hparams()]
    stacked_hparams = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *hparams)
    stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), state)
    keys = jax.random.split(jax.random.key(11), 2)
    batch_state, _ = jax.jit(jax.vmap(steps.mask_step, in_axes=(0, None, None, 0, 0)))(
        stacked, frozen, data, keys, stacked_hparams)
    for member in range(2):
        alone, _ = jax.jit(steps.mask_step)(state, frozen, data, keys[member], hparams[member])
        chex.assert_trees_all_close(
            jax.tree_util.tree_map(lambda x: x[member], batch_state.mask), alone.mask,
            atol=1e-6)


def test_beta_tied_to_one_minus_alpha_by_default(setup):
    config = AWMConfig(alpha=0.8)
    np.testing.assert_allclose(config.hparams().beta, 0.2, rtol=1e-6)
    assert config.tie_beta and not AWMConfig(beta=0.5).tie_beta


def test_vmapped_epoch_equals_each_member_alone(setup):
    _, _, frozen, data = setup
    configs = [AWMConfig(batch_size=4, inner_passes=1, tau=5.0, alpha=0.9, gamma=1e-8),
               AWMConfig(batch_size=4, inner_passes=1, tau=2.0, alpha=0.5, gamma=1e-3)]
    steps = make_awm_steps(setup[0], configs[0], 12)  # static settings equal in both
    hparams = [c.hparams() for c in configs]
    keys = jax.random.split(jax.random.key(6), 2)
    states = [steps.init(frozen.params, data, h) for h in hparams]
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *states)
    stacked_hparams = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *hparams)
    vmapped = jax.jit(jax.vmap(steps.epoch_step, in_axes=(0, None, None, 0, 0)))
    batch_state, batch_metrics = vmapped(stacked, frozen, data, keys, stacked_hparams)
    for member in range(2):
        alone_state, alone_metrics = jax.jit(steps.epoch_step)(
            states[member], frozen, data, keys[member], hparams[member])
        chex.assert_trees_all_close(
            jax.tree_util.tree_map(lambda x: x[member], batch_state.mask), alone_state.mask,
            atol=1e-5)
        chex.assert_trees_all_close(batch_state.trigger[member], alone_state.trigger, atol=1e-5)
        np.testing.assert_allclose(batch_metrics["loss"][member], alone_metrics["loss"],
                                   rtol=1e-5)


def test_python_loop_and_scan_give_the_same_mask(setup):
    model, variables, _, data = setup
    clean = Split(np.asarray(data["image"]), np.asarray(data["label"]))
    base = AWMConfig(batch_size=4, inner_passes=1, tau=5.0, outer_epochs=2, gamma=1e-3)
    results = [run_awm(model, variables, clean, dataclasses.replace(base, loop=loop),
                       jax.random.key(7), progress=False) for loop in ("python", "scan")]
    chex.assert_trees_all_close(results[0].mask, results[1].mask, atol=1e-5)
    assert [h["epoch"] for h in results[0].history] == [1, 2]


def test_fewer_images_than_batch_still_trains(setup):
    model, variables, _, data = setup
    steps = make_awm_steps(model, AWMConfig(batch_size=128, inner_passes=5), 12)
    assert steps.batch_size == 12 and steps.steps_per_phase == 5
    clean = Split(np.asarray(data["image"][:3]), np.asarray(data["label"][:3]))
    result = run_awm(model, variables, clean, AWMConfig(outer_epochs=1, gamma=1e-2),
                     jax.random.key(8), progress=False)
    assert result.mask_stats["mean"] < 1.0  # the mask moved


def test_mask_selection_returns_a_scored_epoch(setup):
    model, variables, _, data = setup
    clean = Split(np.asarray(data["image"]), np.asarray(data["label"]))
    config = AWMConfig(batch_size=4, inner_passes=1, tau=5.0, outer_epochs=3,
                       mask_selection="min_robust_loss")
    result = run_awm(model, variables, clean, config, jax.random.key(9), progress=False)
    scores = {h["epoch"]: h["selection_score"] for h in result.history}
    assert set(scores) == {1, 2, 3}
    assert result.selected_epoch == min(scores, key=scores.get)


@pytest.mark.parametrize("field,value,match", [
    ("alpha", 1.5, "alpha must be in"), ("gamma", -1.0, "gamma must be in"),
    ("tau", 0.0, "tau must be a finite number > 0"), ("trigger_lr", float("inf"), "trigger_lr"),
    ("gamma", float("nan"), "gamma must be in"), ("outer_epochs", 0, "outer_epochs must be >= 1"),
    ("inner_labels", "guess", "inner_labels must be one of"), ("lr_decay", 0.0, "lr_decay"),
    ("mask_chunks", 0, "mask_chunks must be .auto. or an integer >= 1"),
    ("mask_chunks", "many", "mask_chunks must be .auto. or an integer >= 1"),
])
def test_config_rejects_nonsense(field, value, match):
    with pytest.raises(ValueError, match=match):
        AWMConfig(**{field: value})


def test_run_awm_rejects_bad_clean_data(setup):
    model, variables, _, data = setup
    bad = Split(np.asarray(data["image"]) * 3.0, np.asarray(data["label"]))
    with pytest.raises(ValueError, match=r"clean images must lie in \[0, 1\]"):
        run_awm(model, variables, bad, AWMConfig(), jax.random.key(0), progress=False)
    bad_labels = Split(np.asarray(data["image"]), np.asarray(data["label"]) + 5)
    with pytest.raises(ValueError, match="clean labels must lie in"):
        run_awm(model, variables, bad_labels, AWMConfig(), jax.random.key(0),
                num_classes=NUM_CLASSES, progress=False)
