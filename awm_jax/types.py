"""Shared type aliases and the one batch contract, validated at the boundary.

Every data source produces images as ``float32[N, H, W, C]`` in ``[0, 1]`` and labels as
``int32[N]`` in ``[0, num_classes)``; :func:`validate_images` and :func:`validate_labels` check
that once, before anything is jitted, and raise a ``ValueError`` that names the problem.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

Array = jax.Array
ArrayLike = jax.typing.ArrayLike
PRNGKey = jax.Array
Params = Any  # nested dict of arrays, as produced by flax.linen ``init``.
BatchStats = Any
Variables = Mapping[str, Any]  # {"params": Params, "batch_stats": BatchStats}
Mask = Any  # pytree mirroring Params; ``None`` where a leaf is not masked.
Batch = Mapping[str, Array]  # {"image": float32[B, H, W, C], "label": int32[B]}
Metrics = dict[str, Array]


def validate_images(images: ArrayLike, name: str = "images") -> np.ndarray:
    """Checks the image half of the batch contract and returns a float32 numpy array.

    Args:
      images: ``[N, H, W, C]`` pixels in ``[0, 1]``.
      name: what to call the array in error messages.

    Raises:
      ValueError: wrong rank, non-float dtype, non-finite values, or values outside [0, 1].
    """
    array = np.asarray(images)
    if array.ndim != 4:
        hint = (" For greyscale [N, H, W] images add a channel axis: images[..., None]."
                if array.ndim == 3 else "")
        raise ValueError(
            f"{name} must have rank 4 [N, H, W, C] (NHWC); got shape {array.shape}.{hint}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"{name} must be floating point in [0, 1]; got dtype {array.dtype}. "
            "Divide uint8 images by 255.")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); at least one image is needed.")
    finite = np.isfinite(array)
    if not np.all(finite):
        bad = int(np.sum(~np.all(finite.reshape(array.shape[0], -1), axis=1)))
        raise ValueError(f"{name} contains NaN or Inf values in {bad} of {array.shape[0]} "
                         "images; fix or drop those images.")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        if low < 0.0:
            hint = (" Pass raw pixels; normalisation belongs inside the model (its mean/std) so "
                    "that triggers act on pixels.")
        elif high > 2.0:
            hint = " These look like 0..255 pixels: divide by 255."
        else:
            hint = " Clip them to [0, 1]."
        raise ValueError(
            f"{name} must lie in [0, 1]; got values in [{low:.4g}, {high:.4g}].{hint}")
    return array.astype(np.float32, copy=False)


def validate_labels(labels: ArrayLike, num_classes: int, count: int | None = None,
                    name: str = "labels") -> np.ndarray:
    """Checks the label half of the batch contract and returns an int32 numpy array.

    Args:
      labels: ``[N]`` integer class indices.
      num_classes: labels must lie in ``[0, num_classes)``.
      count: if given, the number of labels expected (the number of images).
      name: what to call the array in error messages.

    Raises:
      ValueError: wrong rank or count, non-integer dtype, or a label out of range.
    """
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{name} must have rank 1 [N] of class indices; got shape "
                         f"{array.shape} (one-hot labels: take argmax over the last axis).")
    if count is not None and array.shape[0] != count:
        raise ValueError(f"{name} has {array.shape[0]} entries but there are {count} images; "
                         "pass exactly one label per image.")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices; got dtype {array.dtype} "
                         "(cast with .astype(int) if they are whole numbers).")
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        bad = array[(array < 0) | (array >= num_classes)]
        raise ValueError(
            f"{name} must lie in [0, {num_classes}); found {bad.size} out of range, "
            f"e.g. {int(bad[0])}. Labels are class indices: remap them to 0..{num_classes - 1} "
            "or check num_classes.")
    return array.astype(np.int32, copy=False)
