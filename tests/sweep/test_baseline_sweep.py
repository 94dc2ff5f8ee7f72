"""Vmapped FT and ANP sweeps: members equal ``purify`` alone, clear errors, 4 fake devices equal
1, the job (table, plots) on synthetic data, and ``awm-jax sweep --defense ft|anp`` end to end
(the CLI runs on digits are marked slow)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest
from baseline_sweep_fixtures import CONFIGS, SPECS, as_json, tiny_setup

from awm_jax.attacks.base import TriggeredTestSet, create_attack
from awm_jax.checkpoint import save_model
from awm_jax.cli import main
from awm_jax.data.clean_subset import CleanDataConfig
from awm_jax.data.dataset import ImageDataset, Split
from awm_jax.defenses import purify
from awm_jax.defenses.anp import ANPConfig
from awm_jax.defenses.finetune import FTConfig
from awm_jax.eval.metrics import backdoor_metrics, make_predict_fn
from awm_jax.models import create_model, init_variables
from awm_jax.pipeline import purify_model
from awm_jax.sweep.adapters import get_adapter
from awm_jax.sweep.baselines import run_baseline_sweep
from awm_jax.sweep.evaluate import evaluate_members
from awm_jax.sweep.job import sweep_model
from awm_jax.sweep.spec import SweepSpec, member_keys, sweepable

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


@pytest.fixture(scope="module")
def swept(setup):
    model, variables, clean = setup
    return {name: run_baseline_sweep(name, model, variables, clean, CONFIGS[name], SPECS[name],
                                     progress=False) for name in ("ft", "anp")}


def _eval_set():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(9, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 3, 9).astype(np.int32)
    triggered = TriggeredTestSet(np.clip(images + 0.5, 0, 1), labels, np.zeros(9, np.int32),
                                 labels != 0)
    return Split(images, labels), triggered


@pytest.mark.parametrize("defense", ["ft", "anp"])
def test_each_member_equals_purify_alone(setup, swept, defense):
    """Every member's purified model, history, details and metrics equal the defense's own
    (jitted) ``purify`` with the member's settings and its seed's defense key."""
    model, variables, clean = setup
    result, spec = swept[defense], SPECS[defense]
    assert result.num_members == 4 and not result.diverged.any()
    eval_split, triggered = _eval_set()
    metrics = evaluate_members(model, variables, result.outputs, eval_split, triggered,
                               batch_size=4, purified=get_adapter(defense).purified)
    predict = make_predict_fn(model)
    pruned = set()
    for index, (member, config) in enumerate(zip(spec.members(), spec.configs(CONFIGS[defense]))):
        alone = purify(defense, model, variables, clean, member_keys(member["seed"])["defense"],
                       config, progress=False)
        chex.assert_trees_all_close(result.purified(variables, index), alone.variables,
                                    rtol=RTOL, atol=ATOL)
        assert len(alone.history) == result.history["loss"].shape[0]
        for name, values in result.history.items():
            np.testing.assert_allclose(values[:, index], [h[name] for h in alone.history],
                                       rtol=RTOL, atol=ATOL, err_msg=name)
        if defense == "anp":
            details = result.details(index)
            assert details["pruned"] == alone.details["pruned"]
            assert details["mask_mean"] == pytest.approx(alone.details["mask_mean"], rel=RTOL)
            pruned.add(details["pruned"])
        expected = backdoor_metrics(predict(alone.variables, eval_split.images),
                                    eval_split.labels, predict(alone.variables, triggered.images),
                                    triggered)
        assert metrics[index] == pytest.approx(expected)
    if defense == "anp":  # the swept threshold matters: members prune different counts
        assert len(pruned) > 1


def test_chunked_with_padding_equals_unchunked_and_flags_divergence(setup, swept):
    """Chunks of 3 for 4 members (the second padded with 2 copies); an lr of 1e30 diverges:
    flagged and warned about, and the sweep still finishes the others."""
    model, variables, clean = setup
    spec = SweepSpec(zip={**SPECS["ft"].zip, "learning_rate": [0.01, 1e30]}, seeds=[0, 1],
                     defense="ft")
    with pytest.warns(RuntimeWarning, match=r"members \[1, 3\]"):
        chunked = run_baseline_sweep("ft", model, variables, clean, CONFIGS["ft"], spec,
                                     chunk_size=3, progress=False)
    assert chunked.chunk_size == 3
    assert chunked.diverged.tolist() == [False, True] * 2
    finite = [0, 2]
    chex.assert_trees_all_close(*(jax.tree_util.tree_map(lambda x: x[finite], r.outputs)
                                  for r in (chunked, swept["ft"])), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(chunked.history["loss"][:, finite],
                               swept["ft"].history["loss"][:, finite], rtol=RTOL)


def test_stacked_hparams_and_keys_equal_a_spec(setup, swept):
    model, variables, clean = setup
    hparams, keys = SPECS["anp"].stack(CONFIGS["anp"])
    assert hparams.threshold.shape == (4,) and hparams.threshold.dtype == np.float32
    result = run_baseline_sweep("anp", model, variables, clean, CONFIGS["anp"], hparams, keys,
                                progress=False)
    chex.assert_trees_all_equal(result.outputs, swept["anp"].outputs)


@pytest.mark.parametrize("defense, static", [("ft", "epochs"), ("ft", "nesterov"),
                                             ("anp", "noise_steps"), ("anp", "iterations")])
def test_bad_names_list_the_defenses_sweepable_ones(defense, static):
    with pytest.raises(ValueError, match="static config fields") as error:
        SweepSpec(grid={static: [1, 2]}, defense=defense)
    assert all(name in str(error.value) for name in sweepable(defense))
    with pytest.raises(ValueError, match=f"sweepable names for {defense}") as error:
        SweepSpec(zip={"tau": [1.0]}, defense=defense)  # an AWM name
    assert all(name in str(error.value) for name in sweepable(defense))
    assert sweepable("ft") == ("learning_rate", "momentum", "weight_decay")
    assert sweepable("anp") == ("eps", "alpha", "mask_lr", "momentum", "threshold")


def test_run_baseline_sweep_rejects_bad_arguments(setup):
    model, variables, clean = setup
    spec = SPECS["ft"]
    with pytest.raises(ValueError, match="sweepable defenses"):
        SweepSpec(defense="nad")
    with pytest.raises(ValueError, match="ft"):  # the message lists the known adapters
        run_baseline_sweep("awm", model, variables, clean, CONFIGS["ft"], spec)
    with pytest.raises(ValueError, match="AWM sweeps only"):
        run_baseline_sweep("ft", model, variables, clean, CONFIGS["ft"], spec, workdir="w")
    with pytest.raises(ValueError, match="defense='anp'"):
        run_baseline_sweep("anp", model, variables, clean, CONFIGS["anp"], spec)
    with pytest.raises(TypeError, match="needs a FTConfig"):
        run_baseline_sweep("ft", model, variables, clean, CONFIGS["anp"], spec)
    hparams, keys = SPECS["anp"].stack(CONFIGS["anp"])
    with pytest.raises(TypeError, match="stacked SGDHparams"):
        run_baseline_sweep("ft", model, variables, clean, CONFIGS["ft"], hparams, keys)
    with pytest.raises(ValueError, match="out of range|learning_rate must be"):
        SweepSpec(grid={"learning_rate": [-1.0]}, defense="ft").stack(FTConfig())
    with pytest.raises(ValueError, match="threshold must be in"):
        SweepSpec(grid={"threshold": [1.5]}, defense="anp").stack(ANPConfig())
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        run_baseline_sweep("ft", model, variables, clean, CONFIGS["ft"], spec, chunk_size=0)


@pytest.mark.parametrize("defense", ["ft", pytest.param("anp", marks=pytest.mark.slow)])
def test_four_fake_cpu_devices_equal_one(swept, defense):
    """A (4 sweep x 1 data) mesh: one member per device (ANP's frozen model replicated, its
    masks sharded)."""
    script = Path(__file__).with_name("baseline_sweep_fixtures.py")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(script), defense], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    payload = json.loads(out.stdout.strip().splitlines()[-1])
    assert payload["devices"] == 4 and payload["mesh"] == {"sweep": 4, "data": 1}
    expected = as_json(swept[defense])
    assert payload[defense]["chunk_size"] == 4
    for got, want in zip(payload[defense]["outputs"], expected["outputs"], strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    for key, values in expected["history"].items():
        np.testing.assert_allclose(payload[defense]["history"][key], values, rtol=RTOL,
                                   atol=ATOL)


def test_sweep_model_rows_equal_purify_model_and_write_the_report(setup, tmp_path):
    """The job path (clean draw per seed, vmapped ANP, vmapped evaluation, table and plots) on
    a synthetic dataset; a member's metrics equal ``purify_model`` with its seed."""
    model, variables, _ = setup
    rng = np.random.default_rng(0)
    split = lambda n: Split(rng.uniform(size=(n, 8, 8, 1)).astype(np.float32),
                            (np.arange(n) % 3).astype(np.int32))
    dataset = ImageDataset("synthetic", split(30), split(42), ("a", "b", "c"))
    attack = create_attack("badnets", target=0, patch_size=2)
    clean = CleanDataConfig(n_clean=12, flip=False)
    # One seed group of 4 members on 12 clean images: the shapes of the `swept` fixture, whose
    # compiled steps it reuses.
    spec = SweepSpec(grid={"threshold": [0.7, 0.8, 0.85, 0.9]}, seeds=[1], defense="anp")
    table = sweep_model(model, variables, dataset, attack, CONFIGS["anp"], spec, clean=clean,
                        out_dir=tmp_path, progress=False)
    rows = table["rows"]
    assert table["defense"] == "anp" and table["config"] == CONFIGS["anp"].to_dict()
    assert [(r["seed"], r["threshold"]) for r in rows] == [(1, 0.7), (1, 0.8), (1, 0.85),
                                                            (1, 0.9)]
    assert {"channels", "pruned", "mask_mean", "diverged", "final_loss", "before_acc"} <= set(
        rows[0])
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"] == rows
    assert (tmp_path / "sweep.csv").read_text().count("\n") == 5
    assert (tmp_path / "heatmap.png").stat().st_size > 0
    assert (tmp_path / "pareto.png").stat().st_size > 0
    config = dataclasses.replace(CONFIGS["anp"], threshold=0.85)
    single = purify_model(model, variables, dataset, attack, model_name="small_cnn",
                          defense="anp", defense_config=config, clean=clean, seed=1,
                          progress=False)
    for metric in ("acc", "asr", "asr_all", "ra"):
        assert rows[3][metric] == pytest.approx(single["after"][metric], abs=1e-6)
        assert rows[3][f"before_{metric}"] == pytest.approx(single["before"][metric])
    with pytest.raises(ValueError, match="AWM sweeps only"):
        sweep_model(model, variables, dataset, attack, CONFIGS["anp"], spec, clean=clean,
                    workdir=tmp_path / "w")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained small CNN saved as a digits/BadNets checkpoint (no training: cheap)."""
    model = create_model("small_cnn", 10, features=(4,))
    variables = init_variables(model, jax.random.key(0), (16, 16, 1))
    directory = tmp_path_factory.mktemp("model") / "bd"
    save_model(directory, "small_cnn", {"features": [4]}, 10, (16, 16, 1), variables,
               {"dataset": {"name": "digits"},
                "attack": {"name": "badnets", "params": {"target": 0, "patch_size": 3}}})
    return directory


COMMON = ["--one-shot", "--no-flip", "--quiet"]
CLI_FLAGS = {"ft": ["--grid", "learning_rate=0.01,0.1", "--ft-epochs", "2"],
             "anp": ["--grid", "threshold=0.2,0.9", "--anp-iterations", "3",
                     "--anp-batch-size", "8"]}


def _cli_sweep(checkpoint, out, defense):
    assert main(["sweep", "--defense", defense, "--checkpoint", str(checkpoint), *COMMON,
                 *CLI_FLAGS[defense], "--seeds", "0", "1", "--out", str(out)]) == 0
    return json.loads((out / "sweep.json").read_text())


@pytest.fixture(scope="module")
def ft_cli_table(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft_sweep")
    return out, _cli_sweep(checkpoint, out, "ft")


@pytest.mark.slow
def test_sweep_cli_writes_table_and_plots(ft_cli_table):
    out, table = ft_cli_table
    assert table["defense"] == "ft" and table["config"] == FTConfig(epochs=2).to_dict()
    rows = table["rows"]
    assert [(r["seed"], r["learning_rate"]) for r in rows] == [(0, 0.01), (0, 0.1), (1, 0.01),
                                                                (1, 0.1)]
    assert all(0.0 <= r[m] <= 1.0 for r in rows for m in ("acc", "asr", "asr_all", "ra"))
    assert not any(r["diverged"] for r in rows)
    assert (out / "sweep.csv").read_text().count("\n") == 5
    assert (out / "heatmap.png").stat().st_size > 0 and (out / "pareto.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["ft", "anp"])
def test_sweep_cli_member_equals_purify(checkpoint, ft_cli_table, tmp_path, defense):
    """Member (seed 1, second value) equals ``awm-jax purify`` with its seed and settings."""
    table = ft_cli_table[1] if defense == "ft" else _cli_sweep(checkpoint, tmp_path, defense)
    name, values = CLI_FLAGS[defense][1].split("=")
    member = table["rows"][3]
    assert member["seed"] == 1 and member[name] == float(values.split(",")[1])
    assert main(["purify", "--defense", defense, "--checkpoint", str(checkpoint), *COMMON,
                 *CLI_FLAGS[defense][2:], "--seed", "1",
                 f"--{defense}-{name.replace('_', '-')}", values.split(",")[1],
                 "--out", str(tmp_path / "single")]) == 0
    single = json.loads((tmp_path / "single" / "report.json").read_text())["after"]
    for metric in ("acc", "asr", "asr_all", "ra"):
        assert member[metric] == pytest.approx(single[metric], abs=1e-6)


def test_sweep_cli_refuses_workdir_and_foreign_flags(tmp_path, capsys):
    """Refused before the checkpoint is read (it does not exist here)."""
    common = ["sweep", "--checkpoint", str(tmp_path / "absent"), *COMMON, "--out",
              str(tmp_path)]
    assert main([*common, "--defense", "ft", "--workdir", str(tmp_path / "w")]) == 2
    assert "supported for AWM sweeps only" in capsys.readouterr().err
    assert main([*common, "--defense", "ft", "--awm-tau", "5"]) == 2
    assert "--awm-* set" in capsys.readouterr().err
    assert main([*common, "--defense", "anp", "--grid", "learning_rate=0.1"]) == 2
    assert "sweepable names for anp" in capsys.readouterr().err
