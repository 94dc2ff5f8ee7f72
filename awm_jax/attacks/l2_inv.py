"""l2-inv (I-BAU, Zeng et al., ICLR 2022): full-image, low-amplitude additive noise.

The I-BAU/AWM code adds ``l2_inv.png`` to the image (then clips) with target 0; measured at
32x32x3 the file has L1 108.7, L2 3.22, Linf 0.267 (awm-paper.md 2.3). The file is not public, so
this is a **procedural equivalent**: non-negative noise (it is stored as an image) ``u ** 3`` with
``u ~ U[0, 1]`` drawn from ``pattern_seed``, rescaled to L2 exactly ``l2_norm``. At 32x32x3 that gives
L1 ~ 118 and Linf ~ 0.15 (<= 0.267). Other image sizes keep the per-entry RMS: the L2 norm is
``l2_norm * sqrt(H * W * C / 3072)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from awm_jax.attacks.base import ATTACKS, Attack, all_to_one, validate_target
from awm_jax.types import Array, PRNGKey

REFERENCE_SIZE = 32 * 32 * 3


@functools.partial(jax.jit, static_argnums=0)
def l2_pattern(image_shape: tuple[int, int, int], pattern_seed: int,
               l2_norm: float = 3.22) -> Array:
    """The l2-inv noise ``float32[H, W, C] >= 0``, L2 norm ``l2_norm`` at 32x32x3 (scaled by size)."""
    noise = jax.random.uniform(jax.random.key(pattern_seed), tuple(image_shape), jnp.float32) ** 3
    size = noise.size
    norm = l2_norm * (size / REFERENCE_SIZE) ** 0.5
    return noise * (norm / jnp.linalg.norm(noise.ravel()))


@ATTACKS.register("l2_inv")
def l2_inv(target: int = 0, l2_norm: float = 3.22, pattern_seed: int = 0,
           num_classes: int | None = None) -> Attack:
    """Creates the l2-inv attack.

    Args:
      target: target class of the all-to-one backdoor (0 in the AWM code).
      l2_norm: L2 norm of the noise at 32x32x3 (3.22 in the I-BAU file), > 0.
      pattern_seed: seed of the fixed noise.
      num_classes: if given, ``target`` is checked against it.

    Raises:
      ValueError: bad target or ``l2_norm``.
    """
    validate_target(target, num_classes)
    if not l2_norm > 0:
        raise ValueError(f"l2_norm must be > 0; got {l2_norm}.")

    def apply_trigger(images: Array, key: PRNGKey | None = None) -> Array:
        del key  # the l2-inv noise is fixed.
        pattern = l2_pattern(images.shape[1:], pattern_seed, l2_norm).astype(images.dtype)
        return jnp.clip(images + pattern, 0.0, 1.0)

    return Attack("l2_inv", apply_trigger, all_to_one(target), target, False,
                  dict(target=target, l2_norm=l2_norm, pattern_seed=pattern_seed))
