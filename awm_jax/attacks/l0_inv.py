"""l0-inv (I-BAU, Zeng et al., ICLR 2022): a small patch of binary colours in the bottom row.

The I-BAU/AWM code applies ``x' = x * (1 - mask) + trigger`` with ``mask_l0_inv.png`` and
``l0_inv.png`` and target 0 (awm-paper.md 2.3): the mask covers the bottom row (row 31), cols 23-31,
all channels; the trigger leaves col 23 black and gives cols 24-31 binary RGB colours, trigger L1 16.
Those files are not public, so this is a **procedural equivalent** with the same geometry and norm:
cols 24-31 get white, yellow, cyan, magenta, red, white, green, yellow (L1 = 16).

Other image sizes: the mask is the last 9 columns of the bottom row. Other channel counts: one
channel takes the mean of the RGB colour; C > 1 channels take RGB channel ``c mod 3``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from awm_jax.attacks.base import ATTACKS, Attack, all_to_one, validate_target
from awm_jax.attacks.trojan import rgb_to_channels
from awm_jax.types import Array, PRNGKey

L0_COLOURS = np.array([[0, 0, 0],  # col 23 (W-9): masked but left black, as in the I-BAU file.
                       [1, 1, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1],
                       [1, 0, 0], [1, 1, 1], [0, 1, 0], [1, 1, 0]], np.float32)


def l0_mask_and_trigger(image_shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The ``(mask, trigger)`` pair, each ``float32[H, W, C]``, for images of ``image_shape``.

    Raises:
      ValueError: the image is narrower than 9 pixels.
    """
    height, width, channels = image_shape
    span = len(L0_COLOURS)
    if width < span:
        raise ValueError(f"l0_inv needs images at least {span} pixels wide; got width {width}.")
    mask = np.zeros((height, width, channels), np.float32)
    trigger = np.zeros_like(mask)
    mask[-1, -span:] = 1.0
    trigger[-1, -span:] = rgb_to_channels(L0_COLOURS, channels)
    return mask, trigger


@ATTACKS.register("l0_inv")
def l0_inv(target: int = 0, num_classes: int | None = None) -> Attack:
    """Creates the l0-inv attack: replaces the last 9 pixels of the bottom row by fixed colours.

    Args:
      target: target class of the all-to-one backdoor (0 in the AWM code).
      num_classes: if given, ``target`` is checked against it.

    Raises:
      ValueError: bad target; at trace time, images narrower than 9 pixels.
    """
    validate_target(target, num_classes)

    def apply_trigger(images: Array, key: PRNGKey | None = None) -> Array:
        del key  # the l0-inv trigger is fixed.
        mask, trigger = (jnp.asarray(a, images.dtype)
                         for a in l0_mask_and_trigger(tuple(images.shape[1:])))
        return jnp.clip(images * (1.0 - mask) + trigger, 0.0, 1.0)

    return Attack("l0_inv", apply_trigger, all_to_one(target), target, False, dict(target=target))
