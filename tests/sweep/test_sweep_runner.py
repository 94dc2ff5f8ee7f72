"""The vmapped sweep equals single runs, chunking changes nothing, 4 fake devices equal 1."""

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from sweep_fixtures import as_json, tiny_setup

from awm_jax.attacks.base import TriggeredTestSet
from awm_jax.data.dataset import Split
from awm_jax.defenses.awm import Frozen, make_awm_steps, run_awm
from awm_jax.defenses.awm.runner import _Driver
from awm_jax.eval.metrics import backdoor_metrics, make_predict_fn, predict_in_batches
from awm_jax.sweep.evaluate import evaluate_members
from awm_jax.sweep.mesh import make_sweep_mesh, shard_members
from awm_jax.sweep.runner import estimate_chunk_size, resolve_member_loop, run_sweep
from awm_jax.sweep.spec import SweepSpec, member_keys

ATOL = 1e-5


@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


@pytest.fixture(scope="module", params=["vmap", "loop"])
def swept(setup, request):
    """The sweep with its members vmapped, and with each member's single-run step in turn."""
    model, variables, clean, config, spec = setup
    return run_sweep(model, variables, clean, config, spec, progress=False,
                     member_loop=request.param)


def _alone(driver, frozen, data, member_config, key):
    """One member through run_awm's own (unbatched) jitted driver, in its key order."""
    hparams = member_config.hparams()
    state = driver.steps.init(frozen.params, data, hparams)
    epochs_key = jax.random.split(key)[1]
    history = []
    for epoch in range(member_config.outer_epochs):
        epoch_key = jax.random.fold_in(epochs_key, epoch)
        state, trigger_metrics = driver.trigger_phase(state, frozen, data, epoch_key, hparams)
        state, mask_metrics = driver.mask_phase(state, frozen, data, epoch_key, hparams)
        history.append({k: float(v) for k, v in {**trigger_metrics, **mask_metrics}.items()})
    return state.mask, history


def test_each_member_equals_running_it_alone(setup, swept):
    model, variables, clean, config, spec = setup
    assert swept.num_members == 4 and swept.history["loss"].shape == (2, 4)
    data = {"image": jax.numpy.asarray(clean.images), "label": jax.numpy.asarray(clean.labels)}
    frozen = Frozen(variables["params"], variables["batch_stats"])
    driver = _Driver(make_awm_steps(model, config, len(clean.labels)), config)  # compiled once
    for index, (member, member_config) in enumerate(zip(spec.members(), spec.configs(config))):
        mask, history = _alone(driver, frozen, data, member_config,
                               member_keys(member["seed"])["defense"])
        chex.assert_trees_all_close(swept.member_mask(index), mask, atol=ATOL)
        assert set(swept.history) == set(history[0])
        for name, values in swept.history.items():
            np.testing.assert_allclose(values[:, index], [h[name] for h in history],
                                       rtol=1e-5, atol=ATOL, err_msg=name)


def test_a_member_equals_run_awm_with_the_pipeline_key(setup, swept):
    model, variables, clean, config, spec = setup
    index = 3
    alone = run_awm(model, variables, clean, spec.configs(config)[index],
                    member_keys(spec.members()[index]["seed"])["defense"], progress=False)
    chex.assert_trees_all_close(swept.member_mask(index), alone.mask, atol=ATOL)
    for epoch, record in enumerate(alone.history):
        for name in ("loss", "trigger_ce", "trigger_l1", "clean_acc", "mask_l1"):
            np.testing.assert_allclose(swept.history[name][epoch, index], record[name],
                                       rtol=1e-4, atol=ATOL)


def test_chunked_equals_unchunked(setup, swept):
    model, variables, clean, config, spec = setup
    chunked = run_sweep(model, variables, clean, config, spec, chunk_size=3, progress=False)
    assert chunked.chunk_size == 3  # 4 members -> chunks of 3 + (1 + 2 padding)
    chex.assert_trees_all_close(chunked.masks, swept.masks, atol=ATOL)
    np.testing.assert_allclose(chunked.history["loss"], swept.history["loss"], rtol=1e-5)


@pytest.mark.slow
def test_scan_loop_equals_python_loop(setup, swept):
    model, variables, clean, config, spec = setup
    scanned = run_sweep(model, variables, clean, dataclasses.replace(config, loop="scan"), spec,
                        chunk_size=2, progress=False)
    chex.assert_trees_all_close(scanned.masks, swept.masks, atol=ATOL)
    np.testing.assert_allclose(scanned.history["loss"], swept.history["loss"], rtol=1e-5)


@pytest.mark.parametrize("selection", ["min_robust_loss", pytest.param("average",
                                                                       marks=pytest.mark.slow)])
def test_mask_selection_per_member_matches_run_awm(setup, selection):
    """Each member selects on its own; seeds in the spec so run_awm compiles once per alpha."""
    model, variables, clean, config, _ = setup
    config = dataclasses.replace(config, mask_selection=selection, outer_epochs=4)
    spec = SweepSpec(grid={"alpha": [0.5, 0.9]}, seeds=[0, 1])
    result = run_sweep(model, variables, clean, config, spec, progress=False)
    assert result.selected_epoch.shape == (4,) and result.selected_epoch.dtype == np.int32
    for index, (member, member_config) in enumerate(zip(spec.members(), spec.configs(config))):
        alone = run_awm(model, variables, clean, member_config,
                        member_keys(member["seed"])["defense"], progress=False)
        chex.assert_trees_all_close(result.member_mask(index), alone.mask, atol=ATOL)
        assert result.selected_epoch[index] == alone.selected_epoch
        if selection == "min_robust_loss":
            np.testing.assert_allclose(result.history["selection_score"][:, index],
                                       [h["selection_score"] for h in alone.history], rtol=1e-5)
    if selection == "average":
        assert set(result.selected_epoch) == {3}
    else:  # this setup's members pick different epochs: the choice is per member
        assert len(set(result.selected_epoch)) > 1


def test_chunk_size_estimate():
    assert estimate_chunk_size(1000, 10, available_bytes=1 << 40) == 10
    assert estimate_chunk_size(1000, 10, available_bytes=4 * 16 * 1000 * 3) == 3
    assert estimate_chunk_size(1000, 10, multiple=4, available_bytes=1) == 4
    assert estimate_chunk_size(1000, 10, multiple=4, available_bytes=1 << 40) == 12


def test_vmapped_evaluation_equals_per_member_predict(setup, swept):
    model, variables, _, _, _ = setup
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(7, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 3, 7).astype(np.int32)
    triggered = TriggeredTestSet(np.clip(images + 0.5, 0, 1), labels, np.zeros(7, np.int32),
                                 labels != 0)
    metrics = evaluate_members(model, variables, swept.masks, Split(images, labels), triggered,
                               batch_size=3, member_chunk=3)
    predict = make_predict_fn(model)
    for index, member_metrics in enumerate(metrics):
        member_predict = functools.partial(predict, swept.purified(variables, index))
        expected = backdoor_metrics(predict_in_batches(member_predict, images, 3), labels,
                                    predict_in_batches(member_predict, triggered.images, 3),
                                    triggered)
        assert member_metrics == pytest.approx(expected)


def test_mesh_errors():
    with pytest.raises(ValueError, match="needs 8 devices"):
        make_sweep_mesh(sweep=8, devices=jax.devices()[:1])
    mesh = make_sweep_mesh(sweep=1)
    assert dict(mesh.shape) == {"sweep": 1, "data": 1}
    assert shard_members(np.zeros((3, 2)), mesh).shape == (3, 2)


@pytest.mark.parametrize("data_axis,selection", [
    (1, "last"), pytest.param(2, "last", marks=pytest.mark.slow),
    pytest.param(1, "min_robust_loss", marks=pytest.mark.slow)])
def test_four_fake_cpu_devices_equal_one(setup, swept, data_axis, selection):
    """Mesh (4 sweep x 1 data), and (2 sweep x 2 data) with the clean set split too."""
    if selection != "last":
        model, variables, clean, config, spec = setup
        swept = run_sweep(model, variables, clean,
                          dataclasses.replace(config, mask_selection=selection), spec,
                          progress=False)
    script = Path(__file__).with_name("sweep_fixtures.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(script), str(data_axis), selection], env=env,
                         capture_output=True, text=True, timeout=300, check=True)
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    assert payload["devices"] == 4
    assert payload["mesh"] == {"sweep": 4 // data_axis, "data": data_axis}
    assert payload["member_sharding"] == "P('sweep',)"
    expected = as_json(swept)
    assert payload["selected_epoch"] == expected["selected_epoch"]
    for got, want in zip(payload["masks"], expected["masks"]):
        np.testing.assert_allclose(got, want, atol=ATOL)
    for name, values in expected["history"].items():
        np.testing.assert_allclose(payload["history"][name], values, rtol=1e-4, atol=ATOL)


def test_run_sweep_rejects_bad_arguments(setup):
    model, variables, clean, config, spec = setup
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        run_sweep(model, variables, clean, config, spec, chunk_size=0)
    hparams, keys = spec.stack(config)
    with pytest.raises(ValueError, match="number of keys"):
        run_sweep(model, variables, clean, config, hparams, keys[:3])


def test_member_loop_is_a_loop_on_one_cpu_device_and_names_bad_values():
    assert jax.default_backend() == "cpu"
    assert resolve_member_loop("auto") == "loop"
    assert resolve_member_loop("vmap") == "vmap" and resolve_member_loop("loop") == "loop"
    with pytest.raises(ValueError, match="member_loop must be one of"):
        resolve_member_loop("pmap")


def test_a_looped_member_is_bit_identical_to_its_single_run(setup):
    model, variables, clean, config, spec = setup
    looped = run_sweep(model, variables, clean, config, spec, progress=False,
                       member_loop="loop")
    index = 2
    alone = run_awm(model, variables, clean, spec.configs(config)[index],
                    member_keys(spec.members()[index]["seed"])["defense"], progress=False)
    chex.assert_trees_all_equal(looped.member_mask(index), alone.mask)
