"""One entry point, :func:`load_dataset`, from a source string to an :class:`ImageDataset`.

A source is, in the order tried:

1. ``"tfds:<name>"``: a TensorFlow Datasets name, explicitly (:mod:`awm_jax.data.tfds_source`).
2. an embedded name: ``"digits"`` (16x16) or ``"digits<size>"`` such as ``"digits8"``
   (:mod:`awm_jax.data.digits`, offline, no files).
3. an existing path: a directory or ``.tar``/``.tar.gz``/``.tgz`` archive in ImageFolder layout
   (:mod:`awm_jax.data.folder`), or an ``.npz``/``.h5``/``.hdf5`` array file
   (:mod:`awm_jax.data.arrays`).
4. anything else that does not look like a path: a TFDS name (``"cifar10"``, ``"mnist"``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from awm_jax.data.arrays import load_array_file
from awm_jax.data.dataset import ImageDataset
from awm_jax.data.digits import load_digits
from awm_jax.data.folder import ARCHIVE_SUFFIXES, is_archive, load_image_folder

EMBEDDED_DATASETS = {"digits": load_digits}
ARRAY_SUFFIXES = (".npz", ".h5", ".hdf5")
TFDS_PREFIX = "tfds:"


def load_dataset(source: str | os.PathLike, **kwargs) -> ImageDataset:
    """Loads a dataset named by ``source`` (see the module docstring for the forms).

    Args:
      source: ``"digits"``, a path, ``"tfds:<name>"`` or a bare TFDS name.
      **kwargs: passed to the loader: ``size`` for digits; ``image_size``, ``cache``, ``progress``
        for folders/archives; ``class_names``, ``num_classes``, ``pixel_scale``, ``image_size``
        for array files; ``data_dir``, ``download``, ``train_split``, ``test_split``,
        ``image_size``, ``cache``, ``progress`` for TFDS (the others ignore ``download``).

    Returns:
      The dataset, validated against the batch contract of :mod:`awm_jax.types`.

    Raises:
      ValueError: the source matches none of the forms (the message lists what was tried), or
        its loader rejects it.
      ImportError: the source needs an optional package (tensorflow-datasets, h5py).
    """
    text = os.fspath(source)
    if text.startswith(TFDS_PREFIX):
        from awm_jax.data.tfds_source import load_tfds

        return load_tfds(text[len(TFDS_PREFIX):], **kwargs)
    local_kwargs = {k: v for k, v in kwargs.items() if k != "download"}  # nothing to fetch.
    if text in EMBEDDED_DATASETS:
        return EMBEDDED_DATASETS[text](**local_kwargs)
    sized_digits = re.fullmatch(r"digits(\d+)", text)
    if sized_digits:
        return load_digits(size=int(sized_digits.group(1)), **local_kwargs)
    path = Path(text).expanduser()
    if path.exists():
        return _load_path(path, **local_kwargs)
    tried = [f"no file or directory {str(path.resolve())!r}",
             f"not an embedded dataset ({', '.join(sorted(EMBEDDED_DATASETS))})"]
    if _looks_like_path(text):
        raise ValueError(f"cannot load dataset {text!r}: {'; '.join(tried)}; it looks like a path, "
                         "so it was not tried as a TFDS name.")
    return _load_tfds_name(text, tried, **kwargs)


def _load_path(path: Path, **kwargs) -> ImageDataset:
    if path.is_dir() or is_archive(path):
        return load_image_folder(path, **kwargs)
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return load_array_file(path, **kwargs)
    raise ValueError(
        f"cannot load dataset {str(path)!r}: unsupported file type; expected a directory, "
        f"{', '.join(ARCHIVE_SUFFIXES + ARRAY_SUFFIXES)}.")


def _looks_like_path(text: str) -> bool:
    # TFDS names are identifiers with optional "/config" and ":version", never these.
    lowered = text.lower()
    return (text.startswith((".", "~", os.sep)) or "\\" in text
            or lowered.endswith(ARCHIVE_SUFFIXES + ARRAY_SUFFIXES)
            or text.count("/") > 1)


def _load_tfds_name(name: str, tried: list[str], **kwargs) -> ImageDataset:
    try:
        from awm_jax.data.tfds_source import UnknownTfdsName, import_tfds, load_tfds

        import_tfds()
    except ImportError as err:
        raise ValueError(f"cannot load dataset {name!r}: {'; '.join(tried)}; and it may be a TFDS "
                         f"name, but {err}") from err
    try:
        return load_tfds(name, **kwargs)
    except UnknownTfdsName as err:
        raise ValueError(f"cannot load dataset {name!r}: {'; '.join(tried)}; {err}") from err
