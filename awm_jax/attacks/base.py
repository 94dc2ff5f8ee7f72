"""The attack interface, and poisoning/triggering built on it.

An attack is a small NamedTuple of pure functions (optax style):

* ``apply_trigger(images, key) -> images``: stamps the trigger on ``float32[B, H, W, C]`` images in
  ``[0, 1]`` and returns images of the same shape, still in ``[0, 1]``. Jittable; ``key`` is used
  only by attacks whose trigger is random.
* ``target_label(labels) -> labels``: the label the backdoor should produce for images of true
  class ``labels`` (a constant for all-to-one attacks, ``(y + 1) mod K`` for all-to-all).

``poison_training_set`` and ``triggered_test_set`` are shared by every attack.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.data.dataset import Split
from awm_jax.registry import Registry
from awm_jax.types import Array, PRNGKey

ATTACKS: Registry = Registry("attack")


class Attack(NamedTuple):
    """A backdoor attack.

    Attributes:
      name: registry name.
      apply_trigger: ``(images float32[B,H,W,C], key) -> float32[B,H,W,C]``.
      target_label: ``(labels int32[B]) -> int32[B]``.
      target: the target class of an all-to-one attack; None for all-to-all.
      clean_label: if True, poisoning triggers target-class training images and keeps their
        labels (SIG, CLB); otherwise it triggers non-target images and relabels them.
      params: the settings that define the attack, for reports and metadata.
    """

    name: str
    apply_trigger: Callable[[Array, PRNGKey], Array]
    target_label: Callable[[Array], Array]
    target: int | None
    clean_label: bool
    params: dict[str, Any]


def create_attack(name: str, **kwargs) -> Attack:
    """Builds the registered attack ``name`` (unknown names raise a ValueError listing known ones)."""
    return ATTACKS.get(name)(**kwargs)


def all_to_one(target: int) -> Callable[[Array], Array]:
    """Label rule of an all-to-one attack: every image goes to ``target``."""
    return lambda labels: jnp.full_like(labels, target)


def validate_target(target: int, num_classes: int | None) -> None:
    if target < 0 or (num_classes is not None and target >= num_classes):
        raise ValueError(f"target label {target} out of range [0, {num_classes}).")


@dataclasses.dataclass(frozen=True)
class PoisonedSplit:
    """A training split after poisoning.

    Attributes:
      split: images (some triggered) and their training labels.
      poisoned: ``bool[N]``, True where the image was triggered.
      true_labels: ``int32[N]`` labels before poisoning.
    """

    split: Split
    poisoned: np.ndarray
    true_labels: np.ndarray


def _candidates(labels: np.ndarray, attack: Attack) -> np.ndarray:
    if attack.clean_label:
        return np.flatnonzero(labels == attack.target)
    if attack.target is None:
        return np.arange(len(labels))
    return np.flatnonzero(labels != attack.target)


def poison_training_set(split: Split, attack: Attack, key: PRNGKey, rate: float,
                        batch_size: int = 1024) -> PoisonedSplit:
    """Triggers ``round(rate * n_candidates)`` training images, chosen with ``key``.

    Candidates are the non-target images for dirty-label attacks (they are relabelled with
    ``attack.target_label``) and the target-class images for clean-label attacks (labels kept).

    Raises:
      ValueError: ``rate`` outside (0, 1], or no candidate image.
    """
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"poison rate must be in (0, 1]; got {rate}.")
    candidates = _candidates(split.labels, attack)
    if candidates.size == 0:
        raise ValueError(f"attack {attack.name!r} has no candidate image to poison in this split.")
    n_poison = max(1, int(round(rate * candidates.size)))
    choice_key, trigger_key = jax.random.split(key)
    chosen = np.sort(np.asarray(jax.random.choice(choice_key, candidates, (n_poison,),
                                                  replace=False)))
    images = split.images.copy()
    labels = split.labels.copy()
    triggered = _trigger_in_batches(attack, split.images[chosen], trigger_key, batch_size)
    images[chosen] = triggered
    if not attack.clean_label:
        labels[chosen] = np.asarray(attack.target_label(jnp.asarray(split.labels[chosen])))
    poisoned = np.zeros(len(split), bool)
    poisoned[chosen] = True
    return PoisonedSplit(Split(images, labels), poisoned, split.labels)


@dataclasses.dataclass(frozen=True)
class TriggeredTestSet:
    """Test images with the trigger stamped on, for ASR and robust accuracy.

    Attributes:
      images: ``float32[M, H, W, C]`` triggered images.
      true_labels: ``int32[M]`` their true classes.
      target_labels: ``int32[M]`` what the backdoor wants them classified as.
      non_target: ``bool[M]``, True for images whose true class differs from their target; the
        project's ASR counts only these, the official code's ASR counts all.
    """

    images: np.ndarray
    true_labels: np.ndarray
    target_labels: np.ndarray
    non_target: np.ndarray


def triggered_test_set(split: Split, attack: Attack, key: PRNGKey,
                       batch_size: int = 1024) -> TriggeredTestSet:
    """Stamps the trigger on every image of ``split`` (all classes, flagging non-target ones)."""
    images = _trigger_in_batches(attack, split.images, key, batch_size)
    targets = np.asarray(attack.target_label(jnp.asarray(split.labels)))
    return TriggeredTestSet(images, split.labels, targets, targets != split.labels)


def _trigger_in_batches(attack: Attack, images: np.ndarray, key: PRNGKey,
                        batch_size: int) -> np.ndarray:
    apply = jax.jit(attack.apply_trigger)
    outputs = []
    for i, start in enumerate(range(0, len(images), batch_size)):
        chunk = jnp.asarray(images[start:start + batch_size])
        outputs.append(np.asarray(apply(chunk, jax.random.fold_in(key, i))))
    if not outputs:
        return images.copy()
    return np.concatenate(outputs).astype(np.float32)
