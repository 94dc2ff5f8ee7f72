"""Image augmentations written in JAX, pure and jittable, one key per call.

* :func:`random_crop_flip`: pad-and-crop plus horizontal flip, the standard CIFAR training
  augmentation.
* :func:`random_resized_crop`: torchvision's ``RandomResizedCrop`` (area fraction ``scale``,
  aspect ``ratio``) with bilinear resampling back to the input size, optionally flipped; the
  AWM one-shot recipe uses it to make views of each clean image.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from awm_jax.types import Array, PRNGKey


def random_crop_flip(images: Array, key: PRNGKey, padding: int = 4, flip: bool = True) -> Array:
    """Zero-pads by ``padding``, crops back at a random offset, and flips with probability 1/2.

    Args:
      images: ``float32[B, H, W, C]``.
      key: PRNG key.
      padding: pixels of zero padding on each side.
      flip: whether to flip horizontally at random.

    Returns:
      ``float32[B, H, W, C]``.
    """
    batch, height, width, _ = images.shape
    offset_key, flip_key = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(offset_key, (batch, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                     (height, width, image.shape[-1]))

    out = jax.vmap(crop)(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
        out = jnp.where(do_flip, out[:, :, ::-1, :], out)
    return out


def _sample_box(key: PRNGKey, height: int, width: int, scale, ratio, attempts: int = 10):
    """Samples a crop box as torchvision does: up to ``attempts`` tries, else the central box."""
    area_key, ratio_key, pos_key = jax.random.split(key, 3)
    area = height * width * jax.random.uniform(area_key, (attempts,), minval=scale[0],
                                               maxval=scale[1])
    log_ratio = jax.random.uniform(ratio_key, (attempts,), minval=math.log(ratio[0]),
                                   maxval=math.log(ratio[1]))
    aspect = jnp.exp(log_ratio)
    crop_w = jnp.round(jnp.sqrt(area * aspect))
    crop_h = jnp.round(jnp.sqrt(area / aspect))
    valid = (crop_w >= 1) & (crop_h >= 1) & (crop_w <= width) & (crop_h <= height)
    first = jnp.argmax(valid)
    found = valid[first]
    fallback = min(height, width)
    crop_h = jnp.where(found, crop_h[first], fallback)
    crop_w = jnp.where(found, crop_w[first], fallback)
    unit = jax.random.uniform(pos_key, (2,))
    top = jnp.floor(unit[0] * (height - crop_h + 1))
    left = jnp.floor(unit[1] * (width - crop_w + 1))
    return top, left, crop_h, crop_w


def _resample(image: Array, top, left, crop_h, crop_w) -> Array:
    """Bilinearly resamples the box ``(top, left, crop_h, crop_w)`` of ``image`` to full size."""
    height, width, channels = image.shape
    rows = top + (jnp.arange(height) + 0.5) * crop_h / height - 0.5
    cols = left + (jnp.arange(width) + 0.5) * crop_w / width - 0.5
    grid_r, grid_c = jnp.meshgrid(rows, cols, indexing="ij")

    def one_channel(channel):
        return jax.scipy.ndimage.map_coordinates(channel, [grid_r, grid_c], order=1,
                                                 mode="nearest")

    return jax.vmap(one_channel, in_axes=-1, out_axes=-1)(image)


def random_resized_crop(images: Array, key: PRNGKey, scale=(0.08, 1.0),
                        ratio=(3.0 / 4.0, 4.0 / 3.0), flip: bool = True) -> Array:
    """A random-resized-crop view of each image, resampled to the input size.

    Args:
      images: ``float32[B, H, W, C]`` in [0, 1].
      key: PRNG key.
      scale: range of the crop's area as a fraction of the image's (torchvision: 0.08-1).
      ratio: range of the crop's aspect ratio (width / height).
      flip: whether to flip horizontally with probability 1/2.

    Returns:
      ``float32[B, H, W, C]`` in [0, 1].

    Raises:
      ValueError: ``scale`` not within (0, 1] or ``ratio`` not positive and ordered.
    """
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1; got {scale}.")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop ratio must satisfy 0 < low <= high; got {ratio}.")
    batch, height, width, _ = images.shape
    box_key, flip_key = jax.random.split(key)
    boxes = jax.vmap(lambda k: _sample_box(k, height, width, scale, ratio))(
        jax.random.split(box_key, batch))
    out = jax.vmap(_resample)(images, *boxes)
    if flip:
        do_flip = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
        out = jnp.where(do_flip, out[:, :, ::-1, :], out)
    return jnp.clip(out, 0.0, 1.0)
