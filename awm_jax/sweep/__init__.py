"""Hyperparameter sweeps of AWM and of the baselines FT and ANP: spec -> stacked hparams and
keys, vmapped runners, device mesh."""

from awm_jax.sweep.baselines import BaselineSweepResult, run_baseline_sweep
from awm_jax.sweep.mesh import make_sweep_mesh
from awm_jax.sweep.runner import SweepResult, estimate_chunk_size, run_sweep
from awm_jax.sweep.spec import SWEEPABLE, SweepSpec, member_keys, sweepable

__all__ = ["SWEEPABLE", "BaselineSweepResult", "SweepResult", "SweepSpec", "estimate_chunk_size",
           "make_sweep_mesh", "member_keys", "run_baseline_sweep", "run_sweep", "sweepable"]
