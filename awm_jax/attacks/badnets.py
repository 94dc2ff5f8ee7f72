"""BadNets (Gu, Dolan-Gavitt & Garg, 2017): a solid patch stamped at a fixed position.

Poisoned images get a ``patch_size x patch_size`` square of value ``value`` (all channels) whose
top-left corner is at ``(row, col)``; negative positions count from the bottom/right edge. The
AWM code's CIFAR-10 trigger is a 4x4 white square at rows/cols 27-30 (``row=col=-5``, 1 px in
from the bottom-right corner) with target label 8 (awm-paper.md 2.3).
"""

from __future__ import annotations

import jax.numpy as jnp

from awm_jax.attacks.base import ATTACKS, Attack, all_to_one, validate_target
from awm_jax.types import Array, PRNGKey


def patch_slices(image_hw: tuple[int, int], patch_size: int, row: int, col: int):
    """Returns the (row slice, col slice) of the patch in an image of size ``image_hw``.

    Raises:
      ValueError: the patch does not fit inside the image.
    """
    height, width = image_hw
    top = row if row >= 0 else height + row - patch_size + 1
    left = col if col >= 0 else width + col - patch_size + 1
    if patch_size < 1 or top < 0 or left < 0 or top + patch_size > height or \
            left + patch_size > width:
        raise ValueError(
            f"a {patch_size}x{patch_size} patch at (row={row}, col={col}) does not fit in a "
            f"{height}x{width} image.")
    return slice(top, top + patch_size), slice(left, left + patch_size)


@ATTACKS.register("badnets")
def badnets(target: int = 8, patch_size: int = 4, row: int = -2, col: int = -2,
            value: float = 1.0, num_classes: int | None = None) -> Attack:
    """Creates the BadNets attack.

    Args:
      target: target class of the all-to-one backdoor.
      patch_size: side of the square patch in pixels.
      row, col: position of the patch's top-left corner; negative values place the patch's
        bottom/right edge at ``-1 - row`` pixels from the image's bottom/right edge, so
        ``row=col=-2`` leaves a 1-pixel margin at the bottom-right corner (as the AWM code).
      value: pixel value of the patch in [0, 1].
      num_classes: if given, ``target`` is checked against it.

    Raises:
      ValueError: bad target, patch size or value.
    """
    validate_target(target, num_classes)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"patch value must be in [0, 1]; got {value}.")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1; got {patch_size}.")

    def apply_trigger(images: Array, key: PRNGKey | None = None) -> Array:
        del key  # the BadNets trigger is deterministic.
        rows, cols = patch_slices(images.shape[1:3], patch_size, row, col)
        return images.at[:, rows, cols, :].set(jnp.asarray(value, images.dtype))

    return Attack("badnets", apply_trigger, all_to_one(target), target, False,
                  dict(target=target, patch_size=patch_size, row=row, col=col, value=value))
