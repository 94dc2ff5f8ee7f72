"""ImageFolder datasets: a directory or a ``.tar``/``.tar.gz``/``.tgz`` archive of one.

Layout (the shared ``cifar10-jpeg.tar.gz`` and ``gtsrb-32.tar.gz`` add one top folder, which is
found and skipped)::

    <root>/train/<class>/<image>      <root>/test/<class>/<image>

Class names are the sorted folder names and label ``k`` is the k-th of them (for CIFAR-10 that is
the standard label order). Files whose extension PIL does not know (READMEs, CSVs) and hidden
entries (``.DS_Store``, ``__MACOSX``) are ignored; other split folders (``val``) are ignored too.
Images inside a class folder may sit in sub-folders. Every image is decoded by PIL alone, so a
directory, its archive and the cache give the same pixels.

Decoded ``uint8`` arrays are cached on disk (see :mod:`awm_jax.data.cache`), so only the first
load of an archive pays for decoding.
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from awm_jax.data import cache as cache_lib
from awm_jax.data.arrays import ImageSize, ImageStacker, dataset_from_arrays, normalize_image_size
from awm_jax.data.dataset import ImageDataset

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SPLITS = ("train", "test")
Layout = dict[str, list[tuple[str, int]]]  # split -> [(relative path, label)], sorted.


def is_archive(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a tar archive we read (by suffix)."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def decode_image(data: bytes, name: str, image_size: ImageSize | None = None) -> np.ndarray:
    """Decodes one encoded image with PIL into ``uint8[H, W]`` (greyscale) or ``[H, W, 3]``.

    Palette, CMYK and alpha images become RGB (alpha dropped); 1-bit and 16-bit greyscale become
    8-bit greyscale.

    Args:
      data: the file's bytes.
      name: the file, for error messages.
      image_size: ``(height, width)`` to resize to with PIL's bilinear filter, or None.

    Raises:
      ValueError: the bytes are not a readable image.
    """
    try:
        with _open_image(data, name) as image:
            image.load()  # force a full decode here so truncated files fail inside the try.
            image = _as_grey_or_rgb(image)
            if image_size is not None and image.size != (image_size[1], image_size[0]):
                image = image.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{name}: cannot decode image ({type(err).__name__}: {err}); the file is "
                         "corrupt or not an image: replace or delete it.") from err


def _open_image(data: bytes, name: str) -> Image.Image:
    # Without a format hint, Image.open probes every registered plugin in turn, which costs more
    # than decoding a 32x32 JPEG; the extension is right almost always, and is only a hint.
    hint = _extension_formats().get(PurePosixPath(name).suffix.lower())
    if hint is not None:
        try:
            return Image.open(io.BytesIO(data), formats=[hint])
        except UnidentifiedImageError:
            pass
    return Image.open(io.BytesIO(data))


@functools.cache
def _extension_formats() -> dict[str, str]:
    return Image.registered_extensions()  # {".jpg": "JPEG", ...}; loads all plugins once.


def _as_grey_or_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("1", "LA"):
        return image.convert("L")
    if image.mode.startswith("I"):  # 16/32-bit greyscale: map 0-65535 onto 0-255.
        pixels = np.asarray(image, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns if a transparent palette goes straight to RGB.
    return image.convert("RGB")


def load_image_folder(path: str | os.PathLike, *,
                      image_size: int | Sequence[int] | None = None,
                      cache: bool = True, progress: bool = True) -> ImageDataset:
    """Loads an ImageFolder directory or tar archive (layout in the module docstring).

    Args:
      path: the directory, or a ``.tar``, ``.tar.gz`` or ``.tgz`` file.
      image_size: ``(height, width)`` (or one int) to resize every image to. Without it, images
        of different sizes are an error.
      cache: read and write the decoded-array cache.
      progress: show tqdm progress bars while reading and decoding.

    Returns:
      The dataset: ``float32[N, H, W, C]`` images in ``[0, 1]`` (C = 1 if every image is
      greyscale, else 3), ``int32`` labels, sorted class folder names as ``class_names``.

    Raises:
      ValueError: a missing path, an unreadable archive, a wrong layout (no ``train``/``test``
        folder, class folders that differ between splits, an empty class, an image outside a class
        folder), an undecodable image, or images of different sizes; each names the file or class.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory.")
    archive = path.is_file()
    if archive and not is_archive(path):
        raise ValueError(f"{path}: not a directory or a {'/'.join(ARCHIVE_SUFFIXES)} archive.")
    size = normalize_image_size(image_size)
    entry = None
    if cache:
        entry_file = cache_entry_path(path, size)
        entry = cache_lib.load_entry(entry_file)
    if entry is None:
        entry = _decode(path, archive, size, progress)
        if cache:
            cache_lib.save_entry(entry_file, entry)
    return dataset_from_arrays(
        str(path), entry["train_images"], entry["train_labels"], entry["test_images"],
        entry["test_labels"], class_names=[str(c) for c in entry["class_names"]])


def cache_entry_path(path: str | os.PathLike,
                     image_size: int | Sequence[int] | None = None) -> Path:
    """Where the decoded arrays of the folder or archive ``path`` are (or would be) cached."""
    path = Path(path).expanduser()
    fingerprint = (cache_lib.fingerprint_file(path) if path.is_file()
                   else cache_lib.fingerprint_tree(path))
    key = cache_lib.cache_key("image_folder", fingerprint,
                              image_size=normalize_image_size(image_size))
    return cache_lib.entry_path(key, _stem(path))


def _stem(path: Path) -> str:
    name = path.name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _decode(path: Path, archive: bool, size: ImageSize | None,
            progress: bool) -> dict[str, np.ndarray]:
    """Reads, checks the layout of and decodes a folder or archive into a cache entry."""
    if archive:
        contents, dirs = _read_tar(path, progress)
        read = contents.__getitem__
        describe = lambda rel: f"{path} member {rel}"  # noqa: E731
    else:
        files, dirs = _list_directory(path)
        contents = dict.fromkeys(files)
        read = lambda rel: _read_file(path / rel)  # noqa: E731
        describe = lambda rel: str(path / rel)  # noqa: E731
    class_names, layout = resolve_layout(str(path), contents, dirs)
    stacker = ImageStacker(str(path))
    total = sum(len(items) for items in layout.values())
    with tqdm(total=total, unit="img", desc=f"decoding {path.name}", disable=not progress) as bar:
        for split, items in layout.items():
            for rel, _ in items:
                stacker.add(split, decode_image(read(rel), describe(rel), size), describe(rel))
                bar.update()
    entry = {f"{split}_images": stacker.stack(split) for split in SPLITS}
    for split in SPLITS:
        entry[f"{split}_labels"] = np.array([label for _, label in layout[split]], np.int32)
    entry["class_names"] = np.array(class_names, dtype=str)
    return entry


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err}).") from err


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in _extension_formats()


def _clean_parts(name: str) -> tuple[str, ...] | None:
    """Archive-relative path parts, or None for hidden, AppleDouble or escaping entries."""
    parts = tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None  # also drops ``..``, which a well-formed dataset archive never needs.
    return parts


class _ProgressReader:
    """A read-only file wrapper that reports the compressed bytes consumed to a tqdm bar."""

    def __init__(self, raw, bar):
        self._raw, self._bar = raw, bar

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._bar.update(len(data))
        return data


def _read_tar(path: Path, progress: bool) -> tuple[dict[str, bytes], list[str]]:
    """Reads image members (bytes, by clean relative path) and directory names in one pass.

    Stream mode (``r|*``) reads members in archive order without seeking, which is the fast way
    through a gzip stream; holding the encoded bytes (~20-50 MB for CIFAR-10/GTSRB) lets the
    layout be checked before the slow decode starts.
    """
    contents: dict[str, bytes] = {}
    dirs: list[str] = []
    try:
        with open(path, "rb") as raw, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                            desc=f"reading {path.name}",
                                            disable=not progress) as bar:
            with tarfile.open(fileobj=_ProgressReader(raw, bar), mode="r|*") as tar:
                for member in tar:
                    parts = _clean_parts(member.name)
                    if parts is None or not parts:
                        continue
                    rel = "/".join(parts)
                    if member.isdir():
                        dirs.append(rel)
                    elif member.isfile() and _is_image(rel):
                        contents[rel] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise ValueError(f"{path}: cannot read the archive ({type(err).__name__}: {err}); it is "
                         "truncated or not a tar file: download or build it again.") from err
    return contents, dirs


def _list_directory(root: Path) -> tuple[list[str], list[str]]:
    files, dirs = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if _clean_parts(d) is not None]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirs.extend(prefix + d for d in dirnames)
        files.extend(prefix + f for f in filenames
                     if _clean_parts(f) is not None and _is_image(f))
    return files, dirs


def resolve_layout(source: str, files: Iterable[str],
                   dirs: Iterable[str]) -> tuple[list[str], Layout]:
    """Finds ``<root>/{train,test}/<class>/...`` among relative paths and labels every image.

    Args:
      source: the folder or archive, for error messages.
      files: relative paths of the image files.
      dirs: relative paths of directories (so that an empty class folder is seen).

    Returns:
      ``(class_names, layout)``: sorted class names and, per split, the sorted
      ``(path, label)`` pairs.

    Raises:
      ValueError: see :func:`load_image_folder`.
    """
    files = [tuple(f.split("/")) for f in files]
    dirs = [tuple(d.split("/")) for d in dirs]
    root = _find_root(files + dirs)
    prefix = "".join(part + "/" for part in root)
    depth = len(root)
    tops = {p[depth] for p in files + dirs if len(p) > depth and p[:depth] == root}
    missing = [s for s in SPLITS if s not in tops]
    if missing:
        raise ValueError(
            f"{source}: no {' or '.join(repr(s) for s in missing)} folder in "
            f"{prefix or 'the top level'} (found: {sorted(tops)[:10]}); expected an ImageFolder "
            "laid out as <root>/train/<class>/<image> and <root>/test/<class>/<image>.")
    per_split: dict[str, dict[str, list[str]]] = {}
    for split in SPLITS:
        classes: dict[str, list[str]] = {}
        for parts in dirs:
            if len(parts) >= depth + 2 and parts[depth] == split:
                classes.setdefault(parts[depth + 1], [])
        for parts in files:
            if len(parts) > depth and parts[depth] == split:
                if len(parts) == depth + 2:
                    raise ValueError(f"{source}: image {'/'.join(parts)} is not inside a class "
                                     f"folder; move it to {split}/<class>/.")
                classes.setdefault(parts[depth + 1], []).append("/".join(parts))
        per_split[split] = classes
    return _label(source, prefix, per_split)


def _find_root(entries: list[tuple[str, ...]]) -> tuple[str, ...]:
    """Descends through single wrapper folders (``cifar10/``) until a split folder shows up."""
    root: tuple[str, ...] = ()
    while True:
        tops = {p[len(root)] for p in entries if len(p) > len(root) and p[:len(root)] == root}
        if len(tops) != 1 or tops & set(SPLITS):
            return root
        root += (tops.pop(),)


def _label(source: str, prefix: str,
           per_split: dict[str, dict[str, list[str]]]) -> tuple[list[str], Layout]:
    train_classes, test_classes = set(per_split["train"]), set(per_split["test"])
    if not train_classes:
        raise ValueError(f"{source}: {prefix}train has no class folders.")
    if train_classes != test_classes:
        raise ValueError(
            f"{source}: class folders differ between splits: only in train: "
            f"{sorted(train_classes - test_classes)}, only in test: "
            f"{sorted(test_classes - train_classes)}.")
    class_names = sorted(train_classes)
    layout: Layout = {}
    for split in SPLITS:
        layout[split] = []
        for label, name in enumerate(class_names):
            images = sorted(per_split[split][name])
            if not images:
                raise ValueError(f"{source}: class folder {prefix}{split}/{name} holds no images; "
                                 "remove the class from both splits or add images.")
            layout[split].extend((rel, label) for rel in images)
    return class_names, layout
