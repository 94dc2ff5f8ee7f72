"""SIG (Barni, Kallas & Tondi, ICIP 2019, "A new backdoor attack in CNNs by training set
corruption without label poisoning").

The trigger is a horizontal sinusoidal signal added to the whole image,
``x'[i, j, c] = clip(x[i, j, c] + delta * sin(2 * pi * j * f / W), 0, 1)`` (column index ``j``, so
the signal is the same in every row and channel), with ``delta = 20/255`` and ``f = 6`` as in the
paper. It is a clean-label attack: poisoning adds the signal to target-class training images and
keeps their labels; at test time the signal on any image should flip it to the target. The AWM
code lists ``sig`` only by name (awm-paper.md 2.3); target 0 is this project's default.
"""

from __future__ import annotations

import jax.numpy as jnp

from awm_jax.attacks.base import ATTACKS, Attack, all_to_one, validate_target
from awm_jax.types import Array, PRNGKey


def sig_signal(width: int, delta: float, frequency: float) -> Array:
    """The SIG signal along the columns, ``float32[W]``: ``delta * sin(2 pi j f / W)``."""
    columns = jnp.arange(width, dtype=jnp.float32)
    return delta * jnp.sin(2.0 * jnp.pi * columns * frequency / width)


@ATTACKS.register("sig")
def sig(target: int = 0, delta: float = 20.0 / 255.0, frequency: float = 6.0,
        num_classes: int | None = None) -> Attack:
    """Creates the SIG attack (clean-label).

    Args:
      target: the class whose training images carry the signal, and the backdoor's target.
      delta: amplitude of the sinusoid in pixel units, in (0, 1].
      frequency: number of periods across the image width, > 0.
      num_classes: if given, ``target`` is checked against it.

    Raises:
      ValueError: bad target, delta or frequency.
    """
    validate_target(target, num_classes)
    if not 0.0 < delta <= 1.0:
        raise ValueError(f"delta must be in (0, 1]; got {delta}.")
    if not frequency > 0:
        raise ValueError(f"frequency must be > 0; got {frequency}.")

    def apply_trigger(images: Array, key: PRNGKey | None = None) -> Array:
        del key  # the SIG signal is fixed.
        signal = sig_signal(images.shape[2], delta, frequency).astype(images.dtype)
        return jnp.clip(images + signal[None, None, :, None], 0.0, 1.0)

    return Attack("sig", apply_trigger, all_to_one(target), target, True,
                  dict(target=target, delta=delta, frequency=frequency))
