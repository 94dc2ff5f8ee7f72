"""Trojan-SQ and Trojan-WM (Liu et al., NDSS 2018, "Trojaning attack on neural networks").

Both add a fixed trigger image ``t`` to the input, ``x' = clip(x + t, 0, 1)``, with target 2, as
the AWM/I-BAU code does with ``trojan_sq.png`` / ``trojan_wm.png``. Those files are not public
(awm-paper.md 2.3), so the triggers here are **procedural equivalents** that reproduce the measured
geometry and norms at 32x32x3, not the original pixels:

* ``trojan_sq``: a 9x9 multicoloured square at rows/cols 21-29. Each of its 243 entries is 0 or 1;
  entry ``n = 3 * (9 * i + j) + c`` is 1 iff ``(100 * n) mod 243 < 95`` (a fixed scramble), so
  L1 = 95 (file: 95.1), Linf = 1 and the pixels take mixed binary RGB colours.
* ``trojan_wm``: thin grey diagonal strokes over rows/cols 0-29: the lines ``(i + j) mod 3 == 0``
  and the main diagonal ``i == j`` (320 nonzero pixels; file: 321). The 10 crossings are white
  (1.0) and the other 310 stroke pixels grey at ``(115.2 - 30) / 930``, so L1 = 115.2, Linf = 1.

Other image sizes: the square keeps its 9x9 size and its 2-pixel margin from the bottom-right
corner (rows/cols ``H-11..H-3`` x ``W-11..W-3``); the watermark's strokes cover the top-left
``(H-2) x (W-2)`` region with the same rules and intensities. Other channel counts: one channel
takes the mean of the RGB pattern; C > 1 channels take RGB channel ``c mod 3``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from awm_jax.attacks.base import ATTACKS, Attack, all_to_one, validate_target
from awm_jax.types import Array, PRNGKey

SQ_SIZE, SQ_MARGIN, SQ_ONES = 9, 2, 95
WM_MARGIN, WM_L1 = 2, 115.2


def rgb_to_channels(pattern: np.ndarray, channels: int) -> np.ndarray:
    """Maps an RGB pattern ``[..., 3]`` to ``channels`` channels (mean for 1, else ``c mod 3``)."""
    if channels == 1:
        return pattern.mean(-1, keepdims=True)
    return pattern[..., [c % 3 for c in range(channels)]]


def sq_square() -> np.ndarray:
    """The 9x9x3 binary multicoloured square of ``trojan_sq`` (L1 95, Linf 1)."""
    entry = np.arange(SQ_SIZE * SQ_SIZE * 3).reshape(SQ_SIZE, SQ_SIZE, 3)
    return ((100 * entry) % entry.size < SQ_ONES).astype(np.float32)


def sq_pattern(image_shape: tuple[int, int, int]) -> np.ndarray:
    """The additive ``trojan_sq`` trigger ``float32[H, W, C]`` for images of ``image_shape``.

    Raises:
      ValueError: the image is smaller than 11x11 (the square and its margin do not fit).
    """
    height, width, channels = image_shape
    side = SQ_SIZE + SQ_MARGIN
    if height < side or width < side:
        raise ValueError(f"trojan_sq needs images of at least {side}x{side}; got {height}x{width}.")
    pattern = np.zeros((height, width, channels), np.float32)
    top, left = height - side, width - side
    pattern[top:top + SQ_SIZE, left:left + SQ_SIZE] = rgb_to_channels(sq_square(), channels)
    return pattern


def wm_pattern(image_shape: tuple[int, int, int]) -> np.ndarray:
    """The additive ``trojan_wm`` trigger ``float32[H, W, C]`` (grey, equal on all channels).

    Raises:
      ValueError: the image is smaller than 3x3.
    """
    height, width, channels = image_shape
    if height <= WM_MARGIN or width <= WM_MARGIN:
        raise ValueError(f"trojan_wm needs images larger than 2x2; got {height}x{width}.")
    rows, cols = np.meshgrid(np.arange(height - WM_MARGIN), np.arange(width - WM_MARGIN),
                             indexing="ij")
    lines, diagonal = (rows + cols) % 3 == 0, rows == cols
    # Intensities are calibrated on 32x32 (10 crossings, 310 other stroke pixels, 3 channels).
    grey = (WM_L1 - 3 * 10) / (3 * 310)
    strokes = np.where(lines & diagonal, 1.0, np.where(lines | diagonal, grey, 0.0))
    pattern = np.zeros((height, width, channels), np.float32)
    pattern[:height - WM_MARGIN, :width - WM_MARGIN] = strokes[..., None]
    return pattern


def _additive_attack(name: str, make_pattern, target: int, num_classes: int | None) -> Attack:
    validate_target(target, num_classes)

    def apply_trigger(images: Array, key: PRNGKey | None = None) -> Array:
        del key  # the Trojan triggers are fixed.
        pattern = jnp.asarray(make_pattern(tuple(images.shape[1:])), images.dtype)
        return jnp.clip(images + pattern, 0.0, 1.0)

    return Attack(name, apply_trigger, all_to_one(target), target, False, dict(target=target))


@ATTACKS.register("trojan_sq")
def trojan_sq(target: int = 2, num_classes: int | None = None) -> Attack:
    """Creates Trojan-SQ: adds a 9x9 multicoloured square near the bottom-right corner.

    Args:
      target: target class of the all-to-one backdoor (2 in the AWM code).
      num_classes: if given, ``target`` is checked against it.

    Raises:
      ValueError: bad target; at trace time, images smaller than 11x11.
    """
    return _additive_attack("trojan_sq", sq_pattern, target, num_classes)


@ATTACKS.register("trojan_wm")
def trojan_wm(target: int = 2, num_classes: int | None = None) -> Attack:
    """Creates Trojan-WM: adds thin watermark strokes over the top-left ``(H-2) x (W-2)`` region.

    Args:
      target: target class of the all-to-one backdoor (2 in the AWM code).
      num_classes: if given, ``target`` is checked against it.

    Raises:
      ValueError: bad target; at trace time, images of 2x2 or smaller.
    """
    return _additive_attack("trojan_wm", wm_pattern, target, num_classes)
