"""TensorFlow Datasets by name (``cifar10``, ``mnist``, ``svhn_cropped``, ...).

``tensorflow_datasets`` is imported only when a TFDS name is loaded. TensorFlow, which TFDS needs
to build most datasets, is the optional extra ``pip install 'awm-jax[tfds]'``. Reading a prepared
dataset goes through ``builder.as_data_source`` (array_record files, random access, no TensorFlow
needed). Preparing one (``download=True``) needs internet access and, for most datasets,
TensorFlow; so does reading a dataset that an older TFDS prepared as tfrecord files, which falls
back to ``tfds.as_numpy``.

TFDS decodes the stored images itself (with PIL, or OpenCV if installed; for the PNG-stored
datasets named above both give the same pixels); from there on the arrays go through the same size
checks, class names and on-disk cache as an ImageFolder.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from awm_jax.data import cache as cache_lib
from awm_jax.data.arrays import (ImageStacker, dataset_from_arrays, normalize_image_size,
                                 resize_image)
from awm_jax.data.dataset import ImageDataset

INSTALL_HINT = "TensorFlow: pip install 'awm-jax[tfds]'"
LOCAL_HINT = ("or load a local copy instead: an ImageFolder directory or .tar/.tar.gz archive, "
              "or an .npz with x_train/y_train/x_test/y_test")


class UnknownTfdsName(ValueError):
    """``name`` is not in the TFDS registry."""


def import_tfds():
    """Imports ``tensorflow_datasets`` or raises an ImportError that says how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            f"loading a TFDS dataset needs tensorflow-datasets ({err}): pip install "
            f"tensorflow-datasets, {LOCAL_HINT}.") from err
    return tfds


def load_tfds(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
              train_split: str = "train", test_split: str = "test",
              image_key: str | None = None, label_key: str | None = None,
              image_size: int | Sequence[int] | None = None, cache: bool = True,
              progress: bool = True) -> ImageDataset:
    """Loads a TFDS image classification dataset into memory.

    Args:
      name: a TFDS name, optionally with config and version (``"cifar10"``, ``"mnist:3.*.*"``).
      data_dir: where TFDS keeps prepared data; TFDS's default (``~/tensorflow_datasets``) if None.
      download: if the dataset is not prepared in ``data_dir``, download and prepare it (needs
        internet access and usually TensorFlow). If False, an unprepared dataset is an error.
      train_split, test_split: TFDS split names (slices such as ``"train[:10%]"`` work too).
      image_key, label_key: feature names; default to the dataset's supervised keys.
      image_size: ``(height, width)`` (or one int) to resize every image to, PIL bilinear.
      cache: read and write the decoded-array cache (keyed by the prepared files).
      progress: show tqdm progress bars while reading.

    Returns:
      ``float32[N, H, W, C]`` images in ``[0, 1]``, ``int32`` labels, TFDS's label names.

    Raises:
      UnknownTfdsName: ``name`` is not a TFDS dataset.
      ValueError: not prepared and ``download`` is False; unknown split or feature; images of
        different sizes without ``image_size``.
      ImportError: tensorflow-datasets (or TensorFlow, where needed) is not installed.
      RuntimeError: downloading or preparing failed.
    """
    tfds = import_tfds()
    builder = _builder(tfds, name, data_dir)
    if not builder.is_prepared():
        if not download:
            raise ValueError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Pass download=True "
                f"(CLI: awm-jax train-backdoor --download; needs internet access and "
                f"{INSTALL_HINT}), point data_dir= (or TFDS_DATA_DIR) at a directory where it is "
                f"prepared, {LOCAL_HINT}.")
        _prepare(builder, name)
    info = builder.info
    image_key, label_key = _feature_keys(info, name, image_key, label_key)
    size = normalize_image_size(image_size)
    entry = None
    if cache:
        key = cache_lib.cache_key(
            "tfds", cache_lib.fingerprint_tree(builder.data_dir), name=name,
            version=str(info.version), splits=[train_split, test_split],
            keys=[image_key, label_key], image_size=size)
        entry_file = cache_lib.entry_path(key, f"tfds-{info.name}")
        entry = cache_lib.load_entry(entry_file)
    if entry is None:
        entry = _read(tfds, builder, name, (train_split, test_split), image_key, label_key,
                      size, progress)
        if cache:
            cache_lib.save_entry(entry_file, entry)
    return dataset_from_arrays(
        f"tfds:{name}", entry["train_images"], entry["train_labels"], entry["test_images"],
        entry["test_labels"], class_names=[str(c) for c in entry["class_names"]])


def _builder(tfds, name: str, data_dir):
    try:
        return tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    except tfds.core.registered.DatasetNotFoundError as err:
        # TFDS's own message lists every registered dataset; keep only its suggestion.
        hint = " ".join(line.strip() for line in str(err).splitlines() if "did you mean" in
                        line.lower())
        raise UnknownTfdsName(f"{name!r} is not a TFDS dataset name. {hint}".strip()) from err


def _prepare(builder, name: str) -> None:
    try:
        builder.download_and_prepare(file_format="array_record")
    except ImportError as err:
        raise ImportError(
            f"preparing TFDS dataset {name!r} needs a package that is not installed ({err}); "
            f"{INSTALL_HINT}, {LOCAL_HINT}.") from err
    except Exception as err:  # noqa: BLE001 - network and builder failures have no common type.
        raise RuntimeError(
            f"TFDS could not download and prepare {name!r} into {builder.data_dir} "
            f"({type(err).__name__}: {err}). Check internet access, {LOCAL_HINT}.") from err


def _feature_keys(info, name: str, image_key, label_key) -> tuple[str, str]:
    supervised = info.supervised_keys if isinstance(info.supervised_keys, tuple) else None
    image_key = image_key or (supervised[0] if supervised else "image")
    label_key = label_key or (supervised[1] if supervised else "label")
    features = info.features
    for role, key in (("image_key", image_key), ("label_key", label_key)):
        if key not in features:
            raise ValueError(f"TFDS dataset {name!r} has no feature {key!r}; pass {role}= one of "
                             f"{sorted(features.keys())}.")
    if not hasattr(features[label_key], "names"):
        raise ValueError(f"TFDS feature {name}/{label_key} is not a ClassLabel; pass label_key= "
                         f"one of {sorted(features.keys())}.")
    return image_key, label_key


def _read(tfds, builder, name: str, splits: tuple[str, str], image_key: str, label_key: str,
          size, progress: bool) -> dict[str, np.ndarray]:
    """Reads both splits into a cache entry (uint8 images, int32 labels, class names)."""
    stacker = ImageStacker(f"tfds:{name}")
    entry: dict[str, np.ndarray] = {}
    for role, split in zip(("train", "test"), splits):
        labels = []
        for index, example in enumerate(_examples(tfds, builder, name, split, progress)):
            image = np.asarray(example[image_key])
            if image.dtype != np.uint8:
                raise ValueError(f"TFDS {name}/{split}/{image_key} has dtype {image.dtype}; "
                                 "only uint8 images are supported.")
            if size is not None:
                image = resize_image(image, size)
            stacker.add(role, image, f"tfds:{name} split {split!r} example {index}")
            labels.append(int(example[label_key]))
        entry[f"{role}_labels"] = np.asarray(labels, np.int32)
    for role in ("train", "test"):
        entry[f"{role}_images"] = stacker.stack(role)
    entry["class_names"] = np.array(builder.info.features[label_key].names, dtype=str)
    return entry


def _examples(tfds, builder, name: str, split: str, progress: bool):
    """Yields the examples of ``split`` as dicts of numpy values."""
    try:
        source = builder.as_data_source(split=split)
    except NotImplementedError:  # prepared as tfrecord: only tf.data can read it.
        yield from _examples_tf(tfds, builder, name, split)
        return
    except (KeyError, ValueError) as err:
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r} ({err}); pass "
                         f"train_split=/test_split= one of {list(builder.info.splits)}.") from err
    # One example at a time: the cache makes this a one-off cost, and it is the access path that
    # tfds.testing.mock_data supports (its batched __getitems__ mock is broken in 4.9.10).
    yield from tqdm((source[index] for index in range(len(source))), total=len(source),
                    unit="img", desc=f"reading tfds:{name} {split}", disable=not progress)


def _examples_tf(tfds, builder, name: str, split: str):
    try:
        arrays: dict[str, Any] = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    except ImportError as err:
        raise ImportError(
            f"TFDS dataset {name!r} is stored as tfrecord files in {builder.data_dir}, which only "
            f"TensorFlow can read ({err}); {INSTALL_HINT}, or prepare it again with "
            "file_format='array_record' in a new data_dir.") from err
    keys = list(arrays)
    for index in range(len(arrays[keys[0]])):
        yield {key: arrays[key][index] for key in keys}
