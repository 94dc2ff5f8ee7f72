"""Sweep specifications: which AWM hyperparameters and seeds a sweep covers.

A :class:`SweepSpec` names values of :class:`~awm_jax.defenses.awm.config.AWMHparams` fields
(the numbers that travel as arrays, STYLE.md principle 4) and seeds. Its members are the
Cartesian product of ``grid``, times the zipped lists of ``zip``, times ``seeds``; member ``i``
has the base config's values except where the spec sets them. Static settings (epochs, batch
size, loop mode, ...) shape the compiled program and cannot vary within one sweep.

Keys follow :func:`awm_jax.pipeline.purify_model`: ``jax.random.key(seed)`` is split into
``(clean, trigger, defense)`` and the defense gets the third key, so a member's defense equals a
single ``purify`` run with the same seed and settings.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from awm_jax.defenses.awm.config import AWMConfig, AWMHparams

SWEEPABLE = AWMHparams._fields


def member_keys(seed: int) -> dict[str, jax.Array]:
    """The named keys of one seed, split exactly as the single-run pipeline splits them."""
    clean, trigger, defense = jax.random.split(jax.random.key(int(seed)), 3)
    return {"clean": clean, "trigger": trigger, "defense": defense}


def _check_names(names, what: str) -> None:
    unknown = sorted(set(names) - set(SWEEPABLE))
    if unknown:
        static = [n for n in unknown if n in {f.name for f in dataclasses.fields(AWMConfig)}]
        detail = f" ({static} are static config fields, fixed for a whole sweep)" if static else ""
        raise ValueError(f"{what} names unknown sweep parameters {unknown}{detail}; sweepable "
                         f"names: {list(SWEEPABLE)}.")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """Hyperparameter values and seeds of a sweep.

    Attributes:
      grid: ``name -> values``; every combination is a member (Cartesian product).
      zip: ``name -> values`` of one common length; the i-th values go together.
      seeds: root seeds; every hparam combination runs once per seed.

    Raises:
      ValueError: an unknown or static field name, a name in both ``grid`` and ``zip``, empty
        value lists, zipped lists of unequal length, or no seeds.
    """

    grid: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)
    zip: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)
    seeds: Sequence[int] = (0,)

    def __post_init__(self):
        _check_names(self.grid, "grid")
        _check_names(self.zip, "zip")
        both = sorted(set(self.grid) & set(self.zip))
        if both:
            raise ValueError(f"{both} appear in both grid and zip; use one of them.")
        for what, values in (("grid", self.grid), ("zip", self.zip)):
            for name, options in values.items():
                if len(options) == 0:
                    raise ValueError(f"{what}[{name!r}] is empty; give at least one value.")
        lengths = {name: len(v) for name, v in self.zip.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"zip lists must have equal lengths; got {lengths}.")
        if len(self.seeds) == 0:
            raise ValueError("seeds is empty; give at least one seed.")

    @property
    def swept_names(self) -> list[str]:
        """The hparam names that vary, grid first."""
        return list(self.grid) + list(self.zip)

    def members(self) -> list[dict[str, Any]]:
        """One dict per member: the swept hparams plus ``"seed"``; seeds vary slowest."""
        grid = [dict(zip(self.grid, combo)) for combo in itertools.product(*self.grid.values())]
        zipped_len = len(next(iter(self.zip.values()))) if self.zip else 1
        zipped = [{name: values[i] for name, values in self.zip.items()}
                  for i in range(zipped_len)]
        return [{**g, **z, "seed": int(seed)}
                for seed in self.seeds for g in grid for z in zipped]

    def configs(self, base: AWMConfig) -> list[AWMConfig]:
        """Each member's full config (validated by :class:`AWMConfig`), for single runs."""
        return [_member_config(base, m) for m in self.members()]

    def stack(self, base: AWMConfig) -> tuple[AWMHparams, jax.Array]:
        """Stacked hparams and defense keys, one row per member.

        Args:
          base: the static settings and the values of unswept hparams.

        Returns:
          ``(hparams, keys)``: :class:`AWMHparams` of ``float32[M]`` and ``key[M]`` defense keys.

        Raises:
          ValueError: a member's values are out of range (checked by :class:`AWMConfig`).
        """
        members = self.members()
        hparams = [_member_hparams(base, m) for m in members]
        stacked = AWMHparams(*(jnp.stack(values) for values in zip(*hparams)))
        keys = jnp.stack([member_keys(m["seed"])["defense"] for m in members])
        return stacked, keys


def _member_config(base: AWMConfig, member: Mapping[str, Any]) -> AWMConfig:
    values = {k: float(v) for k, v in member.items() if k != "seed"}
    return dataclasses.replace(base, **values)


def _member_hparams(base: AWMConfig, member: Mapping[str, Any]) -> AWMHparams:
    hparams = _member_config(base, member).hparams()
    if base.tie_beta and "beta" in member:
        # The config ties beta to 1 - alpha and ignores the swept beta; say so instead.
        raise ValueError("sweeping beta needs a config with an explicit beta (beta=None ties it "
                         "to 1 - alpha); set AWMConfig(beta=...).")
    return hparams
