"""CLB, the label-consistent backdoor (Turner, Tsipras & Madry, 2019, "Label-consistent backdoor
attacks").

A clean-label attack: the poisoned training images are target-class images, labels kept, made
hard to classify by an L_inf-bounded adversarial perturbation against a *clean* model (the paper's
PGD variant; its GAN-interpolation variant is not implemented), and then stamped with the trigger:
a ``patch_size x patch_size`` black-and-white checkerboard in each of the four corners (the paper's
four-corner pattern, full visibility). The model cannot fit those images from their content, so it
learns the patches. At test time the trigger is the corner patches only.

Because the adversarial part needs a model, it is split off:

* ``clb(...)`` is the test-time attack; its ``apply_trigger`` stamps the corner patches.
* ``make_clb_poison(attack, logits_fn, ...)`` returns the poisoning attack: ``apply_trigger`` runs
  :func:`adversarial_perturb` (labels = the target, as every clean-label candidate is a
  target-class image) and then stamps the patches. Poison with
  ``poison_training_set(split, make_clb_poison(attack, logits_fn), key, rate)``.

The checkerboard is ``1`` where ``(i + j)`` is even (relative to the corner pixel, mirrored per
corner so each corner pixel is white), ``0`` elsewhere, on all channels. Defaults: ``eps = 8/255``
(the paper's smallest budget), 10 PGD steps of ``2/255`` from a random start; target 0 is this
project's default (the AWM code lists ``clb`` by name only, awm-paper.md 2.3).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from awm_jax.attacks.base import ATTACKS, Attack, all_to_one, validate_target
from awm_jax.types import Array, PRNGKey

LogitsFn = Callable[[Array], Array]


def adversarial_perturb(images: Array, labels: Array, logits_fn: LogitsFn, key: PRNGKey,
                        eps: float = 8.0 / 255.0, steps: int = 10,
                        step_size: float = 2.0 / 255.0) -> Array:
    """L_inf PGD that raises ``logits_fn``'s cross-entropy on ``(images, labels)``.

    Starts from a uniform random point of the eps-ball, takes ``steps`` signed-gradient ascent
    steps of ``step_size`` on the mean cross-entropy, and after each step projects back onto the
    eps-ball around ``images`` and onto [0, 1]. Pure and jittable (``steps`` is static).

    Args:
      images: ``float32[B, H, W, C]`` in [0, 1].
      labels: ``int32[B]`` labels whose loss is raised.
      logits_fn: ``float32[B, H, W, C] -> float32[B, K]``, the clean model.
      key: random start.
      eps: L_inf radius, >= 0.
      steps: number of ascent steps, >= 0.
      step_size: size of each signed step.

    Returns:
      ``float32[B, H, W, C]`` in [0, 1] with ``|result - images| <= eps`` everywhere.
    """
    def loss(x):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(x), labels).mean()

    def project(x):
        return jnp.clip(jnp.clip(x, images - eps, images + eps), 0.0, 1.0)

    def step(_, x):
        return project(x + step_size * jnp.sign(jax.grad(loss)(x)))

    start = project(images + jax.random.uniform(key, images.shape, images.dtype, -eps, eps))
    return jax.lax.fori_loop(0, steps, step, start)


def corner_patches(images: Array, patch_size: int) -> Array:
    """Stamps a ``patch_size`` checkerboard, white at the corner pixel, in each of the four corners.

    Raises:
      ValueError: the four patches do not fit side by side in the image.
    """
    height, width = images.shape[1:3]
    if 2 * patch_size > min(height, width):
        raise ValueError(f"four {patch_size}x{patch_size} corner patches do not fit in a "
                         f"{height}x{width} image.")
    index = jnp.arange(patch_size)
    board = ((index[:, None] + index[None, :]) % 2 == 0).astype(images.dtype)[..., None]
    out = images
    for flip_rows in (False, True):
        for flip_cols in (False, True):
            rows = slice(height - patch_size, height) if flip_rows else slice(0, patch_size)
            cols = slice(width - patch_size, width) if flip_cols else slice(0, patch_size)
            patch = board[::-1] if flip_rows else board
            patch = patch[:, ::-1] if flip_cols else patch
            out = out.at[:, rows, cols, :].set(jnp.broadcast_to(patch, (patch_size, patch_size,
                                                                        images.shape[3])))
    return out


@ATTACKS.register("clb")
def clb(target: int = 0, patch_size: int = 3, eps: float = 8.0 / 255.0, steps: int = 10,
        step_size: float = 2.0 / 255.0, num_classes: int | None = None) -> Attack:
    """Creates the CLB attack (clean-label); its ``apply_trigger`` is the test-time trigger.

    The adversarial settings are stored in ``params`` (the factory's arguments, like every
    attack's) and used by :func:`make_clb_poison`.

    Args:
      target: target class; its training images are the ones poisoned.
      patch_size: side of each corner checkerboard, >= 1.
      eps: L_inf budget of the adversarial perturbation, in [0, 1].
      steps: PGD steps, >= 0.
      step_size: PGD step size, >= 0.
      num_classes: if given, ``target`` is checked against it.

    Raises:
      ValueError: bad target, patch size, eps, steps or step size.
    """
    validate_target(target, num_classes)
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1; got {patch_size}.")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1]; got {eps}.")
    if steps < 0 or step_size < 0:
        raise ValueError(f"steps and step_size must be >= 0; got {steps} and {step_size}.")

    def apply_trigger(images: Array, key: PRNGKey | None = None) -> Array:
        del key  # the test-time trigger is the fixed corner patches.
        return corner_patches(images, patch_size)

    return Attack("clb", apply_trigger, all_to_one(target), target, True,
                  dict(target=target, patch_size=patch_size, eps=eps, steps=steps,
                       step_size=step_size))


def make_clb_poison(attack: Attack, logits_fn: LogitsFn, eps: float | None = None,
                    steps: int | None = None, step_size: float | None = None) -> Attack:
    """The poisoning form of a CLB attack: adversarial perturbation, then the corner patches.

    Args:
      attack: an attack built by :func:`clb`.
      logits_fn: the clean model, ``float32[B, H, W, C] -> float32[B, K]`` (e.g. a closure over
        ``apply_model`` with trained clean variables).
      eps, steps, step_size: override the PGD settings stored in ``attack.params``.

    Returns:
      An Attack for :func:`poison_training_set`, clean-label, whose ``apply_trigger(images, key)``
      perturbs ``images`` (all of class ``attack.target``) against ``logits_fn`` with ``key``.

    Raises:
      ValueError: ``attack`` is not a CLB attack, or a bad override.
    """
    if attack.name != "clb":
        raise ValueError(f"attack must be a 'clb' attack; got {attack.name!r}.")
    overrides = dict(eps=eps, steps=steps, step_size=step_size)
    checked = clb(**dict(attack.params, **{k: v for k, v in overrides.items() if v is not None}))
    settings = {k: checked.params[k] for k in overrides}

    def apply_trigger(images: Array, key: PRNGKey) -> Array:
        labels = jnp.full(images.shape[0], attack.target, jnp.int32)
        hard = adversarial_perturb(images, labels, logits_fn, key, **settings)
        return attack.apply_trigger(hard, None)

    return attack._replace(apply_trigger=apply_trigger, params=dict(attack.params, **settings))
