"""Backdoor defenses behind one interface (see :mod:`awm_jax.defenses.base`)."""

from awm_jax.defenses import awm_defense  # noqa: F401  (registers "awm")
from awm_jax.defenses import anp, fine_pruning, finetune, nad  # noqa: F401  (ft, fp, nad, anp)
from awm_jax.defenses import ibau, neural_cleanse  # noqa: F401  (ibau, nc)
from awm_jax.defenses import ablation  # noqa: F401  (registers "ablation": ANP -> AWM)
from awm_jax.defenses.base import DEFENSES, Defense, DefenseResult, get_defense, purify

__all__ = ["DEFENSES", "Defense", "DefenseResult", "get_defense", "purify"]
