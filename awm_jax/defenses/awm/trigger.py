"""The universal trigger perturbation: L1 constraints and the inner gradient-ascent step.

The trigger ``delta`` has one image's shape ``[H, W, C]`` and is shared by every image of a batch.
Two ways of keeping ``||delta||_1 <= tau`` (awm-paper.md 1.3-1.5, difference 11):

* :func:`l1_rescale`: ``delta * min(1, tau / ||delta||_1)``, applied once after the inner phase
  of each epoch. This is what the official code does, and our default.
* :func:`project_l1_ball`: the exact Euclidean projection onto the L1 ball (optax), applied after
  every ascent step. It is available for the paper-faithful variant, but a prototype found that
  it collapses the trigger onto one or two pixels and AWM then fails to erase the backdoor.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from awm_jax.types import Array


def l1_rescale(delta: Array, tau: Array) -> Array:
    """Scales ``delta`` down onto the L1 sphere of radius ``tau`` if it lies outside it."""
    norm = jnp.sum(jnp.abs(delta))
    return delta * jnp.minimum(1.0, tau / jnp.maximum(norm, 1e-12))


def project_l1_ball(delta: Array, tau: Array) -> Array:
    """Euclidean projection of ``delta`` onto ``{d : ||d||_1 <= tau}``."""
    return optax.projections.projection_l1_ball(delta, tau)
