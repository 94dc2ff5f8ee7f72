"""Tests for load_dataset: ImageFolder dirs/archives, the decode cache, array files and TFDS.

Tiny datasets are built in ``tmp_path`` with PIL, so every expected pixel is known exactly. The
shared CIFAR-10 and GTSRB archives are checked through the on-disk cache: with a warm cache the
full load takes seconds; with a cold one the test is skipped unless ``AWM_JAX_SLOW_TESTS=1``
(a cold decode of both archives takes about a minute on two cores), so the default run stays fast.
"""

from __future__ import annotations

import os
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from awm_jax.data import folder
from awm_jax.data.sources import load_dataset

SIZE = (4, 5)  # (height, width) of the tiny images.
TINY_COUNTS = {"train": {"cat": 3, "dog": 2}, "test": {"cat": 1, "dog": 2}}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A private, empty decode cache for one test."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("AWM_JAX_CACHE", str(directory))
    return directory


def _pixels(seed: int, size=SIZE, channels: int = 3) -> np.ndarray:
    shape = size + ((channels,) if channels > 1 else ())
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def _make_folder(root: Path, counts=TINY_COUNTS, channels: int = 3) -> dict:
    """Writes ``root/tiny/<split>/<class>/<i>.png``; returns the expected uint8 arrays/labels."""
    expected = {}
    classes = sorted(counts["train"])
    for split, per_class in counts.items():
        images, labels = [], []
        for label, name in enumerate(classes):
            for i in range(per_class.get(name, 0)):
                pixels = _pixels(zlib.crc32(f"{split}/{name}/{i}".encode()), channels=channels)
                _write_png(root / "tiny" / split / name / f"{i:03d}.png", pixels)
                images.append(pixels if channels == 3 else pixels[..., None])
                labels.append(label)
        expected[split] = (np.stack(images) if images else None, np.array(labels))
    (root / "tiny" / "README.txt").write_text("not an image, ignored")
    (root / "tiny" / "train" / ".DS_Store").write_bytes(b"\0junk")
    return expected


def _archive(root: Path, suffix: str) -> Path:
    mode = {".tar": "w", ".tar.gz": "w:gz"}[suffix]
    path = root.parent / f"tiny{suffix}"
    with tarfile.open(path, mode) as tar:
        tar.add(root / "tiny", arcname="tiny")
    return path


def _check(dataset, expected, channels: int = 3) -> None:
    assert dataset.class_names == ("cat", "dog")
    assert dataset.image_shape == SIZE + (channels,)
    for split in ("train", "test"):
        images, labels = expected[split]
        got = getattr(dataset, split)
        assert got.images.dtype == np.float32 and got.labels.dtype == np.int32
        np.testing.assert_array_equal(got.labels, labels)
        np.testing.assert_allclose(got.images, images / np.float32(255), atol=1e-7)
    np.testing.assert_array_equal(dataset.class_counts("train"), [3, 2])
    np.testing.assert_array_equal(dataset.class_counts("test"), [1, 2])


@pytest.mark.parametrize("kind", ["dir", ".tar", ".tar.gz"])
def test_image_folder_loads_from_dir_and_archives(tmp_path, cache_dir, kind):
    expected = _make_folder(tmp_path / "src")
    source = tmp_path / "src" / "tiny" if kind == "dir" else _archive(tmp_path / "src", kind)
    _check(load_dataset(str(source), progress=False), expected)


def test_greyscale_stays_one_channel_and_mixed_modes_become_rgb(tmp_path, cache_dir):
    expected = _make_folder(tmp_path, channels=1)
    root = tmp_path / "tiny"
    _check(load_dataset(root, progress=False), expected, channels=1)
    rgb = _pixels(99)
    _write_png(root / "test" / "dog" / "999.png", rgb)
    dataset = load_dataset(root, progress=False)
    assert dataset.image_shape == SIZE + (3,)
    grey = expected["train"][0][0]
    np.testing.assert_allclose(dataset.train.images[0], np.repeat(grey, 3, -1) / 255.0, atol=1e-7)
    np.testing.assert_allclose(dataset.test.images[-1], rgb / 255.0, atol=1e-7)


def test_second_load_hits_the_cache(tmp_path, cache_dir, monkeypatch):
    _make_folder(tmp_path / "src")
    archive = _archive(tmp_path / "src", ".tar.gz")
    first = load_dataset(archive, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(folder, "decode_image", fail)
    second = load_dataset(archive, progress=False)
    np.testing.assert_array_equal(first.train.images, second.train.images)
    assert second.class_names == first.class_names
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset(archive, progress=False, cache=False)


def test_changed_directory_misses_the_cache(tmp_path, cache_dir):
    _make_folder(tmp_path)
    root = tmp_path / "tiny"
    assert len(load_dataset(root, progress=False).train) == 5
    _write_png(root / "train" / "dog" / "new.png", _pixels(7))
    assert len(load_dataset(root, progress=False).train) == 6


def test_corrupt_cache_file_is_a_miss(tmp_path, cache_dir):
    expected = _make_folder(tmp_path)
    root = tmp_path / "tiny"
    load_dataset(root, progress=False)
    entries = list(cache_dir.glob("*.npz"))
    assert entries == [folder.cache_entry_path(root)]
    entries[0].write_bytes(b"PK\x03\x04 truncated zip")
    _check(load_dataset(root, progress=False), expected)
    with np.load(entries[0]) as npz:  # rewritten with a valid entry.
        assert npz["train_images"].dtype == np.uint8
    assert not list(cache_dir.glob("*.tmp"))


@pytest.mark.parametrize("payload", [b"definitely not a png", "truncated"])
def test_corrupt_image_names_the_file(tmp_path, cache_dir, payload):
    _make_folder(tmp_path)
    bad = tmp_path / "tiny" / "train" / "dog" / "bad.png"
    if payload == "truncated":
        _write_png(bad, _pixels(1))
        payload = bad.read_bytes()[:60]  # inside the pixel data.
    bad.write_bytes(payload)
    with pytest.raises(ValueError, match=r"train/dog/bad\.png: cannot decode"):
        load_dataset(tmp_path / "tiny", progress=False)


def test_empty_class_names_the_class(tmp_path, cache_dir):
    _make_folder(tmp_path, {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "dog": 0}})
    (tmp_path / "tiny" / "test" / "dog").mkdir(parents=True)
    archive = _archive(tmp_path, ".tar")
    for source in (tmp_path / "tiny", archive):
        with pytest.raises(ValueError, match=r"class folder (tiny/)?test/dog holds no images"):
            load_dataset(source, progress=False)


def test_missing_split_and_differing_classes(tmp_path, cache_dir):
    _make_folder(tmp_path / "a", {"train": {"cat": 1, "dog": 1}, "test": {}})
    with pytest.raises(ValueError, match=r"no 'test' folder in the top level"):
        load_dataset(tmp_path / "a" / "tiny", progress=False)
    _make_folder(tmp_path / "b")
    _write_png(tmp_path / "b" / "tiny" / "train" / "eel" / "0.png", _pixels(3))
    with pytest.raises(ValueError, match=r"only in train: \['eel'\], only in test: \[\]"):
        load_dataset(tmp_path / "b" / "tiny", progress=False)
    _make_folder(tmp_path / "c")
    _write_png(tmp_path / "c" / "tiny" / "test" / "loose.png", _pixels(4))
    with pytest.raises(ValueError, match=r"test/loose\.png is not inside a class folder"):
        load_dataset(tmp_path / "c" / "tiny", progress=False)


def test_mismatched_sizes_error_unless_image_size(tmp_path, cache_dir):
    _make_folder(tmp_path)
    _write_png(tmp_path / "tiny" / "test" / "dog" / "big.png", _pixels(5, size=(6, 6)))
    with pytest.raises(ValueError, match=r"test/dog/big\.png: image is 6x6 .* image_size="):
        load_dataset(tmp_path / "tiny", progress=False)
    dataset = load_dataset(tmp_path / "tiny", image_size=(8, 7), progress=False)
    assert dataset.image_shape == (8, 7, 3)
    assert len(dataset.test) == 4


def test_corrupt_archive_is_a_clear_error(tmp_path, cache_dir):
    _make_folder(tmp_path)
    archive = _archive(tmp_path, ".tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"tiny\.tar\.gz: cannot read the archive"):
        load_dataset(archive, progress=False)


def test_npz_round_trip_uint8_and_one_hot_float(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (6, 3, 3, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, (2, 3, 3, 3), dtype=np.uint8)
    y_train, y_test = np.array([0, 1, 2, 2, 1, 0]), np.array([2, 0])
    plain = tmp_path / "plain.npz"
    np.savez(plain, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    dataset = load_dataset(plain)
    np.testing.assert_allclose(dataset.train.images, x_train / 255.0, atol=1e-7)
    np.testing.assert_array_equal(dataset.test.labels, y_test)
    assert dataset.class_names == ("0", "1", "2")

    eye = np.eye(4, dtype=np.float32)  # one-hot width 4 > max label + 1: width wins.
    caps = tmp_path / "caps.npz"
    np.savez(caps, X_train=x_train / np.float32(255), Y_train=eye[y_train],
             X_test=x_test / np.float32(255), Y_test=eye[y_test],
             class_names=np.array(["a", "b", "c", "d"]))
    dataset = load_dataset(caps)
    assert dataset.num_classes == 4 and dataset.class_names == ("a", "b", "c", "d")
    np.testing.assert_array_equal(dataset.train.labels, y_train)
    np.testing.assert_allclose(dataset.test.images, x_test / 255.0, atol=1e-6)

    grey = tmp_path / "grey.npz"  # [N, H, W] images and [N, 1] labels.
    np.savez(grey, x_train=x_train[..., 0], y_train=y_train[:, None], x_test=x_test[..., 0],
             y_test=y_test[:, None])
    assert load_dataset(grey).image_shape == (3, 3, 1)


def _save(path, y_train, y_test, x_train=None, **extra):
    x = np.zeros((len(y_train), 2, 2, 3), np.uint8) if x_train is None else x_train
    np.savez(path, x_train=x, y_train=y_train, x_test=np.zeros((len(y_test), 2, 2, 3), np.uint8),
             y_test=y_test, **extra)
    return path


def test_npz_bad_labels_and_pixels_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.npz test labels must lie in \[0, 2\)"):
        load_dataset(_save(tmp_path / "bad.npz", [0, 1], [-1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        load_dataset(_save(tmp_path / "named.npz", [0, 1], [2], class_names=np.array(["a", "b"])))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        load_dataset(_save(tmp_path / "k.npz", [0, 1], [5]), num_classes=3)
    with pytest.raises(ValueError, match=r"row 1 is \[1, 1, 0\]"):
        load_dataset(_save(tmp_path / "hot.npz", np.array([[1, 0, 0], [1, 1, 0]]), [0]))
    with pytest.raises(ValueError, match="missing arrays"):
        np.savez(tmp_path / "keys.npz", images=np.zeros(3))
        load_dataset(tmp_path / "keys.npz")
    x_255 = np.full((2, 2, 2, 3), 200.0, np.float32)
    path = _save(tmp_path / "scale.npz", [0, 1], [0], x_train=x_255)
    with pytest.raises(ValueError, match="pixel_scale=255"):
        load_dataset(path)
    np.testing.assert_allclose(load_dataset(path, pixel_scale=255).train.images, 200 / 255.0)


def test_h5_needs_h5py(tmp_path):
    path = tmp_path / "data.h5"
    try:
        import h5py
    except ImportError:
        path.write_bytes(b"\x89HDF\r\n")
        with pytest.raises(ImportError, match="pip install h5py"):
            load_dataset(path)
        return
    eye = np.eye(3, dtype=np.uint8)
    with h5py.File(path, "w") as handle:
        handle["X_train"] = np.full((2, 2, 2, 3), 255.0, np.float32)
        handle["Y_train"] = eye[[0, 2]]
        handle["X_test"] = np.zeros((1, 2, 2, 3), np.float32)
        handle["Y_test"] = eye[[1]]
    dataset = load_dataset(path, pixel_scale=255)
    assert dataset.num_classes == 3 and float(dataset.train.images.max()) == 1.0


def test_unknown_sources_list_what_was_tried(tmp_path):
    with pytest.raises(ValueError, match=r"no file or directory .*not an embedded dataset"):
        load_dataset(str(tmp_path / "absent.tar.gz"))
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match=r"embedded dataset \(digits\).*not a TFDS dataset name"):
        load_dataset("no_such_dataset_xyz")


def test_digits_still_dispatches():
    assert load_dataset("digits", size=8).image_shape == (8, 8, 1)


def test_tfds_absent_offline_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    for name in ("mnist", "tfds:mnist"):
        with pytest.raises(ValueError, match=r"'mnist' is not prepared in .*download=True"):
            load_dataset(name, data_dir=tmp_path / "tfds")
    assert not (tmp_path / "tfds").exists()  # download=False must not create anything.


def test_tfds_build_failure_says_what_to_install(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def no_tensorflow(self, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'tensorflow'")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_tensorflow)
    with pytest.raises(ImportError, match=r"awm-jax\[tfds\]"):
        load_dataset("tfds:mnist", data_dir=tmp_path, download=True)


def test_tfds_mock_data_loads_through_data_source(tmp_path, cache_dir):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        dataset = load_dataset("tfds:mnist", data_dir=tmp_path, download=True, progress=False)
    assert dataset.image_shape == (28, 28, 1) and len(dataset.train) == 3
    assert dataset.class_names == tuple(str(d) for d in range(10))
    assert dataset.name == "tfds:mnist"


# Per-class counts from /work/shared/data/gtsrb-32.README.md, ClassId 0..42.
GTSRB_TRAIN = [210, 2220, 2250, 1410, 1980, 1860, 420, 1440, 1410, 1470, 2010, 1320, 2100, 2160,
               780, 630, 420, 1110, 1200, 210, 360, 330, 390, 510, 270, 1500, 600, 240, 540, 270,
               450, 780, 240, 689, 420, 1200, 390, 210, 2070, 300, 360, 240, 240]
GTSRB_TEST = [60, 720, 750, 450, 660, 630, 150, 450, 450, 480, 660, 420, 690, 720, 270, 210, 150,
              360, 390, 60, 90, 90, 120, 150, 90, 480, 180, 60, 150, 90, 150, 270, 60, 210, 120,
              390, 120, 60, 690, 90, 90, 60, 90]
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")


@pytest.mark.parametrize("archive, train_counts, test_counts, class_names", [
    ("cifar10-jpeg.tar.gz", [5000] * 10, [1000] * 10, CIFAR10_CLASSES),
    ("gtsrb-32.tar.gz", GTSRB_TRAIN, GTSRB_TEST, tuple(f"{k:02d}" for k in range(43))),
])
def test_shared_archives(shared_data_dir, archive, train_counts, test_counts, class_names):
    path = shared_data_dir / archive
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    if not folder.cache_entry_path(path).is_file() and os.environ.get("AWM_JAX_SLOW_TESTS") != "1":
        pytest.skip(f"decode cache for {archive} is cold; warm it with "
                    f"awm_jax.data.sources.load_dataset('{path}') or set AWM_JAX_SLOW_TESTS=1")
    start = time.perf_counter()
    dataset = load_dataset(path, progress=False)
    seconds = time.perf_counter() - start
    assert dataset.class_names == class_names
    assert dataset.train.images.shape == (sum(train_counts), 32, 32, 3)
    assert dataset.test.images.shape == (sum(test_counts), 32, 32, 3)
    np.testing.assert_array_equal(dataset.class_counts("train"), train_counts)
    np.testing.assert_array_equal(dataset.class_counts("test"), test_counts)
    assert 0.05 < float(dataset.test.images.mean()) < 0.95
    print(f"{archive}: loaded in {seconds:.2f} s")
