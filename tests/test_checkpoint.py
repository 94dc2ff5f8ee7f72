"""Tests for saving and loading models (orbax checkpoint + metadata.json)."""

from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.checkpoint import (METADATA_FILE, VARIABLES_DIR, library_versions, load_metadata,
                                load_model, save_model)
from awm_jax.models import apply_model, create_model, init_variables

MODEL_KWARGS = {"features": (4, 8)}
IMAGE_SHAPE = (8, 8, 1)


def _variables():
    model = create_model("small_cnn", 10, **MODEL_KWARGS)
    variables = init_variables(model, jax.random.key(0, impl="unsafe_rbg"), IMAGE_SHAPE)
    # Non-default running statistics, so a restore that dropped batch_stats would show.
    variables["batch_stats"] = jax.tree.map(lambda x: x + 0.25, variables["batch_stats"])
    return model, variables


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved model directory, and the model and variables it came from."""
    model, variables = _variables()
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    save_model(directory, "small_cnn", MODEL_KWARGS, 10, IMAGE_SHAPE, variables,
               {"dataset": "digits8", "metrics": {"acc": np.float32(0.5)}, "seed": 3})
    return directory, model, variables


@pytest.fixture
def copy(saved, tmp_path):
    """A private copy of the saved model directory that a test may damage."""
    target = tmp_path / "model"
    shutil.copytree(saved[0], target)
    return target


def test_round_trip_gives_identical_logits(saved):
    directory, model, variables = saved
    loaded_model, loaded, metadata = load_model(directory)
    assert loaded_model == model
    # One jitted forward for both (the modules are equal), so the test compiles once.
    logits = jax.jit(lambda v, x: apply_model(loaded_model, v["params"], v["batch_stats"], x)[0])
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, *IMAGE_SHAPE)), jnp.float32)
    np.testing.assert_array_equal(logits(variables, images), logits(loaded, images))
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(loaded))
    assert metadata["dataset"] == "digits8" and metadata["seed"] == 3
    assert metadata["metrics"] == {"acc": 0.5}
    assert metadata["model"] == {"name": "small_cnn", "kwargs": {"features": [4, 8]},
                                 "num_classes": 10, "image_shape": [8, 8, 1]}
    assert metadata["versions"] == library_versions()
    assert {"jax", "flax", "optax", "orbax-checkpoint", "numpy", "python"} <= set(
        metadata["versions"])
    assert metadata["machine"]["backend"] == "cpu" and metadata["machine"]["cpu"]
    assert metadata["created"].endswith("+00:00")
    # The save left no temporary files behind.
    assert sorted(os.listdir(directory)) == [METADATA_FILE, VARIABLES_DIR]


def test_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nowhere")


def test_missing_metadata(copy):
    os.remove(copy / METADATA_FILE)
    with pytest.raises(ValueError, match="no metadata.json"):
        load_model(copy)


@pytest.mark.parametrize("text, match", [('{"model": {"name": ', "not valid JSON"),
                                         ('{"seed": 0}', "lacks the model description")])
def test_corrupt_metadata(copy, text, match):
    (copy / METADATA_FILE).write_text(text)
    with pytest.raises(ValueError, match=match):
        load_metadata(copy)


def test_missing_checkpoint(copy):
    shutil.rmtree(copy / VARIABLES_DIR)
    with pytest.raises(ValueError, match="no variables/ checkpoint"):
        load_model(copy)


def _largest_data_file(directory):
    """The biggest file of orbax's OCDBT data store (``.../d/<hash>``): array bytes."""
    files = glob.glob(str(directory / VARIABLES_DIR / "**" / "d" / "*"), recursive=True)
    return max(files, key=os.path.getsize)


def test_truncated_checkpoint(copy):
    path = _largest_data_file(copy)  # the array data
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=f"{copy}.*truncated or corrupt"):
        load_model(copy)


def test_truncated_checkpoint_metadata(copy):
    os.truncate(copy / VARIABLES_DIR / "_METADATA", 10)
    with pytest.raises(ValueError, match=f"{copy}.*truncated or corrupt"):
        load_model(copy)


def test_corrupted_bytes_fail_the_digest(copy):
    # Orbax restores zeroed array bytes without complaint; the SHA-256 in metadata.json does not.
    path = _largest_data_file(copy)
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(16)
    with open(path, "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match="SHA-256"):
        load_model(copy)


def test_changed_model_kwargs(copy):
    metadata = json.loads((copy / METADATA_FILE).read_text())
    metadata["model"]["kwargs"]["features"] = [4, 16]
    (copy / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"do not match the model.*Conv_1.*model_kwargs"):
        load_model(copy)


def test_unknown_model_name(copy):
    metadata = json.loads((copy / METADATA_FILE).read_text())
    metadata["model"]["name"] = "no_such_net"
    (copy / METADATA_FILE).write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="cannot build the model.*known: .*small_cnn"):
        load_model(copy)


def test_save_refuses_bad_input(saved, tmp_path):
    directory, _, variables = saved
    with pytest.raises(ValueError, match="already holds a model.*overwrite=True"):
        save_model(directory, "small_cnn", MODEL_KWARGS, 10, IMAGE_SHAPE, variables)
    with pytest.raises(ValueError, match="do not match the model"):
        save_model(tmp_path / "a", "small_cnn", {"features": (4, 16)}, 10, IMAGE_SHAPE, variables)
    with pytest.raises(ValueError, match="reserved keys.*'model'"):
        save_model(tmp_path / "b", "small_cnn", MODEL_KWARGS, 10, IMAGE_SHAPE, variables,
                   {"model": "x"})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_model(tmp_path / "c", "small_cnn", MODEL_KWARGS, 10, IMAGE_SHAPE, variables,
                   {"when": object()})
    assert not any((tmp_path / name).exists() for name in "abc")


def test_overwrite(copy):
    model, variables = _variables()
    doubled = jax.tree.map(lambda x: 2 * x, variables)
    save_model(copy, "small_cnn", MODEL_KWARGS, 10, IMAGE_SHAPE, doubled, overwrite=True)
    _, loaded, metadata = load_model(copy)
    jax.tree.map(np.testing.assert_array_equal, loaded, doubled)
    assert "seed" not in metadata  # the old provenance went with the old weights.
