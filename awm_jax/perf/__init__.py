"""Opt-in performance helpers; none changes a default (see experiments/results/perf_notes.md)."""

from awm_jax.perf.canonical_conv import canonical_conv_general_dilated

__all__ = ["canonical_conv_general_dilated"]
