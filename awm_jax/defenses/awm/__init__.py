"""Adversarial Weight Masking (Chai & Chen, NeurIPS 2022)."""

from awm_jax.defenses.awm.config import AWMConfig, AWMHparams, official_one_shot
from awm_jax.defenses.awm.mask import (apply_mask, clip_mask, create_mask, fold_mask, mask_l1,
                                       mask_size, mask_statistics)
from awm_jax.defenses.awm.runner import AWMResult, run_awm
from awm_jax.defenses.awm.step import AWMState, AWMSteps, Frozen, make_awm_steps
from awm_jax.defenses.awm.trigger import l1_rescale, project_l1_ball

__all__ = ["AWMConfig", "AWMHparams", "AWMResult", "AWMState", "AWMSteps", "Frozen",
           "apply_mask", "clip_mask", "create_mask", "fold_mask", "l1_rescale", "make_awm_steps",
           "mask_l1", "mask_size", "mask_statistics", "official_one_shot", "project_l1_ball",
           "run_awm"]
