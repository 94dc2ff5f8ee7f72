"""An on-disk cache of decoded datasets, keyed by the content of their source.

Decoding 60,000 JPEGs takes tens of seconds on two cores; reading the same pixels back from an
uncompressed ``.npz`` takes well under a second. Entries hold ``uint8`` pixels (a quarter of the
size of ``float32``, and exactly what the decoder produced), ``int32`` labels and the class names::

    train_images uint8[N, H, W, C]   train_labels int32[N]
    test_images  uint8[M, H, W, C]   test_labels  int32[M]
    class_names  str[K]

Keys: a file (archive) is fingerprinted by a SHA-256 of its bytes. Hashing 45 MB costs about 0.1 s,
a small price next to decoding, and unlike size+mtime+path it still hits after the archive is copied
or re-downloaded and it never hits stale after an in-place edit that keeps size and mtime. A
directory is fingerprinted by its sorted relative paths with sizes and ``mtime_ns``: hashing every
image would cost as much as reading it. The key also covers the loader options (e.g. ``image_size``)
and :data:`CACHE_VERSION`, so changing either starts a new entry.

The cache lives in ``$AWM_JAX_CACHE`` or ``~/.cache/awm_jax``. Files are written to a temporary name
and renamed into place, so readers never see half a file; an unreadable or inconsistent entry is
treated as a miss (and overwritten by the next save), never as an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

CACHE_ENV = "AWM_JAX_CACHE"
CACHE_VERSION = 1  # bump when the decoder or the entry layout changes.
ENTRY_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "class_names")

_log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """The cache directory: ``$AWM_JAX_CACHE`` if set, else ``~/.cache/awm_jax``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "awm_jax"


def fingerprint_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of the bytes of ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_tree(root: str | os.PathLike) -> str:
    """SHA-256 of the sorted ``(relative path, size, mtime_ns)`` of everything under ``root``.

    A missing ``root`` hashes like an empty one, so callers need not special-case it.
    """
    root = Path(root)
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            try:
                stat = full.stat()
            except OSError:  # a dangling link or a file removed mid-walk: hash its name only.
                rows.append([full.relative_to(root).as_posix(), -1, -1])
                continue
            rows.append([full.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def cache_key(kind: str, fingerprint: str, **options: Any) -> str:
    """A hex key over the loader ``kind``, the source ``fingerprint`` and JSON-able ``options``."""
    blob = json.dumps({"version": CACHE_VERSION, "kind": kind, "fingerprint": fingerprint,
                       "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def entry_path(key: str, label: str = "dataset") -> Path:
    """Where the entry for ``key`` lives; ``label`` only makes the file name readable."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:64] or "dataset"
    return cache_dir() / f"{safe}-{key[:24]}.npz"


def load_entry(path: Path) -> dict[str, np.ndarray] | None:
    """Reads a cache entry, or returns None if it is absent, unreadable or inconsistent."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            entry = {key: npz[key] for key in ENTRY_KEYS}
        _check_entry(entry)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        # A crash mid-write cannot leave this (writes are atomic), but a full disk, a manual
        # edit or a numpy upgrade can; re-decoding is always a correct answer.
        _log.warning("ignoring unreadable cache entry %s (%s); decoding again.", path, err)
        return None
    return entry


def _check_entry(entry: Mapping[str, np.ndarray]) -> None:
    for split in ("train", "test"):
        images, labels = entry[f"{split}_images"], entry[f"{split}_labels"]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{split}_images is {images.dtype}{list(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"{split}_labels has shape {labels.shape}")
    if entry["class_names"].ndim != 1 or entry["class_names"].dtype.kind != "U":
        raise ValueError("class_names is not a 1-D string array")


def save_entry(path: Path, entry: Mapping[str, np.ndarray]) -> None:
    """Writes ``entry`` (see the module docstring) atomically; failures only log a warning.

    Uncompressed on purpose: zlib gains little on natural-image pixels and costs about a second
    per load on CIFAR-10.
    """
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.",
                                         suffix=".tmp", delete=False) as handle:
            tmp_name = handle.name
            np.savez(handle, **{key: np.asarray(entry[key]) for key in ENTRY_KEYS})
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp's 0600 would hide a shared cache from other users.
        os.replace(tmp_name, path)
        tmp_name = None
    except OSError as err:
        # A read-only or full cache must not stop training; the next load just decodes again.
        _log.warning("could not write cache entry %s (%s); set $%s to a writable directory.",
                     path, err, CACHE_ENV)
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
