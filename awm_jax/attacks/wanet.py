"""WaNet (Nguyen & Tran, ICLR 2021, "WaNet - Imperceptible warping-based backdoor attack").

The trigger is a fixed, smooth geometric warp of the image. Following the official code:

1. a ``k x k x 2`` control grid of uniform noise in [-1, 1], drawn from ``pattern_seed``, divided by
   its mean absolute value;
2. upsampled bicubically (align-corners) to ``H x W x 2``, the displacement field ``n``;
3. sampling grid in normalised coordinates ``g = clip((identity + s * n / size) * grid_rescale,
   -1, 1)`` with ``size`` = W for the column and H for the row component (the official code is
   square-only and uses H for both);
4. bilinear resampling of the image at ``g`` (``grid_sample``, align-corners), written here in
   ``jnp`` so it is differentiable and jittable.

In pixels the displacement is ``s * n * (size - 1) / (2 * size)``, at most about ``s/2 * max|n|``
with ``max|n|`` ~ 2: with ``s = 0.5`` no pixel moves by more than about half a pixel.
Differences from the official code: the cubic kernel is Keys' a = -0.5 (``jax.image``) rather
than PyTorch's a = -0.75, and at the border it renormalises the kernel instead of clamping
indices, so the field differs slightly near the edges; the noise values differ (JAX PRNG).

The paper's **noise mode** trains with extra "cross" samples warped by the field plus random
per-image grid noise ``U[-1, 1] / size`` and keeps their **true labels**, so the model learns that
only the exact warp is the trigger; :func:`wanet_noise` makes them. The AWM code lists ``wanet``
by name only (awm-paper.md 2.3); target 0 is this project's default.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from awm_jax.attacks.base import ATTACKS, Attack, all_to_one, validate_target
from awm_jax.types import Array, PRNGKey


@functools.partial(jax.jit, static_argnums=(0, 2))
def warp_noise(image_hw: tuple[int, int], pattern_seed: int, k: int = 4) -> Array:
    """The upsampled, normalised control-grid noise ``n``, ``float32[H, W, 2]`` (row, col)."""
    height, width = image_hw
    grid = jax.random.uniform(jax.random.key(pattern_seed), (k, k, 2), jnp.float32, -1.0, 1.0)
    grid = grid / jnp.mean(jnp.abs(grid))
    # align_corners=True: output pixel o samples input position o * (k - 1) / (size - 1).
    scale = jnp.array([(height - 1) / (k - 1), (width - 1) / (k - 1)], jnp.float32)
    return jax.image.scale_and_translate(grid, (height, width, 2), (0, 1), scale,
                                         0.5 - 0.5 * scale, "cubic", antialias=False)


@functools.partial(jax.jit, static_argnums=0)
def warp_coordinates(image_hw: tuple[int, int], noise: Array, strength: float,
                     grid_rescale: float = 1.0) -> Array:
    """Sampling positions in pixels, ``float32[..., H, W, 2]`` (row, col), of the warp ``noise``.

    This is the official normalised grid ``clip((identity + s * n / size) * rescale, -1, 1)``
    mapped to pixels with align-corners; with ``strength = 0`` and ``grid_rescale = 1`` it is the
    exact integer identity grid.
    """
    height, width = image_hw
    size = jnp.array([height, width], jnp.float32)
    centre = (size - 1.0) / 2.0
    rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                              jnp.arange(width, dtype=jnp.float32), indexing="ij")
    identity = jnp.stack([rows, cols], -1)
    shifted = (identity - centre + strength * noise * centre / size) * grid_rescale + centre
    return jnp.clip(shifted, 0.0, size - 1.0)


@jax.jit
def bilinear_sample(images: Array, coords: Array) -> Array:
    """Samples ``images`` ``[B, H, W, C]`` at ``coords`` ``[B or 1, H, W, 2]`` (pixels, in range)."""
    height, width = images.shape[1:3]
    low = jnp.floor(coords)
    frac = coords - low
    r0 = jnp.clip(low[..., 0].astype(jnp.int32), 0, height - 1)
    c0 = jnp.clip(low[..., 1].astype(jnp.int32), 0, width - 1)
    r1, c1 = jnp.minimum(r0 + 1, height - 1), jnp.minimum(c0 + 1, width - 1)
    batch = jnp.arange(images.shape[0])[:, None, None]
    fr, fc = frac[..., 0:1], frac[..., 1:2]

    def at(r, c):
        return images[batch, r, c]

    top = at(r0, c0) * (1 - fc) + at(r0, c1) * fc
    bottom = at(r1, c0) * (1 - fc) + at(r1, c1) * fc
    return top * (1 - fr) + bottom * fr


def wanet_noise(images: Array, key: PRNGKey, *, pattern_seed: int = 0, k: int = 4,
                strength: float = 0.5, grid_rescale: float = 1.0) -> Array:
    """WaNet noise-mode ("cross") samples: the warp plus random grid noise; keep the true labels.

    Each image gets its own noise ``U[-1, 1]^(H x W x 2) / size`` (normalised units, i.e. up to
    ~half a pixel) added to the fixed warp grid, as in the official training code.

    Args:
      images: ``float32[B, H, W, C]`` in [0, 1].
      key: draws the per-image grid noise.
      pattern_seed, k, strength, grid_rescale: the attack's warp settings (``attack.params``).

    Returns:
      ``float32[B, H, W, C]`` in [0, 1].
    """
    height, width = images.shape[1:3]
    coords = warp_coordinates((height, width), warp_noise((height, width), pattern_seed, k),
                              strength, grid_rescale)
    centre = jnp.array([height - 1, width - 1], jnp.float32) / 2.0
    size = jnp.array([height, width], jnp.float32)
    jitter = jax.random.uniform(key, (images.shape[0], height, width, 2), jnp.float32, -1.0, 1.0)
    coords = jnp.clip(coords + jitter * centre / size, 0.0, size - 1.0)
    return jnp.clip(bilinear_sample(images, coords), 0.0, 1.0)


@ATTACKS.register("wanet")
def wanet(target: int = 0, k: int = 4, strength: float = 0.5, grid_rescale: float = 1.0,
          pattern_seed: int = 0, num_classes: int | None = None) -> Attack:
    """Creates the WaNet attack (the fixed warp; see :func:`wanet_noise` for noise mode).

    Args:
      target: target class of the all-to-one backdoor.
      k: side of the control grid, >= 2.
      strength: warp strength ``s``, >= 0 (0 is the identity).
      grid_rescale: scale of the sampling grid about the centre, > 0 (1 in the paper).
      pattern_seed: seed of the control-grid noise.
      num_classes: if given, ``target`` is checked against it.

    Raises:
      ValueError: bad target, k, strength or grid_rescale.
    """
    validate_target(target, num_classes)
    if k < 2:
        raise ValueError(f"k must be >= 2; got {k}.")
    if strength < 0:
        raise ValueError(f"strength must be >= 0; got {strength}.")
    if not grid_rescale > 0:
        raise ValueError(f"grid_rescale must be > 0; got {grid_rescale}.")

    def apply_trigger(images: Array, key: PRNGKey | None = None) -> Array:
        del key  # the warp is fixed.
        hw = images.shape[1:3]
        coords = warp_coordinates(hw, warp_noise(hw, pattern_seed, k), strength, grid_rescale)
        return jnp.clip(bilinear_sample(images, coords[None]), 0.0, 1.0)

    return Attack("wanet", apply_trigger, all_to_one(target), target, False,
                  dict(target=target, k=k, strength=strength, grid_rescale=grid_rescale,
                       pattern_seed=pattern_seed))
