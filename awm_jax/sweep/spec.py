"""Sweep specifications: which hyperparameters of a defense and which seeds a sweep covers.

A :class:`SweepSpec` names values of the defense's hparams fields (the numbers that travel as
arrays, STYLE.md principle 4) and seeds. Its members are the Cartesian product of ``grid``,
times the zipped lists of ``zip``, times ``seeds``; member ``i`` has the base config's values
except where the spec sets them. Static settings (epochs, batch size, loop mode, noise steps,
...) shape the compiled program and cannot vary within one sweep.

Sweepable defenses (:data:`HPARAMS`): ``"awm"`` (:class:`AWMHparams`), ``"ft"``
(:class:`~awm_jax.defenses.finetune.SGDHparams`: learning_rate, momentum, weight_decay) and
``"anp"`` (:class:`~awm_jax.defenses.anp.ANPHparams`: eps, alpha, mask_lr, momentum,
threshold).

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

from awm_jax.defenses.anp import ANPConfig, ANPHparams
from awm_jax.defenses.awm.config import AWMConfig, AWMHparams
from awm_jax.defenses.finetune import FTConfig, SGDHparams

# defense -> (config class, hparams class); the hparams' fields are what a sweep may vary.
HPARAMS: dict[str, tuple[type, type]] = {"awm": (AWMConfig, AWMHparams),
                                         "ft": (FTConfig, SGDHparams),
                                         "anp": (ANPConfig, ANPHparams)}
SWEEPABLE = AWMHparams._fields


def sweepable(defense: str) -> tuple[str, ...]:
    """The hparam names a sweep of ``defense`` may vary.

    Raises:
      ValueError: ``defense`` cannot be swept; the message lists the ones that can.
    """
    return _classes(defense)[1]._fields


def config_class(defense: str) -> type:
    """The config class of a sweepable ``defense`` (ValueError as :func:`sweepable`)."""
    return _classes(defense)[0]


def _classes(defense: str) -> tuple[type, type]:
    if defense not in HPARAMS:
        raise ValueError(f"defense {defense!r} cannot be swept; sweepable defenses: "
                         f"{list(HPARAMS)}.")
    return HPARAMS[defense]


def member_keys(seed: int) -> dict[str, jax.Array]:
    """The named keys of one seed, split exactly as the single-run pipeline splits them."""
    clean, trigger, defense = jax.random.split(jax.random.key(int(seed)), 3)
    return {"clean": clean, "trigger": trigger, "defense": defense}


def _check_names(names, what: str, defense: str) -> None:
    allowed = sweepable(defense)
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        fields = {f.name for f in dataclasses.fields(config_class(defense))}
        static = [n for n in unknown if n in fields]
        detail = f" ({static} are static config fields, fixed for a whole sweep)" if static else ""
        raise ValueError(f"{what} names unknown {defense} sweep parameters {unknown}{detail}; "
                         f"sweepable names for {defense}: {list(allowed)}.")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """Hyperparameter values and seeds of a sweep.

    Attributes:
      grid: ``name -> values``; every combination is a member (Cartesian product).
      zip: ``name -> values`` of one common length; the i-th values go together.
      seeds: root seeds; every hparam combination runs once per seed.
      defense: the swept defense, a key of :data:`HPARAMS` (``"awm"``, ``"ft"``, ``"anp"``);
        it fixes the sweepable names.

    Raises:
      ValueError: an unknown defense, an unknown or static field name, a name in both ``grid``
        and ``zip``, empty value lists, zipped lists of unequal length, or no seeds.
    """

    grid: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)
    zip: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)
    seeds: Sequence[int] = (0,)
    defense: str = "awm"

    def __post_init__(self):
        _check_names(self.grid, "grid", self.defense)
        _check_names(self.zip, "zip", self.defense)
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

    def configs(self, base) -> list:
        """Each member's full config (validated by the config class), for single runs."""
        self._check_base(base)
        return [_member_config(base, m) for m in self.members()]

    def stack(self, base) -> tuple[Any, jax.Array]:
        """Stacked hparams and defense keys, one row per member.

        Args:
          base: the defense's config (e.g. :class:`AWMConfig`, :class:`FTConfig`): the static
            settings and the values of unswept hparams.

        Returns:
          ``(hparams, keys)``: the defense's hparams NamedTuple (:class:`AWMHparams`,
          :class:`SGDHparams` or :class:`ANPHparams`) of ``float32[M]`` and ``key[M]`` defense
          keys.

        Raises:
          TypeError: ``base`` is not the defense's config.
          ValueError: a member's values are out of range (checked by the config class).
        """
        self._check_base(base)
        members = self.members()
        hparams = [_member_hparams(base, m) for m in members]
        stacked = type(hparams[0])(*(jnp.stack(values) for values in zip(*hparams)))
        keys = jnp.stack([member_keys(m["seed"])["defense"] for m in members])
        return stacked, keys

    def _check_base(self, base) -> None:
        expected = config_class(self.defense)
        if not isinstance(base, expected):
            raise TypeError(f"a {self.defense} sweep needs a {expected.__name__} as its base "
                            f"config; got {type(base).__name__}.")


def _member_config(base, member: Mapping[str, Any]):
    values = {k: float(v) for k, v in member.items() if k != "seed"}
    return dataclasses.replace(base, **values)


def _member_hparams(base, member: Mapping[str, Any]):
    hparams = _member_config(base, member).hparams()
    if getattr(base, "tie_beta", False) and "beta" in member:
        # The config ties beta to 1 - alpha and ignores the swept beta; say so instead.
        raise ValueError("sweeping beta needs a config with an explicit beta (beta=None ties it "
                         "to 1 - alpha); set AWMConfig(beta=...).")
    return hparams
