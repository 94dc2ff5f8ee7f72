"""Blend (Chen, Liu, Li, Lu & Song, 2017, "Targeted backdoor attacks ... using data poisoning").

The trigger is a fixed pattern ``p`` blended into the whole image with weight ``alpha``:
``x' = (1 - alpha) * x + alpha * p`` (then clipped to [0, 1], a no-op when ``p`` is in [0, 1]).
The pattern is uniform noise in [0, 1] of the image's own shape ``[H, W, C]``, drawn from
``pattern_seed`` (the same seed always gives the same pattern), or an array given by the caller.
The AWM code lists ``blend`` but gives no settings (awm-paper.md 2.3); ``alpha = 0.2`` and target 0
are the common defaults of the Blend literature and this project.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.attacks.base import ATTACKS, Attack, all_to_one, validate_target
from awm_jax.types import Array, ArrayLike, PRNGKey


@functools.partial(jax.jit, static_argnums=0)
def blend_pattern(image_shape: tuple[int, int, int], pattern_seed: int) -> Array:
    """The Blend noise pattern ``float32[H, W, C]``, uniform in [0, 1], fixed by ``pattern_seed``."""
    return jax.random.uniform(jax.random.key(pattern_seed), tuple(image_shape), jnp.float32)


@ATTACKS.register("blend")
def blend(target: int = 0, alpha: float = 0.2, pattern_seed: int = 0,
          pattern: ArrayLike | None = None, num_classes: int | None = None) -> Attack:
    """Creates the Blend attack.

    Args:
      target: target class of the all-to-one backdoor.
      alpha: blend weight of the pattern, in [0, 1].
      pattern_seed: seed of the uniform-noise pattern (ignored when ``pattern`` is given).
      pattern: optional ``float[H, W, C]`` pattern in [0, 1]; its shape must match the images.
      num_classes: if given, ``target`` is checked against it.

    Raises:
      ValueError: bad target, alpha or pattern; at trace time, a pattern whose shape differs
        from the images'.
    """
    validate_target(target, num_classes)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}.")
    fixed = None
    if pattern is not None:
        fixed = np.asarray(pattern, np.float32)
        if fixed.ndim != 3 or not np.all(np.isfinite(fixed)) or fixed.min() < 0 or fixed.max() > 1:
            raise ValueError(f"pattern must be a finite [H, W, C] array in [0, 1]; got shape "
                             f"{fixed.shape} with values in [{fixed.min():.3g}, {fixed.max():.3g}].")

    def apply_trigger(images: Array, key: PRNGKey | None = None) -> Array:
        del key  # the Blend pattern is fixed.
        if fixed is None:
            noise = blend_pattern(images.shape[1:], pattern_seed)
        elif fixed.shape != tuple(images.shape[1:]):
            raise ValueError(f"pattern shape {fixed.shape} does not match image shape "
                             f"{tuple(images.shape[1:])}.")
        else:
            noise = jnp.asarray(fixed)
        mixed = (1.0 - alpha) * images + alpha * noise.astype(images.dtype)
        return jnp.clip(mixed, 0.0, 1.0)

    # params round-trip through this factory (checkpoint metadata re-creates attacks from them).
    params = dict(target=target, alpha=alpha, pattern_seed=pattern_seed,
                  pattern=None if fixed is None else fixed.tolist())
    return Attack("blend", apply_trigger, all_to_one(target), target, False, params)
