"""From ANP to AWM, one component at a time ("ablation"; awm-paper.md 3.1, Table 4, and 2.6).

Three switches move ANP (Wu & Wang 2021) towards AWM (Chai & Chen 2022):

* ``mask``: ``"neuron"``: one mask value per BatchNorm channel scaling its weight (ANP);
  ``"weight"``: an elementwise soft mask on every conv kernel (AWM).
* ``adversary``: ``"neuron_noise"``: ANP's multiplicative noise on every BN channel's weight and
  bias, ``scale * (m + delta)`` and ``bias * (1 + xi)`` (``m = 1`` with a weight mask);
  ``"weight_noise"``: the same noise on every masked conv weight, ``kernel * (m + delta)``;
  ``"trigger"``: AWM's universal input trigger, recovered by gradient ascent once per epoch.
* ``l1``: the sparsity term ``gamma * ||m||_1`` (a raw sum, as AWM's code) on or off.

The mask loss is always ``alpha * CE(natural) + (1 - alpha) * CE(adversarial) [+ gamma |m|_1]``.
Every other number is a field too, so one switch can be moved with the rest held. The defaults
are ANP's official settings: with them the step is :func:`awm_jax.defenses.anp.make_anp_step`
(same noise, keys, update and pruning), and ``preset("awm")`` is AWM's official objective and
schedule (:func:`awm_jax.defenses.awm.run_awm` with ``AWMConfig()``; same trigger, keys, Adam
and soft mask). The tests check both against those modules.

Table 4 rows (the paper's exact rows are unverified; this is our reading of its caption):

============================  ======  ============  ===  =============================
preset                        mask    adversary     L1   recipe
============================  ======  ============  ===  =============================
``anp``                       neuron  neuron_noise  off  ANP: SGD 0.2/0.9, alpha 0.2, BN
                                                         train, 2000 steps, prune <= 0.2
``weight_mask``               weight  neuron_noise  off  ANP's, soft mask (no pruning)
``weight_mask_trigger``       weight  trigger       off  AWM: Adam 1e-2, alpha 0.9, BN eval,
                                                         20 epochs x 5 passes, tau 1000
``awm``                       weight  trigger       on   AWM's, gamma 1e-8
============================  ======  ============  ===  =============================

The optimisation recipe moves with the adversary, since each method's recipe was tuned for its
own adversary; the output (hard pruning vs. soft mask) moves with the mask granularity.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from awm_jax.defenses.ablation_steps import AblationHparams, make_ablation_steps
from awm_jax.defenses.anp import prune, scale_batchnorm
from awm_jax.defenses.awm.mask import apply_mask, mask_statistics
from awm_jax.defenses.awm.step import Frozen, phase_keys
from awm_jax.defenses.base import (
    DEFENSES,
    Defense,
    DefenseResult,
    build_once,
    config_preset,
)
from awm_jax.defenses.checkpointing import open_checkpointer
from awm_jax.defenses.divergence import raise_if_diverged
from awm_jax.defenses.finetune import ConfigDictMixin, check_positive, validate_clean
from awm_jax.types import Variables

MASKS = ("neuron", "weight")
ADVERSARIES = ("neuron_noise", "weight_noise", "trigger")
OPTIMIZERS = ("sgd", "adam")
INNER_LABELS = ("predicted", "true")

# The Table 4 rows as changes to the ANP defaults; AWM's recipe comes with its adversary.
_WEIGHT_MASK = {"mask": "weight", "threshold": None}
_AWM_RECIPE = {"adversary": "trigger", "alpha": 0.9, "optimizer": "adam", "mask_lr": 1e-2,
               "bn_train": False, "inner_passes": 5, "epochs": 20, "iterations": None}
_ROWS: dict[str, dict[str, Any]] = {
    "anp": {},
    "weight_mask": _WEIGHT_MASK,
    "weight_mask_trigger": {**_WEIGHT_MASK, **_AWM_RECIPE},
    "awm": {**_WEIGHT_MASK, **_AWM_RECIPE, "l1": True},
}


@dataclasses.dataclass(frozen=True)
class AblationConfig(ConfigDictMixin):
    """The switches from ANP to AWM and every setting around them (defaults: ANP's code).

    Attributes:
      mask: "neuron" (one value per BatchNorm channel, ANP) or "weight" (elementwise on conv
        kernels, AWM).
      adversary: "neuron_noise" (ANP's noise on BN channels), "weight_noise" (the same noise on
        every masked conv weight) or "trigger" (AWM's universal input trigger).
      l1: add gamma * ||m||_1 (raw sum over all mask entries) to the mask loss (AWM: on).
      gamma: weight of that L1 term (AWM code: 1e-8).
      alpha: natural-loss weight; the adversarial loss gets 1 - alpha (ANP 0.2, AWM 0.9).
      eps: bound of the multiplicative noise (ANP: 0.4).
      noise_steps: signed ascent steps on the noise per mask step, each eps/steps (ANP: 1).
      tau: L1 bound of the trigger, applied by a rescale after each epoch's ascent (AWM: 1000).
      trigger_lr: step of the trigger's gradient ascent (AWM: 10).
      inner_labels: labels of the trigger ascent: "predicted" (AWM code) or "true" (paper).
      optimizer: mask optimiser: "sgd" with momentum (ANP) or "adam" (AWM).
      mask_lr: its learning rate (ANP SGD 0.2, AWM Adam 1e-2).
      momentum: SGD momentum (ANP: 0.9; unused by Adam).
      bn_train: BatchNorm uses batch statistics while the mask learns (ANP) instead of its
        running statistics (AWM).
      batch_size: images per step, drawn with replacement and shrunk to N when N is smaller
        (both: 128).
      inner_passes: an epoch is T = max(1, N // batch) * inner_passes mask steps, preceded by
        T trigger-ascent steps with the trigger adversary (ANP 1, AWM 5).
      epochs: number of epochs when iterations is None (AWM: 20).
      iterations: total mask steps, overriding epochs (ANP: 2000; None = epochs x T).
      threshold: the output zeroes mask entries <= threshold (ANP: 0.2); None returns the soft
        mask multiplied into the weights (AWM).
      mask_scope: kernels covered by the weight mask and weight noise: "conv" (AWM code) or
        "conv_dense".
    """

    PRESETS = tuple(_ROWS)

    mask: str = "neuron"
    adversary: str = "neuron_noise"
    l1: bool = False
    gamma: float = 1e-8
    alpha: float = 0.2
    eps: float = 0.4
    noise_steps: int = 1
    tau: float = 1000.0
    trigger_lr: float = 10.0
    inner_labels: str = "predicted"
    optimizer: str = "sgd"
    mask_lr: float = 0.2
    momentum: float = 0.9
    bn_train: bool = True
    batch_size: int = 128
    inner_passes: int = 1
    epochs: int = 20
    iterations: int | None = 2000
    threshold: float | None = 0.2
    mask_scope: str = "conv"

    def __post_init__(self):
        for name, allowed in (("mask", MASKS), ("adversary", ADVERSARIES),
                              ("optimizer", OPTIMIZERS), ("inner_labels", INNER_LABELS),
                              ("mask_scope", ("conv", "conv_dense"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}.")
        for name in ("alpha",) + (("threshold",) if self.threshold is not None else ()):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}.")
        for name in ("gamma", "eps"):
            check_positive(name, getattr(self, name), allow_zero=True)
        for name in ("tau", "trigger_lr", "mask_lr"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be a finite number > 0; got {getattr(self, name)}.")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum}.")
        for name in ("noise_steps", "batch_size", "inner_passes", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be >= 1 or None; got {self.iterations}.")

    @classmethod
    def preset(cls, name: str, **overrides) -> AblationConfig:
        """The Table 4 row ``name`` (see the module docstring), with ``overrides`` applied.

        Raises:
          ValueError: unknown row; the message lists the known ones.
        """
        return config_preset(cls, _ROWS, name, "ablation", overrides)

    def hparams(self) -> AblationHparams:
        return AblationHparams(*(jnp.asarray(v, jnp.float32) for v in (
            self.alpha, self.gamma, self.eps, self.tau, self.trigger_lr, self.mask_lr,
            self.momentum)))


def preset(name: str, **overrides) -> AblationConfig:
    """:meth:`AblationConfig.preset`."""
    return AblationConfig.preset(name, **overrides)


def output_variables(variables: Variables, mask, config: AblationConfig) -> Variables:
    """The purified model: the mask pruned at ``config.threshold`` or folded in softly."""
    if config.mask == "neuron":
        if config.threshold is not None:
            return prune(variables, mask, jnp.float32(config.threshold))
        return {"params": scale_batchnorm(variables["params"], mask),
                "batch_stats": variables["batch_stats"]}
    if config.threshold is not None:
        mask = jax.tree_util.tree_map(lambda m: (m > config.threshold).astype(m.dtype), mask)
    return {"params": apply_mask(variables["params"], mask),
            "batch_stats": variables["batch_stats"]}


class _Jitted(NamedTuple):
    begin_epoch: Any
    trigger_step: Any
    end_trigger_phase: Any
    mask_step: Any


def _mean(metrics: list[dict]) -> dict[str, float]:
    return {k: float(jnp.mean(jnp.stack([m[k] for m in metrics]))) for k in metrics[0]
            if k != "finite"}


# Checked for NaN/Inf after every epoch (AWM's runner checks the same ones).
_CHECKED = ("loss", "natural_ce", "adversarial_ce", "mask_l1", "trigger_ce", "trigger_l1")


def _lower(config: AblationConfig) -> dict[str, float]:
    """The hyperparameters that can make this setup diverge."""
    names = ("mask_lr", "trigger_lr" if config.adversary == "trigger" else "eps")
    return {name: getattr(config, name) for name in names + (("gamma",) if config.l1 else ())}


def _jitted_steps(model, config: AblationConfig, variables: Variables, count: int):
    """The pure steps of one setup and their jitted ``_Jitted``."""
    steps = make_ablation_steps(model, config, variables, count)
    return steps, _Jitted(*(jax.jit(f, donate_argnums=0) for f in (
        steps.begin_epoch, steps.trigger_step, steps.end_trigger_phase, steps.mask_step)))


def _run_epoch(run: _Jitted, state, frozen: Frozen, data, key, epochs_key, hparams,
               config: AblationConfig, epoch: int, done: int, count: int, per_epoch: int):
    """Epoch ``epoch``: the trigger phase (trigger adversary) and ``count`` mask steps after
    ``done`` earlier ones; returns ``(state, record without the epoch fields)``."""
    record = {}
    if config.adversary == "trigger":
        trigger_keys, mask_keys = phase_keys(jax.random.fold_in(epochs_key, epoch), per_epoch)
        state = run.begin_epoch(state, frozen, data, hparams)
        metrics = []
        for step_key in trigger_keys:
            state, step_metrics = run.trigger_step(state, frozen, data, step_key, hparams)
            metrics.append(step_metrics)
        state = run.end_trigger_phase(state, hparams)
        record = {**_mean(metrics), "trigger_l1": float(jnp.sum(jnp.abs(state.trigger)))}
        mask_keys = mask_keys[:count]
    else:
        mask_keys = [jax.random.fold_in(key, done + i) for i in range(count)]
    metrics = []
    for step_key in mask_keys:
        state, step_metrics = run.mask_step(state, frozen, data, step_key, hparams)
        metrics.append(step_metrics)
    return state, {**record, **_mean(metrics)}


def _purify(model, variables, clean, key, config: AblationConfig, *, num_classes=None,
            on_epoch=None, progress=True, workdir=None, checkpoint_every=1, max_to_keep=2,
            resume=False) -> DefenseResult:
    """The ablation; with ``workdir`` its :class:`AblationState` is checkpointed every
    ``checkpoint_every`` epochs of ``steps_per_epoch`` mask steps
    (:mod:`awm_jax.defenses.checkpointing`)."""
    start = time.perf_counter()
    data = validate_clean(clean, num_classes)
    count = int(data["label"].shape[0])
    shapes = tuple((jax.tree_util.keystr(path), leaf.shape, str(leaf.dtype)) for path, leaf
                   in jax.tree_util.tree_leaves_with_path(variables))
    steps, run = build_once(_jitted_steps, model, config, variables, count,
                            key=(model, config, count, shapes))
    hparams = config.hparams()
    frozen = Frozen(variables["params"], variables["batch_stats"])
    state = steps.init(data, hparams)
    per_epoch = steps.steps_per_epoch
    total = config.iterations if config.iterations is not None else config.epochs * per_epoch
    epochs = math.ceil(total / per_epoch)
    # Keys as the reference codes draw them, so the endpoints reproduce ANP and AWM exactly:
    # AWM splits its key and folds the epoch in; ANP folds the iteration into the raw key.
    epochs_key = jax.random.split(key)[1]
    excluded = 0.0
    with open_checkpointer(workdir, kind="ablation", unit=f"epochs of {per_epoch} mask steps",
                           config=config, key=key, data=data, variables=variables,
                           total_steps=epochs, checkpoint_every=checkpoint_every,
                           max_to_keep=max_to_keep, resume=resume) as checkpointer:
        restored, meta = checkpointer.restore(state)
        state, history = (state, []) if restored is None else (restored, meta["history"])
        done = min(meta["step"] * per_epoch, total)
        for epoch in tqdm(range(meta["step"], epochs), desc="ablation", unit="epoch",
                          disable=not progress, initial=meta["step"], total=epochs):
            count = min(per_epoch, total - done)
            state, record = _run_epoch(run, state, frozen, data, key, epochs_key, hparams,
                                       config, epoch, done, count, per_epoch)
            done += count
            record = {"epoch": epoch + 1, "iteration": done, **record}
            raise_if_diverged(record, what="ablation", epoch=epoch + 1, total=epochs,
                              metrics=_CHECKED, lower=_lower(config),
                              checkpointer=checkpointer.run)
            eval_start = time.perf_counter()
            if on_epoch is not None:
                record.update(on_epoch(epoch + 1, output_variables(variables, state.mask,
                                                                   config)))
            history.append(record)
            checkpointer.save(epoch + 1, state, {"history": history})
            excluded += time.perf_counter() - eval_start
    purified = output_variables(variables, state.mask, config)
    details = {"mask": mask_statistics(state.mask), "iterations": done,
               "row": next((name for name in _ROWS if preset(name) == config), None)}
    if config.threshold is not None:
        values = np.concatenate([np.asarray(m).ravel()
                                 for m in jax.tree_util.tree_leaves(state.mask)])
        details["pruned"] = int(np.sum(values <= config.threshold))
    seconds = time.perf_counter() - start - excluded + checkpointer.seconds_before
    return DefenseResult(purified, history, seconds, details)


@DEFENSES.register("ablation")
def ablation() -> Defense:
    return Defense("ablation", AblationConfig, _purify)
