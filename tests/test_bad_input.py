"""The bad-input table (docs/bad_inputs.md): every row raises an error that names the input and
the fix. One test (or one parametrised case) per row, in the table's order."""

from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from awm_jax.attacks.base import create_attack
from awm_jax.checkpoint import METADATA_FILE, VARIABLES_DIR, load_model, save_model
from awm_jax.cli import main
from awm_jax.data.clean_subset import CleanDataConfig, draw_clean_subset
from awm_jax.data.dataset import ImageDataset, Split, make_split
from awm_jax.data.sources import load_dataset
from awm_jax.defenses import purify
from awm_jax.defenses.anp import ANPConfig
from awm_jax.defenses.awm.config import AWMConfig
from awm_jax.defenses.fine_pruning import FPConfig
from awm_jax.defenses.finetune import FTConfig
from awm_jax.defenses.nad import NADConfig
from awm_jax.models import create_model, init_variables
from awm_jax.pipeline import purify_model
from awm_jax.training.config import TrainConfig

KWARGS, SHAPE, CLASSES = {"features": (4, 8)}, (8, 8, 1), 10


def _model():
    model = create_model("small_cnn", CLASSES, **KWARGS)
    return model, init_variables(model, jax.random.key(0, impl="unsafe_rbg"), SHAPE)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad") / "model"
    save_model(directory, "small_cnn", KWARGS, CLASSES, SHAPE, _model()[1])
    return directory


@pytest.fixture
def copy(saved, tmp_path):
    shutil.copytree(saved, tmp_path / "model")
    return tmp_path / "model"


def _data_file(directory):
    """The largest file of orbax's data store: the array bytes."""
    files = glob.glob(str(directory / VARIABLES_DIR / "**" / "d" / "*"), recursive=True)
    return max(files, key=os.path.getsize)


def _edit_metadata(directory, edit):
    metadata = json.loads((directory / METADATA_FILE).read_text())
    edit(metadata["model"])
    (directory / METADATA_FILE).write_text(json.dumps(metadata))


# --- checkpoint directories ----------------------------------------------------------------

def test_checkpoint_missing(tmp_path):
    with pytest.raises(ValueError, match="nowhere does not exist; pass a directory written by "
                                         r"save_model \(awm-jax train-backdoor --out DIR\)"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("deleted, match", [
    (METADATA_FILE, "has no metadata.json: it is not a model directory, or its save did not "
                    "finish"),
    (VARIABLES_DIR, "has metadata.json but no variables/ checkpoint; the directory is "
                    "incomplete: save the model again"),
    ("_METADATA", "truncated or corrupt: orbax could not read its array metadata. Save the "
                  "model again"),
    ("data", "truncated or corrupt; save the model again or restore it from a copy: "
             r"\w+: [^\n]*$"),  # one line: not orbax's whole TensorStore spec
])
def test_checkpoint_truncated(copy, deleted, match):
    path = {METADATA_FILE: copy / METADATA_FILE, VARIABLES_DIR: copy / VARIABLES_DIR,
            "_METADATA": copy / VARIABLES_DIR / "_METADATA"}.get(deleted) or _data_file(copy)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    with pytest.raises(ValueError, match=match):
        load_model(copy)


def test_checkpoint_corrupt_bytes(copy):
    path = _data_file(copy)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2:len(data) // 2 + 16] = bytes(b ^ 0xFF for b in
                                                     data[len(data) // 2:len(data) // 2 + 16])
    open(path, "wb").write(data)
    with pytest.raises(ValueError, match="(corrupt: its arrays do not match the SHA-256.*save "
                                         "the model again)|(truncated or corrupt; save the model "
                                         "again)"):
        load_model(copy)


@pytest.mark.parametrize("text, match", [("{not json", "is not valid JSON .*the file is corrupt"),
                                         ('["a list"]', "lacks the model description")])
def test_checkpoint_corrupt_metadata(copy, text, match):
    (copy / METADATA_FILE).write_text(text)
    with pytest.raises(ValueError, match=match):
        load_model(copy)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["kwargs"].update(features=[4, 16]), r"\['Conv_1'\]\['kernel'\].*Was the "
                                                     "model name, model_kwargs, num_classes or "
                                                     "image_shape changed"),
    (lambda m: m.update(num_classes=3), r"\['Dense_0'\]\['kernel'\]: shape/dtype \(32, 10\) "
                                        r"float32, model expects \(32, 3\)"),
    (lambda m: m.update(name="resnet18", kwargs={"width": 2}),
     r"\['layer1_block0'\]\['bn1'\]\['mean'\]: missing.*114 in all"),
], ids=["kwargs", "num_classes", "model"])
def test_checkpoint_from_another_model_config(copy, edit, match):
    _edit_metadata(copy, edit)
    with pytest.raises(ValueError, match="do not match the model built from its config.*" + match):
        load_model(copy)


# --- images and labels ---------------------------------------------------------------------

def _images(n=4, shape=SHAPE):
    return np.random.default_rng(0).uniform(size=(n, *shape)).astype(np.float32)


@pytest.mark.parametrize("images, match", [
    (_images()[..., 0], r"must have rank 4 \[N, H, W, C\].*got shape \(4, 8, 8\).*"
                        r"images\[\.\.\., None\]"),
    ((_images() * 255).astype(np.uint8), "must be floating point in .0, 1.; got dtype uint8. "
                                         "Divide uint8 images by 255"),
    (_images() * 255, r"must lie in \[0, 1\]; got values in .*These look like 0\.\.255 pixels: "
                      "divide by 255"),
    (_images() * 2 - 1, r"must lie in \[0, 1\].*normalisation belongs inside the model"),
    (_images() + 0.02, r"must lie in \[0, 1\]; got values in \[0\.0.*, 1\.0.*\]\. Clip them"),
    (np.where(np.arange(4)[:, None, None, None] == 1, np.nan, _images()),
     "contains NaN or Inf values in 1 of 4 images; fix or drop those images"),
], ids=["rank", "uint8", "0..255-floats", "normalised", "overshoot", "nan"])
def test_images_break_the_batch_contract(images, match):
    with pytest.raises(ValueError, match="train images " + match):
        make_split(images, np.zeros(4, np.int32), CLASSES, "train")


def test_images_of_the_wrong_size_for_the_model():
    model, variables = _model()
    split = make_split(_images(20, (16, 16, 1)), np.arange(20) % CLASSES, CLASSES)
    dataset = ImageDataset("big", split, split, tuple(map(str, range(CLASSES))))
    with pytest.raises(ValueError, match=r"big images of shape \(16, 16, 1\) \(H, W, C\) do not "
                                         r"fit the model SmallCNN \(ScopeParamShapeError.*Use "
                                         "images of the size and channel count it was trained"):
        purify_model(model, variables, dataset, create_attack("badnets", target=0),
                     model_name="small_cnn")


@pytest.mark.parametrize("labels, match", [
    (np.array([0, 1, 10, -1]), r"must lie in \[0, 10\); found 2 out of range, e\.g\. 10\. "
                               r"Labels are class indices: remap them to 0\.\.9"),
    (np.array([0, 1, 2]), "has 3 entries but there are 4 images; pass exactly one label per "
                          "image"),
    (np.eye(CLASSES)[:4], r"must have rank 1 \[N\] of class indices.*one-hot labels: take argmax"),
    (np.array([0.0, 1.0, 2.0, 3.0]), r"must be integer class indices; got dtype float64 \(cast "
                                     r"with \.astype\(int\)"),
], ids=["out-of-range", "count", "one-hot", "float"])
def test_labels_break_the_batch_contract(labels, match):
    with pytest.raises(ValueError, match="train labels " + match):
        make_split(_images(), labels, CLASSES, "train")


# --- the defender's clean set --------------------------------------------------------------

def test_empty_clean_set():
    model, variables = _model()
    empty = Split(np.zeros((0, *SHAPE), np.float32), np.zeros(0, np.int32))
    with pytest.raises(ValueError, match=r"clean images is empty \(shape \(0, 8, 8, 1\)\); at "
                                         "least one image is needed"):
        purify("awm", model, variables, empty, jax.random.key(0), num_classes=CLASSES)


def _pool(n, classes):
    return Split(_images(n), (np.arange(n) % classes).astype(np.int32))


def test_empty_pool_for_the_clean_draw():
    empty = Split(np.zeros((0, *SHAPE), np.float32), np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="the pool of clean images is empty; the defender's "
                                         "images are drawn from the test split"):
        draw_clean_subset(empty, CLASSES, jax.random.key(0), CleanDataConfig(n_clean=5))


def test_one_class_missing_when_k_per_class_is_asked():
    with pytest.raises(ValueError, match="class 3 has 0 image.* per_class=1 were asked; lower "
                                         "per_class, draw n_clean images instead, or use a pool"):
        draw_clean_subset(_pool(6, 3), 4, jax.random.key(0), CleanDataConfig.one_shot())


def test_n_clean_larger_than_the_pool():
    with pytest.raises(ValueError, match="n_clean=10 is larger than the pool of 6 images; use "
                                         "n_clean <= 6 or a larger pool"):
        draw_clean_subset(_pool(6, 3), 3, jax.random.key(0), CleanDataConfig(n_clean=10))


# --- hyperparameters -----------------------------------------------------------------------

@pytest.mark.parametrize("config, changes, match", [
    (AWMConfig, {"alpha": 1.5}, r"alpha must be in \[0\.0, 1\.0\]; got 1\.5"),
    (AWMConfig, {"alpha": -0.1}, r"alpha must be in \[0\.0, 1\.0\]; got -0\.1"),
    (AWMConfig, {"tau": -1.0}, "tau must be a finite number > 0; got -1.0"),
    (AWMConfig, {"gamma": -1e-8}, r"gamma must be in \[0\.0, inf\]; got -1e-08"),
    (AWMConfig, {"outer_epochs": 0}, "outer_epochs must be >= 1; got 0"),
    (AWMConfig, {"inner_passes": 0}, "inner_passes must be >= 1; got 0"),
    (AWMConfig, {"alpha": float("nan")}, "alpha must be in"),
    (FTConfig, {"epochs": 0}, "epochs must be > 0; got 0"),
    (FTConfig, {"learning_rate": -0.1}, "learning_rate must be > 0; got -0.1"),
    (FPConfig, {"acc_drop": 1.5}, r"acc_drop must be in \[0, 1\]; got 1\.5"),
    (FPConfig, {"epochs": -1}, "epochs must be >= 0; got -1"),
    (NADConfig, {"epochs": 0}, "epochs must be > 0; got 0"),
    (NADConfig, {"teacher_epochs": 0}, "teacher_epochs must be > 0; got 0"),
    (NADConfig, {"beta": -1.0}, "beta must be >= 0; got -1.0"),
    (ANPConfig, {"iterations": 0}, "iterations must be >= 1; got 0"),
    (ANPConfig, {"alpha": 2.0}, r"alpha must be in \[0, 1\]; got 2\.0"),
    (TrainConfig, {"epochs": 0}, "epochs must be an integer >= 1; got 0"),
    (CleanDataConfig, {"n_clean": 0}, "n_clean must be >= 1; got 0"),
], ids=lambda v: v.__name__ if isinstance(v, type) else None)
def test_hyperparameters_out_of_range(config, changes, match):
    with pytest.raises(ValueError, match=match):
        config(**changes)


# --- names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: create_model("resnet19", CLASSES), r"unknown model 'resnet19'; known: "
                                                r".*preact_resnet18, resnet18, small_cnn"),
    (lambda: create_attack("badnet"), r"unknown attack 'badnet'; known: .*badnets.*wanet"),
    (lambda: purify("awn", *_model(), None, None), r"unknown defense 'awn'; known: .*awm.*ft"),
    (lambda: load_dataset("./no/such/cifar.npz"), r"no file or directory .*not an embedded "
                                                  r"dataset \(digits\); it looks like a path"),
], ids=["model", "attack", "defense", "dataset-path"])
def test_unknown_names_list_the_known_ones(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_unknown_dataset_name():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match=r"cannot load dataset 'cifar11'.*embedded dataset "
                                         r"\(digits\).*not a TFDS dataset name"):
        load_dataset("cifar11")


# --- TFDS offline --------------------------------------------------------------------------

def test_tfds_dataset_not_prepared_offline(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match=r"'mnist' is not prepared in .*Pass download=True \(CLI: "
                                         r"awm-jax train-backdoor --download.*TFDS_DATA_DIR.*"
                                         r"ImageFolder directory or \.tar/\.tar\.gz archive"):
        load_dataset("mnist", data_dir=tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_cli_download_flag_reaches_the_loader(monkeypatch):
    seen = {}

    def fake_load(source, **kwargs):
        seen.update(source=source, **kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr("awm_jax.data.sources.load_dataset", fake_load)
    assert main(["train-backdoor", "--dataset", "cifar10", "--download", "--out", "x"]) == 2
    assert seen == {"source": "cifar10", "download": True}
    # Sources with nothing to download ignore the flag.
    assert load_dataset.__module__ == "awm_jax.data.sources"
    monkeypatch.undo()
    assert load_dataset("digits8", download=True).image_shape == (8, 8, 1)
