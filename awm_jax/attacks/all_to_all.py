"""All-to-all backdoor: any registered trigger, with target label ``(y + 1) mod K``.

The AWM code's ``a2a`` attack uses the Trojan-SQ trigger and relabels a poisoned image of class
``y`` as ``y + 1``, wrapping the last class to 0 (awm-paper.md 2.3; the official evaluation forgets
the wrap, see 1.6, this project does not). Every training image is a poisoning candidate and every
test image is a non-target image, since ``(y + 1) mod K != y`` for ``K >= 2``.
"""

from __future__ import annotations

from awm_jax.attacks.base import ATTACKS, Attack, create_attack
from awm_jax.types import Array


@ATTACKS.register("all_to_all")
def all_to_all(num_classes: int, base: str = "trojan_sq", **base_kwargs) -> Attack:
    """Creates an all-to-all attack with the trigger of the registered attack ``base``.

    Args:
      num_classes: number of classes K, >= 2 (required: the label rule wraps at K).
      base: name of a registered dirty-label attack whose ``apply_trigger`` is used.
      **base_kwargs: arguments for ``base``'s factory (e.g. ``pattern_seed``); its target is unused.

    Raises:
      ValueError: ``num_classes`` < 2, ``base`` unknown, ``all_to_all`` or clean-label.
    """
    if num_classes is None or num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 for an all-to-all attack; got {num_classes}.")
    if base == "all_to_all":
        raise ValueError("base must be another attack than 'all_to_all'.")
    base_attack = create_attack(base, **base_kwargs)
    if base_attack.clean_label:
        raise ValueError(f"base attack {base!r} is clean-label; all-to-all needs relabelling.")

    def target_label(labels: Array) -> Array:
        return (labels + 1) % num_classes

    # Flat, so that ``all_to_all(**params)`` re-creates the attack (the base's target is unused).
    return Attack("all_to_all", base_attack.apply_trigger, target_label, None, False,
                  dict(num_classes=num_classes, base=base, **base_attack.params))
