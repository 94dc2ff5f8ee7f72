"""Hyperparameter sweeps of AWM: spec -> stacked hparams and keys, vmapped runner, device mesh."""

from awm_jax.sweep.mesh import make_sweep_mesh
from awm_jax.sweep.runner import SweepResult, estimate_chunk_size, run_sweep
from awm_jax.sweep.spec import SWEEPABLE, SweepSpec, member_keys

__all__ = ["SWEEPABLE", "SweepResult", "SweepSpec", "estimate_chunk_size", "make_sweep_mesh",
           "member_keys", "run_sweep"]
