"""The settings of one backdoored-model training run, validated once and serialisable to JSON.

:class:`TrainConfig` is static configuration: it picks the architecture, step counts and the
optimiser's schedule, so it is hashed and compared, never traced. ``to_dict``/``from_dict`` give a
JSON round trip for checkpoint metadata (tuples come back as tuples).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from awm_jax.perf import CONV_IMPLS
from awm_jax.serialization import as_tuples

SCHEDULES = ("constant", "cosine", "multistep")


def _check_int(name: str, value: Any, low: int) -> None:
    # bool is an int subclass; epochs=True is a bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")


def _check_float(name: str, value: Any, low: float, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and \
             (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train a (backdoored) classifier with SGD.

    Attributes:
      model: registered model name (see :data:`awm_jax.models.MODELS`).
      model_kwargs: keyword arguments of the model besides ``num_classes``, e.g.
        ``{"features": (16, 32)}``; must be JSON-serialisable (lists are stored as tuples).
      epochs: passes over the (poisoned) training set.
      batch_size: training batch size; every step uses exactly this many images.
      learning_rate: peak SGD learning rate.
      momentum: SGD momentum in [0, 1); 0 disables it.
      weight_decay: L2 coefficient added to the gradient before momentum (PyTorch's SGD
        ``weight_decay``), applied to every parameter.
      nesterov: Nesterov momentum (needs ``momentum > 0``).
      schedule: ``"constant"``, ``"cosine"`` (decay to 0 at the last step) or ``"multistep"``
        (multiply by ``decay_factor`` at each epoch in ``milestones``).
      milestones: increasing epochs in ``(warmup_epochs, epochs)``; only for ``"multistep"``.
      decay_factor: the multistep factor in (0, 1].
      warmup_epochs: epochs of linear warm-up from 0 to ``learning_rate`` before the schedule.
      crop_padding: random-crop padding in pixels; 0 disables cropping.
      flip: random horizontal flips (off by default: digits and signs are not mirror symmetric).
      poison_rate: fraction of the attack's candidate training images that are poisoned, in (0, 1].
      seed: root of every PRNG key of the run (poison, init, data order, augmentation, trigger).
      eval_batch_size: batch size for test-set evaluation.
      conv_impl: the conv implementation the model trains with (:data:`awm_jax.perf.CONV_IMPLS`;
        ``"fast"``: per-shape conv weight gradients, :mod:`awm_jax.perf.fast_conv`). It is not
        part of the saved model: the variables do not depend on it.
    """

    model: str = "small_cnn"
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)
    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    decay_factor: float = 0.1
    warmup_epochs: float = 0.0
    crop_padding: int = 0
    flip: bool = False
    poison_rate: float = 0.1
    seed: int = 0
    eval_batch_size: int = 500
    conv_impl: str = "lax"

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a registered model name; got {self.model!r}.")
        if not isinstance(self.model_kwargs, Mapping):
            raise ValueError(f"model_kwargs must be a mapping of keyword arguments; got "
                             f"{type(self.model_kwargs).__name__}.")
        if "num_classes" in self.model_kwargs:
            raise ValueError("model_kwargs must not contain 'num_classes'; it comes from the "
                             "dataset.")
        # Frozen dataclass: normalise through object.__setattr__ so equality survives JSON.
        object.__setattr__(self, "model_kwargs", as_tuples(self.model_kwargs))
        object.__setattr__(self, "milestones", as_tuples(self.milestones))
        _check_int("epochs", self.epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("eval_batch_size", self.eval_batch_size, 1)
        _check_int("crop_padding", self.crop_padding, 0)
        _check_int("seed", self.seed, 0)
        _check_float("learning_rate", self.learning_rate, 0.0, low_open=True)
        _check_float("momentum", self.momentum, 0.0, 1.0, high_open=True)
        _check_float("weight_decay", self.weight_decay, 0.0)
        _check_float("poison_rate", self.poison_rate, 0.0, 1.0, low_open=True)
        _check_float("decay_factor", self.decay_factor, 0.0, 1.0, low_open=True)
        _check_float("warmup_epochs", self.warmup_epochs, 0.0, self.epochs, high_open=True)
        if not isinstance(self.nesterov, bool) or not isinstance(self.flip, bool):
            raise ValueError(f"nesterov and flip must be bools; got nesterov={self.nesterov!r}, "
                             f"flip={self.flip!r}.")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0; got momentum=0.")
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}; got {self.conv_impl!r}.")
        self._check_schedule()

    def _check_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {self.schedule!r}.")
        if self.schedule != "multistep":
            if self.milestones:
                raise ValueError(f"milestones={self.milestones} only apply to "
                                 f"schedule='multistep'; got schedule={self.schedule!r}.")
            return
        if not self.milestones:
            raise ValueError("schedule='multistep' needs milestones, e.g. milestones=(50, 75).")
        for m in self.milestones:
            if isinstance(m, bool) or not isinstance(m, int) or \
                    not self.warmup_epochs < m < self.epochs:
                raise ValueError(f"milestones must be integer epochs in (warmup_epochs="
                                 f"{self.warmup_epochs}, epochs={self.epochs}); got "
                                 f"{self.milestones}.")
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"milestones must be strictly increasing; got {self.milestones}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists when dumped)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not vanish).

        Raises:
          ValueError: an unknown key, or any invalid value (see the class attributes).
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known: {sorted(known)}.")
        return cls(**data)
