"""Exporting models: npz / safetensors / orbax round trips give identical logits; bad files fail."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.checkpoint import load_model, save_model
from awm_jax.export import (export_checkpoint, export_model, flatten_variables, load_npz,
                            load_safetensors, save_npz, save_safetensors)
from awm_jax.models import apply_model, create_model, init_variables

MODEL_KWARGS = {"features": (4, 6)}
IMAGE_SHAPE = (8, 8, 1)
SPEC = {"name": "small_cnn", "kwargs": MODEL_KWARGS, "num_classes": 3,
        "image_shape": list(IMAGE_SHAPE)}


@pytest.fixture(scope="module")
def model_and_variables():
    model = create_model("small_cnn", 3, **MODEL_KWARGS)
    variables = init_variables(model, jax.random.key(0), IMAGE_SHAPE)
    variables["batch_stats"] = jax.tree.map(lambda x: x + 0.25, variables["batch_stats"])
    return model, variables


@pytest.fixture(scope="module")
def logits(model_and_variables):
    model = model_and_variables[0]
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, *IMAGE_SHAPE)), jnp.float32)
    forward = jax.jit(lambda v: apply_model(model, v["params"], v["batch_stats"], images)[0])
    return lambda variables: np.asarray(forward(variables))


def test_names_are_variable_paths(model_and_variables):
    names = flatten_variables(model_and_variables[1])
    assert "params/Conv_0/kernel" in names and "batch_stats/BatchNorm_0/mean" in names
    assert names["params/Conv_0/kernel"].shape == (3, 3, 1, 4)


@pytest.mark.parametrize("fmt, load", [("npz", load_npz), ("safetensors", load_safetensors)])
def test_file_round_trip_gives_identical_logits(tmp_path, model_and_variables, logits, fmt,
                                                load):
    model, variables = model_and_variables
    path = export_model(tmp_path / f"model.{fmt}", fmt, variables, SPEC)
    loaded = load(path, model, IMAGE_SHAPE)
    np.testing.assert_array_equal(logits(loaded), logits(variables))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    assert [p.name for p in tmp_path.iterdir()] == [f"model.{fmt}"]  # no temporary files


def test_safetensors_carries_the_model_description(tmp_path, model_and_variables):
    from safetensors import safe_open

    path = save_safetensors(model_and_variables[1], tmp_path / "m.safetensors", SPEC)
    with safe_open(str(path), framework="numpy") as handle:
        assert json.loads(handle.metadata()["awm_jax_model"])["name"] == "small_cnn"


def test_checkpoint_export_round_trip(tmp_path, model_and_variables, logits):
    _, variables = model_and_variables
    source = save_model(tmp_path / "purified", "small_cnn", MODEL_KWARGS, 3, IMAGE_SHAPE,
                        variables, {"defense": "awm"})
    copied = export_checkpoint(source, "checkpoint", tmp_path / "copy")
    _, loaded, metadata = load_model(copied)
    assert metadata["defense"] == "awm" and metadata["exported_from"] == str(source)
    np.testing.assert_array_equal(logits(loaded), logits(variables))
    out = export_checkpoint(source, "safetensors", tmp_path / "m.safetensors")
    model = create_model("small_cnn", 3, **MODEL_KWARGS)
    np.testing.assert_array_equal(logits(load_safetensors(out, model, IMAGE_SHAPE)),
                                  logits(variables))
    with pytest.raises(ValueError, match="format must be one of"):
        export_checkpoint(source, "onnx", tmp_path / "m.onnx")


def _write_npz(path, arrays):
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("params/Conv_1/kernel"), r"params/Conv_1/kernel: missing"),
    (lambda a: a.update({"params/Extra/kernel": np.zeros(2, np.float32)}),
     r"params/Extra/kernel: not a variable of the model"),
    (lambda a: a.update({"params/Conv_0/kernel": np.zeros((3, 3, 1, 5), np.float32)}),
     r"params/Conv_0/kernel: shape/dtype \(3, 3, 1, 5\) float32, model expects "
     r"\(3, 3, 1, 4\) float32"),
    (lambda a: a.update({"params/Conv_0/kernel": a["params/Conv_0/kernel"].astype(np.float16)}),
     r"params/Conv_0/kernel: shape/dtype \(3, 3, 1, 4\) float16"),
], ids=["missing", "extra", "shape", "dtype"])
def test_mismatched_files_give_clear_errors(tmp_path, model_and_variables, change, message):
    model, variables = model_and_variables
    arrays = flatten_variables(variables)
    change(arrays)
    npz = _write_npz(tmp_path / "bad.npz", arrays)
    with pytest.raises(ValueError, match=f"npz file .*bad.npz does not match.*{message}"):
        load_npz(npz, model, IMAGE_SHAPE)
    from safetensors.numpy import save_file

    save_file(arrays, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=f"safetensors file .*does not match.*{message}"):
        load_safetensors(tmp_path / "bad.safetensors", model, IMAGE_SHAPE)


def test_unreadable_files_give_clear_errors(tmp_path, model_and_variables):
    model = model_and_variables[0]
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read the npz file"):
        load_npz(tmp_path / "junk.npz", model, IMAGE_SHAPE)
    with pytest.raises(ValueError, match="cannot read the safetensors file"):
        load_safetensors(tmp_path / "missing.safetensors", model, IMAGE_SHAPE)
    save_npz(model_and_variables[1], tmp_path / "ok.npz")  # and a good one still loads
    load_npz(tmp_path / "ok.npz", model, IMAGE_SHAPE)


def test_cli_export(tmp_path, model_and_variables, logits, capsys):
    from awm_jax.cli import main

    model, variables = model_and_variables
    source = save_model(tmp_path / "purified", "small_cnn", MODEL_KWARGS, 3, IMAGE_SHAPE,
                        variables)
    out = tmp_path / "m.npz"
    assert main(["export", "--checkpoint", str(source), "--format", "npz",
                 "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    np.testing.assert_array_equal(logits(load_npz(out, model, IMAGE_SHAPE)), logits(variables))
    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--format", "npz",
                 "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
