"""AWM settings: static structure in :class:`AWMConfig`, swept numbers in :class:`AWMHparams`.

Defaults reproduce the official code (``jinghuichen/AWM`` ``main.py``, awm-paper.md 1.4); each
field's docstring says where the paper (Algorithm 1) differs and how to get the paper's variant.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple

import jax.numpy as jnp

from awm_jax.defenses.base import config_preset
from awm_jax.perf import CONV_IMPLS
from awm_jax.types import Array

INNER_LABELS = ("predicted", "true")
TRIGGER_CONSTRAINTS = ("rescale_epoch", "project_step")
MASK_OPTIMIZERS = ("adam", "sgd")
LOOPS = ("python", "scan")
MASK_SELECTIONS = ("last", "min_robust_loss", "average")

# Named settings (``AWMConfig.preset``, ``--awm-preset``, ``awm:NAME`` in compare).
_PRESETS = {
    # The official code's defaults (the class defaults): CIFAR-10, 500 clean images.
    "official": {},
    # The official README's one-shot command (awm-paper.md 2.2).
    "official_one_shot": {"batch_size": 32, "tau": 100.0},
    # Ours for one image per class on CIFAR-10: the official README's CIFAR-10 BadNets example
    # (alpha 0.99) with a 10x smaller mask learning rate, which keeps 6-7 points more clean
    # accuracy at the same or lower ASR on the zoo's CIFAR-10 BadNets ResNet-18
    # (experiments/results/sweep/README.md). Not a general one-shot default: on the digits
    # small CNN it leaves the backdoor in place (README, "Named settings").
    "cifar10_one_shot": {"batch_size": 32, "tau": 100.0, "alpha": 0.99, "mask_lr": 1e-3},
}


class AWMHparams(NamedTuple):
    """The numbers a sweep may vary; every field is a float32 array (scalar for one run).

    Attributes:
      alpha: weight of the clean CE in the outer loss.
      beta: weight of the triggered CE (ignored when the config ties it to ``1 - alpha``).
      gamma: weight of the mask's L1 norm.
      tau: L1 bound of the trigger.
      trigger_lr: step size of the trigger ascent (official: 10).
      mask_lr: learning rate of the mask optimizer.
      lr_decay: per-epoch multiplicative decay of ``mask_lr`` (1 = none; official flag: 0.9).
    """

    alpha: Array
    beta: Array
    gamma: Array
    tau: Array
    trigger_lr: Array
    mask_lr: Array
    lr_decay: Array


@dataclasses.dataclass(frozen=True)
class AWMConfig:
    """Every knob of AWM. Defaults = the official code's defaults (CIFAR-10, 500 images).

    Attributes:
      alpha: clean-loss weight (code default 0.9; the one-shot CIFAR-10 README example uses 0.99).
      beta: triggered-loss weight. ``None`` ties it to ``1 - alpha`` as the code does; the paper
        has an independent beta.
      gamma: L1 weight on the mask, applied to the raw sum over all masked weights (code: 1e-8).
      tau: L1 bound of the trigger over all pixels and channels (code: 1000 for 500 images, 100 in
        the one-shot examples).
      trigger_lr: step size of the trigger's plain gradient ascent (hard-coded 10 in the code).
      mask_lr: mask learning rate (code: Adam, 1e-2).
      lr_decay: per-epoch decay factor of ``mask_lr``; 1.0 = off (code default; the code's
        ``--lr-decay`` flag and its first release use 0.9).
      outer_epochs: number of epochs E (code: 20).
      inner_passes: each phase draws ``max(1, N // batch_size) * inner_passes`` batches per epoch
        (code: 5). The code yields zero batches when N < batch_size; we shrink the batch to N.
      batch_size: images per batch, drawn with replacement as the code's sampler does (code: 128).
      inner_labels: ``"predicted"``: the masked model's own predictions on the clean images (code,
        I-BAU's trick); ``"true"``: the clean labels (paper).
      trigger_constraint: ``"rescale_epoch"``: rescale onto the L1 sphere once per epoch after the
        inner phase (code); ``"project_step"``: exact L1-ball projection after every step.
      clip_inner: clip ``x + delta`` to [0, 1] in the inner phase (code: no; outer only).
      clip_outer: clip ``x + delta`` to [0, 1] in the outer phase (code: yes).
      mask_optimizer: ``"adam"`` (code) or ``"sgd"`` (plain gradient descent, paper).
      mask_scope: ``"conv"`` (every conv kernel, code) or ``"conv_dense"``.
      shrink_epochs: epochs of the code's optional pre-phase on ``CE(clean) + gamma |m|_1``.
      shrink_lr: Adam learning rate of that pre-phase (code: 1e-3).
      mask_selection: ``"last"`` returns the final mask (code). ``"min_robust_loss"`` returns,
        among the masks after epochs 1..E, the one with the lowest ``CE(x) + CE(x + delta)`` on
        the defender's own images, ``delta`` being the trigger the next inner phase recovers
        against it (one extra inner phase scores the final mask): needs no test data.
        ``"average"`` returns the mean of the masks after each of the last ``ceil(E / 2)``
        epochs, which smooths the epoch-to-epoch swings of the mask.
      loop: ``"python"`` drives jitted steps from Python (fast on CPU); ``"scan"`` compiles each
        phase as one ``lax.scan``.
      conv_impl: the conv implementation AWM runs the model with (:data:`awm_jax.perf.CONV_IMPLS`;
        not in the official code, it changes speed, not results beyond float32 rounding):
        ``"fast"`` computes conv weight gradients, which the mask step needs, per shape
        (:mod:`awm_jax.perf.fast_conv`; the default: a ResNet-18 AWM epoch on a 2-core CPU
        takes 239 s with it against 448 s with lax, 1.87x, and the one-shot small VGG 1.17x;
        experiments/results/performance.json ``conv_impl``); ``"lax"`` is XLA's own
        (use it on GPUs).
        Applies to models with a ``conv_impl`` attribute (every registered one); others run as
        they are.
      mask_chunks: the mask step computes its gradient over this many chunks of the batch, one
        after another, and adds them up (capped at the batch size; not in the official code).
        Same result up to float32 summation order; the step's temporary memory shrinks about
        ``mask_chunks``-fold, which on CPU also saves the page faults of allocating it afresh
        on every call (perf_notes.md section 5). ``"auto"`` (the default) picks the fewest
        chunks whose estimated buffer fits 1.5 GB on CPU or a quarter of an accelerator's
        memory (:mod:`awm_jax.defenses.awm.chunking`): 4 for ResNet-18 width 64 at batch
        128 on CPU (an epoch in 205.9 s instead of 287.9 s whole), 1 for the small models.
    """

    PRESETS = tuple(_PRESETS)

    alpha: float = 0.9
    beta: float | None = None
    gamma: float = 1e-8
    tau: float = 1000.0
    trigger_lr: float = 10.0
    mask_lr: float = 1e-2
    lr_decay: float = 1.0
    outer_epochs: int = 20
    inner_passes: int = 5
    batch_size: int = 128
    inner_labels: str = "predicted"
    trigger_constraint: str = "rescale_epoch"
    clip_inner: bool = False
    clip_outer: bool = True
    mask_optimizer: str = "adam"
    mask_scope: str = "conv"
    shrink_epochs: int = 0
    shrink_lr: float = 1e-3
    mask_selection: str = "last"
    loop: str = "python"
    conv_impl: str = "fast"
    mask_chunks: int | str = "auto"

    def __post_init__(self):
        _check_range("alpha", self.alpha, 0.0, 1.0)
        if self.beta is not None:
            _check_range("beta", self.beta, 0.0, float("inf"))
        _check_range("gamma", self.gamma, 0.0, float("inf"))
        _check_positive("tau", self.tau)
        _check_positive("trigger_lr", self.trigger_lr)
        _check_positive("mask_lr", self.mask_lr)
        _check_positive("shrink_lr", self.shrink_lr)
        if not 0.0 < self.lr_decay <= 1.0:
            raise ValueError(f"lr_decay must be in (0, 1]; got {self.lr_decay}.")
        for name in ("outer_epochs", "inner_passes", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
        object.__setattr__(self, "mask_chunks", _parse_chunks(self.mask_chunks))
        if self.shrink_epochs < 0:
            raise ValueError(f"shrink_epochs must be >= 0; got {self.shrink_epochs}.")
        for name, allowed in (("inner_labels", INNER_LABELS),
                              ("trigger_constraint", TRIGGER_CONSTRAINTS),
                              ("mask_optimizer", MASK_OPTIMIZERS), ("loop", LOOPS),
                              ("mask_selection", MASK_SELECTIONS),
                              ("conv_impl", CONV_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}.")

    # Fields that change speed and memory, not results (beyond float32 rounding): results
    # made with other values of these are still current (experiments/reproduction_cells.py).
    SPEED_FIELDS = ("loop", "conv_impl", "mask_chunks")

    @classmethod
    def preset(cls, name: str, **overrides) -> "AWMConfig":
        """The named setting with ``overrides`` applied: ``official`` (the class defaults),
        ``official_one_shot`` (batch 32, tau 100) or ``cifar10_one_shot`` (ours for one image
        per class on CIFAR-10: batch 32, tau 100, alpha 0.99, mask_lr 1e-3).

        Raises:
          ValueError: unknown name; the message lists the known ones.
        """
        return config_preset(cls, _PRESETS, name, "AWM", overrides)

    @property
    def tie_beta(self) -> bool:
        return self.beta is None

    def hparams(self) -> AWMHparams:
        """The swept numbers as float32 scalars."""
        beta = 1.0 - self.alpha if self.beta is None else self.beta
        return AWMHparams(*(jnp.asarray(v, jnp.float32) for v in (
            self.alpha, beta, self.gamma, self.tau, self.trigger_lr, self.mask_lr,
            self.lr_decay)))

    def to_dict(self) -> dict:
        """Every field, so that reports and checkpoints record the conv implementation too."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AWMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown AWM config keys {unknown}; known: {sorted(known)}.")
        return cls(**values)



def _parse_chunks(value: int | str) -> int | str:
    """``"auto"`` or an int >= 1 (also from command-line or JSON text such as ``"4"``)."""
    if value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"mask_chunks must be 'auto' or an integer >= 1; got {value!r}.")
    return int(value)


def official_one_shot(**overrides) -> AWMConfig:
    """The official README's one-shot settings (batch 32, tau 100, alpha 0.9)."""
    return AWMConfig.preset("official_one_shot", **overrides)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high and math.isfinite(value)):
        raise ValueError(f"{name} must be in [{low}, {high}]; got {value}.")


def _check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0; got {value}.")
