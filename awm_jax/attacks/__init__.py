"""Backdoor attacks behind one interface (see :mod:`awm_jax.attacks.base`)."""

from awm_jax.attacks import badnets  # noqa: F401  (registers badnets)
from awm_jax.attacks.base import (ATTACKS, Attack, PoisonedSplit, TriggeredTestSet, all_to_one,
                                  create_attack, poison_training_set, triggered_test_set)

__all__ = ["ATTACKS", "Attack", "PoisonedSplit", "TriggeredTestSet", "all_to_one",
           "create_attack", "poison_training_set", "triggered_test_set"]
