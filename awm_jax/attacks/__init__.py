"""Backdoor attacks behind one interface (see :mod:`awm_jax.attacks.base`)."""

from awm_jax.attacks import all_to_all  # noqa: F401  (registers all_to_all)
from awm_jax.attacks import badnets  # noqa: F401  (registers badnets)
from awm_jax.attacks import blend  # noqa: F401  (registers blend)
from awm_jax.attacks import clb  # noqa: F401  (registers clb)
from awm_jax.attacks import l0_inv  # noqa: F401  (registers l0_inv)
from awm_jax.attacks import l2_inv  # noqa: F401  (registers l2_inv)
from awm_jax.attacks import sig  # noqa: F401  (registers sig)
from awm_jax.attacks import trojan  # noqa: F401  (registers trojan_sq, trojan_wm)
from awm_jax.attacks import wanet  # noqa: F401  (registers wanet)
from awm_jax.attacks.base import (ATTACKS, Attack, PoisonedSplit, TriggeredTestSet, all_to_one,
                                  create_attack, poison_training_set, triggered_test_set)

__all__ = ["ATTACKS", "Attack", "PoisonedSplit", "TriggeredTestSet", "all_to_one",
           "create_attack", "poison_training_set", "triggered_test_set"]
