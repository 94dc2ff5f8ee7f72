"""The training set an attack's victim learns from: poisoned images plus attack-specific extras.

Most attacks poison by stamping their trigger (:func:`awm_jax.attacks.poison_training_set`).
Two need more, and :func:`make_training_set` adds it:

* **CLB** poisons with an adversarial perturbation against a *clean* model before the corner
  patches (:func:`awm_jax.attacks.clb.make_clb_poison`), so it needs that model's logits.
* **WaNet** trains in the paper's *noise mode*: besides the warped, relabelled images, a further
  ``cross_ratio`` times as many other images are warped with random grid noise and keep their
  true labels, so that only the exact warp triggers the backdoor. The official code redraws the
  cross images and their noise every batch; here they are drawn once with the poisoning key
  (the same share of every epoch, fixed noise), which keeps the training set a plain array.

``attack=None`` gives the clean training set (a clean model, e.g. CLB's reference model).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from awm_jax.attacks.base import Attack, PoisonedSplit, poison_training_set
from awm_jax.attacks.clb import make_clb_poison
from awm_jax.attacks.wanet import wanet_noise
from awm_jax.data.dataset import Split
from awm_jax.types import Array, PRNGKey

WANET_CROSS_RATIO = 2.0  # the WaNet paper's cross_ratio: noise images per backdoor image


def make_training_set(split: Split, attack: Attack | None, key: PRNGKey, rate: float, *,
                      clean_logits_fn: Callable[[Array], Array] | None = None,
                      cross_ratio: float = WANET_CROSS_RATIO,
                      batch_size: int = 512) -> PoisonedSplit:
    """Poisons ``split`` for training a backdoored model with ``attack``.

    Args:
      split: the clean training split.
      attack: the attack, or ``None`` for no poisoning.
      key: poisoning randomness (which images, trigger noise, PGD starts, cross images).
      rate: the poison rate (see :func:`awm_jax.attacks.poison_training_set`).
      clean_logits_fn: ``float32[B, H, W, C] -> float32[B, K]`` of a clean model; required for
        CLB, unused otherwise.
      cross_ratio: WaNet noise-mode images per poisoned image (0 turns noise mode off).
      batch_size: images per call of the trigger (and PGD) function.

    Returns:
      A :class:`PoisonedSplit`; ``poisoned`` flags only the backdoor images (not WaNet's cross
      images, which keep their labels).

    Raises:
      ValueError: CLB without ``clean_logits_fn``; negative ``cross_ratio``; too few images
        left for WaNet's cross images; or see ``poison_training_set``.
    """
    if attack is None:
        return PoisonedSplit(split, np.zeros(len(split), bool), split.labels)
    if attack.name == "clb":
        if clean_logits_fn is None:
            raise ValueError("the CLB attack perturbs its poison against a clean model: pass "
                             "clean_logits_fn (CLI: --clean-checkpoint DIR of a model trained "
                             "with --attack none).")
        attack = make_clb_poison(attack, clean_logits_fn)
    if cross_ratio < 0:
        raise ValueError(f"cross_ratio must be >= 0; got {cross_ratio}.")
    # ``key`` itself poisons, so that every attack poisons exactly as poison_training_set does;
    # WaNet's cross images use a key folded off it.
    poisoned = poison_training_set(split, attack, key, rate, batch_size)
    if attack.name != "wanet" or cross_ratio == 0:
        return poisoned
    return _add_wanet_cross_images(poisoned, attack, jax.random.fold_in(key, 1), cross_ratio,
                                   batch_size)


def _add_wanet_cross_images(poisoned: PoisonedSplit, attack: Attack, key: PRNGKey,
                            cross_ratio: float, batch_size: int) -> PoisonedSplit:
    free = np.flatnonzero(~poisoned.poisoned)
    count = int(round(cross_ratio * poisoned.poisoned.sum()))
    if count > free.size:
        raise ValueError(f"WaNet noise mode needs {count} unpoisoned images for cross samples "
                         f"(cross_ratio={cross_ratio}) but only {free.size} remain; lower the "
                         "poison rate or cross_ratio.")
    choice_key, noise_key = jax.random.split(key)
    chosen = np.sort(np.asarray(jax.random.choice(choice_key, free, (count,), replace=False)))
    warp = {name: attack.params[name] for name in ("pattern_seed", "k", "strength",
                                                    "grid_rescale")}
    noise = jax.jit(lambda images, k: wanet_noise(images, k, **warp))
    images = poisoned.split.images.copy()
    for i, start in enumerate(range(0, count, batch_size)):
        index = chosen[start:start + batch_size]
        images[index] = np.asarray(noise(images[index], jax.random.fold_in(noise_key, i)))
    return PoisonedSplit(Split(images, poisoned.split.labels), poisoned.poisoned,
                         poisoned.true_labels)
