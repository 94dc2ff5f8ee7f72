"""Datasets stored as arrays (``.npz``, ``.h5``), and the array -> :class:`ImageDataset` step.

An array file holds four arrays. Names match case-insensitively, so both ``x_train`` and the
``X_train/Y_train/X_test/Y_test`` of the ``gtsrb_dataset.h5`` read by the official AWM code work::

    x_train [N, H, W, C] or [N, H, W]   y_train [N] int, [N, 1] or one-hot [N, K]
    x_test  [M, H, W, C] or [M, H, W]   y_test  [M] int, [M, 1] or one-hot [M, K]
    class_names [K] str                 (optional)

Images are ``uint8`` in 0-255 or float in 0-1. Float pixels in 0-255 (the AWM GTSRB file; its
loader divides by 255) are refused unless ``pixel_scale=255`` says so, because silently guessing the
scale would also "fix" data that is simply broken.

:func:`dataset_from_arrays` and :class:`ImageStacker` are shared by every source: whatever the file
format, images end up ``float32[N, H, W, C]`` in ``[0, 1]`` and validated once, here.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from awm_jax.data.dataset import ImageDataset, make_split

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
ImageSize = tuple[int, int]


def normalize_image_size(image_size: int | Sequence[int] | None) -> ImageSize | None:
    """``None``, ``s`` or ``(height, width)`` -> ``None`` or ``(height, width)``.

    Raises:
      ValueError: not one or two positive integers.
    """
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else image_size
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ValueError(
            f"image_size must be a positive int or (height, width); got {image_size!r}.")
    return int(size[0]), int(size[1])


def resize_image(image: np.ndarray, size: ImageSize) -> np.ndarray:
    """Resizes one ``[H, W]`` or ``[H, W, C]`` image to ``size`` with PIL's bilinear filter.

    ``uint8`` images go through PIL's 8-bit path (rounded); float images are resized one
    channel at a time in PIL's 32-bit float mode so that nothing is quantised.
    """
    height, width = size
    if image.dtype == np.uint8 and (image.ndim == 2 or image.shape[-1] in (1, 3)):
        squeeze = image.ndim == 3 and image.shape[-1] == 1
        pil = Image.fromarray(image[..., 0] if squeeze else image)
        out = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR))
        return out[..., None] if squeeze else out
    planes = image[..., None] if image.ndim == 2 else image
    resized = [np.asarray(Image.fromarray(planes[..., c].astype(np.float32), mode="F")
                          .resize((width, height), Image.Resampling.BILINEAR))
               for c in range(planes.shape[-1])]
    out = np.stack(resized, axis=-1).astype(image.dtype, copy=False)
    return out[..., 0] if image.ndim == 2 else out


class ImageStacker:
    """Collects decoded ``uint8`` images of a dataset and stacks them per split into NHWC.

    Every image of the dataset (both splits) must have the size of the first one; the first that
    does not is an error naming both files. Greyscale images stay one channel unless the dataset
    also holds colour images, in which case they are repeated to RGB (what PIL's L->RGB does).
    """

    def __init__(self, source: str):
        self.source = source
        self._images: dict[str, list[np.ndarray]] = {}
        self._size: tuple[int, int] | None = None
        self._first_name = ""

    def add(self, split: str, image: np.ndarray, name: str) -> None:
        """Adds ``uint8[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` ``image`` read from ``name``.

        Raises:
          ValueError: the image's size differs from the first image's, or its shape is not one of
            the above.
        """
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
            raise ValueError(f"{name}: expected a greyscale or RGB image; got shape {image.shape}.")
        size = image.shape[:2]
        if self._size is None:
            self._size, self._first_name = size, name
        elif size != self._size:
            raise ValueError(
                f"{name}: image is {size[0]}x{size[1]} (HxW) but {self._first_name} is "
                f"{self._size[0]}x{self._size[1]}; all images of a dataset must share one size. "
                "Pass image_size=(height, width) to resize every image, or fix the file.")
        self._images.setdefault(split, []).append(image)

    def stack(self, split: str) -> np.ndarray:
        """``uint8[N, H, W, C]`` for ``split``, C = 3 if any image of the dataset is RGB, else 1."""
        images = self._images.get(split, [])
        if not images:
            raise ValueError(f"{self.source}: the {split!r} split has no images.")
        any_rgb = any(im.ndim == 3 for ims in self._images.values() for im in ims)
        if any_rgb:
            images = [im if im.ndim == 3 else np.repeat(im[..., None], 3, axis=-1)
                      for im in images]
            return np.stack(images)
        return np.stack(images)[..., None]


def dataset_from_arrays(name: str, x_train: Any, y_train: Any, x_test: Any, y_test: Any, *,
                        class_names: Sequence[str] | None = None,
                        num_classes: int | None = None, pixel_scale: float | None = None,
                        image_size: int | Sequence[int] | None = None) -> ImageDataset:
    """Builds a validated :class:`ImageDataset` from image and label arrays.

    Args:
      name: where the arrays came from; used as the dataset name and in error messages.
      x_train, x_test: ``[N, H, W, C]`` or ``[N, H, W]`` images, integer (0-255 unless
        ``pixel_scale``) or float (0-1 unless ``pixel_scale``).
      y_train, y_test: ``[N]`` or ``[N, 1]`` integer labels, or ``[N, K]`` one-hot rows.
      class_names: one name per class; defaults to ``"0"..."K-1"``.
      num_classes: K, if not given by ``class_names`` or one-hot width; else ``max label + 1``.
      pixel_scale: the value of a white pixel; default 255 for integer and 1 for float images.
      image_size: ``(height, width)`` (or one int) to resize every image to, with PIL bilinear.

    Returns:
      The dataset with ``float32[N, H, W, C]`` images in ``[0, 1]`` and ``int32[N]`` labels.

    Raises:
      ValueError: bad shapes, pixel values outside ``[0, pixel_scale]``, malformed one-hot rows,
        disagreeing class counts, or labels outside ``[0, K)``.
    """
    size = normalize_image_size(image_size)
    splits = {}
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        images = _unit_float_images(np.asarray(x), pixel_scale, f"{name} x_{split}")
        if size is not None:
            images = np.stack([resize_image(im, size) for im in images]).clip(0.0, 1.0)
        splits[split] = (images, *_integer_labels(np.asarray(y), f"{name} y_{split}"))
    num_classes = _resolve_num_classes(name, splits, class_names, num_classes)
    if class_names is None:
        class_names = [str(k) for k in range(num_classes)]
    return ImageDataset(
        name=name,
        train=make_split(splits["train"][0], splits["train"][1], num_classes, f"{name} train"),
        test=make_split(splits["test"][0], splits["test"][1], num_classes, f"{name} test"),
        class_names=tuple(str(c) for c in class_names),
    )


def _unit_float_images(x: np.ndarray, pixel_scale: float | None, name: str) -> np.ndarray:
    if x.ndim == 3:  # [N, H, W] greyscale, as MNIST-style arrays are often saved.
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{name} must be [N, H, W, C] or [N, H, W]; got shape {x.shape}.")
    if x.shape[-1] not in (1, 3, 4) and x.shape[1] in (1, 3):
        raise ValueError(
            f"{name} has shape {x.shape}, which looks channels-first (NCHW); the batch contract "
            "is NHWC: save x.transpose(0, 2, 3, 1) instead.")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}).")
    is_int = np.issubdtype(x.dtype, np.integer)
    if not is_int and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must hold integer or float pixels; got dtype {x.dtype}.")
    scale = float(pixel_scale) if pixel_scale is not None else (255.0 if is_int else 1.0)
    if x.dtype == np.uint8 and scale == 255.0:  # in range by construction; skip two passes.
        return np.divide(x, np.float32(scale), dtype=np.float32)
    low, high = float(x.min()), float(x.max())
    if pixel_scale is None and not is_int and 1.0 < high <= 255.0 and low >= 0.0:
        raise ValueError(
            f"{name} holds float pixels up to {high:.4g}, which looks like 0-255 rather than 0-1; "
            "pass pixel_scale=255 (as for the AWM gtsrb_dataset.h5) or save the images as uint8.")
    if low < 0.0 or high > scale:
        raise ValueError(
            f"{name} pixels must lie in [0, {scale:g}]; got [{low:.4g}, {high:.4g}]. "
            "Pass pixel_scale= with the value of a white pixel.")
    return np.divide(x, np.float32(scale), dtype=np.float32)


def _integer_labels(y: np.ndarray, name: str) -> tuple[np.ndarray, int | None]:
    """Returns ``int64[N]`` labels and the one-hot width (None if ``y`` was not one-hot)."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        valid = np.isin(y, (0, 1)).all(axis=1) & (y.sum(axis=1) == 1)
        if not valid.all():
            row = int(np.argmin(valid))
            raise ValueError(
                f"{name} is 2-D, so it must be one-hot (each row one 1, the rest 0); row {row} is "
                f"{y[row].tolist()[:12]}.")
        return np.argmax(y, axis=1).astype(np.int64), int(y.shape[1])
    if y.ndim != 1:
        raise ValueError(f"{name} must be [N], [N, 1] or one-hot [N, K]; got shape {y.shape}.")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{name} holds non-integer float labels; expected class indices.")
    elif not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices; got dtype {y.dtype}.")
    return y.astype(np.int64), None


def _resolve_num_classes(name: str, splits: Mapping[str, tuple], class_names, num_classes) -> int:
    """K from class_names, num_classes and one-hot widths, which must agree; else max label + 1."""
    claims = {}
    if class_names is not None:
        claims["class_names"] = len(class_names)
    if num_classes is not None:
        claims["num_classes"] = int(num_classes)
    for split, (_, _, width) in splits.items():
        if width is not None:
            claims[f"one-hot width of y_{split}"] = width
    if len(set(claims.values())) > 1:
        raise ValueError(f"{name}: the number of classes disagrees: {claims}.")
    if claims:
        return next(iter(claims.values()))
    # Negative labels are caught by validate_labels later, with the file named.
    return max((int(labels.max()) for _, labels, _ in splits.values() if labels.size),
               default=-1) + 1


def load_array_file(path: str | os.PathLike, *, class_names: Sequence[str] | None = None,
                    num_classes: int | None = None, pixel_scale: float | None = None,
                    image_size: int | Sequence[int] | None = None) -> ImageDataset:
    """Loads an ``.npz`` or ``.h5``/``.hdf5`` file laid out as in the module docstring.

    Args:
      path: the file.
      class_names, num_classes, pixel_scale, image_size: see :func:`dataset_from_arrays`;
        ``class_names`` overrides a ``class_names`` array stored in the file.

    Raises:
      ValueError: unreadable file, missing or ambiguous keys, or any error of
        :func:`dataset_from_arrays`.
      ImportError: an ``.h5`` file and h5py is not installed.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".npz":
        arrays = _read_npz(path)
    elif suffix in (".h5", ".hdf5"):
        arrays = _read_h5(path)
    else:
        raise ValueError(f"{path}: unsupported array file type {suffix!r}; use .npz, .h5 or .hdf5.")
    by_lower: dict[str, str] = {}
    for key in arrays:
        if key.lower() in by_lower:
            raise ValueError(f"{path}: keys {by_lower[key.lower()]!r} and {key!r} differ only in "
                             "case; keep one of them.")
        by_lower[key.lower()] = key
    missing = [k for k in ARRAY_KEYS if k not in by_lower]
    if missing:
        raise ValueError(f"{path}: missing arrays {missing} (found {sorted(arrays)}); expected "
                         f"{list(ARRAY_KEYS)} (any capitalisation, e.g. X_train/Y_train).")
    if class_names is None and "class_names" in by_lower:
        class_names = [str(c) for c in np.asarray(arrays[by_lower["class_names"]]).tolist()]
    x_train, y_train, x_test, y_test = (arrays[by_lower[k]] for k in ARRAY_KEYS)
    return dataset_from_arrays(str(path), x_train, y_train, x_test, y_test,
                               class_names=class_names, num_classes=num_classes,
                               pixel_scale=pixel_scale, image_size=image_size)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        # allow_pickle=False also lands here for object arrays, which could run code on load.
        raise ValueError(f"{path}: cannot read as .npz ({type(err).__name__}: {err}). Save plain "
                         "numeric arrays with numpy.savez.") from err


def _read_h5(path: Path) -> dict[str, np.ndarray]:
    try:
        import h5py
    except ImportError as err:
        raise ImportError(f"{path}: reading .h5 files needs h5py: pip install h5py "
                          "(or convert the file to .npz).") from err
    try:
        with h5py.File(path, "r") as handle:
            return {key: np.asarray(handle[key][()]) for key in handle.keys()
                    if isinstance(handle[key], h5py.Dataset)}
    except OSError as err:
        raise ValueError(f"{path}: cannot read as HDF5 ({err}).") from err
