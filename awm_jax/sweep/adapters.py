"""Baseline defenses as sweep members: a small adapter per defense (FT, ANP).

An adapter says how one member of a vmapped baseline sweep (:mod:`awm_jax.sweep.baselines`)
starts, steps and ends, with the defense's own pure pieces (:func:`make_sgd_step`,
:func:`make_anp_step`, :func:`prune`) and its own key order, so that a member equals the
defense's ``purify`` with the same key and settings:

* ``ft``: epoch ``e`` permutes the clean images with ``split(fold_in(key, e))[0]`` and batch
  ``i`` uses ``fold_in(split(fold_in(key, e))[1], i)``, as
  :func:`~awm_jax.defenses.finetune.run_epochs`; each member gathers its own minibatch from the
  shared clean set (members of one seed share the key, hence the batch).
* ``anp``: iteration ``t`` uses ``fold_in(key, t)`` and draws its batch inside the step, as
  ANP's ``_purify``; the iterations are grouped into blocks of ``max(1, N // batch)`` (one
  history record each). The frozen model is shared by the members (vmap axis ``None``); only
  the masks, their momentum and the step counter are per member. Pruning by ``threshold`` is a
  ``jnp`` comparison, so the threshold is swept like the other hparams.

Every value that differs between members is an array leaf (hparams ``float32[M]``, keys
``key[M]``); the static settings (epochs, iterations, batch size, noise steps, augmentation,
Nesterov) shape the compiled program.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.defenses.anp import (
    ANPConfig,
    ANPState,
    init_anp_state,
    make_anp_step,
    prune,
)
from awm_jax.defenses.finetune import FTConfig, ce_loss_fn, init_ft_state, make_sgd_step
from awm_jax.registry import Registry
from awm_jax.types import Variables


class MemberSteps(NamedTuple):
    """One member's pure steps (un-batched; the runner vmaps and jits them).

    Attributes:
      begin_record: ``(key, record) -> carry``: the per-record keys (and data order) from a
        member's defense ``key`` and the 0-based record (FT: epoch; ANP: block) index.
      step: ``(state, data, carry, index, hparams) -> (state, metrics)``: update ``index``
        (FT: the batch within the epoch; ANP: the global iteration) on the whole clean set
        ``data`` (``{"image": float32[N, H, W, C], "label": int32[N]}``, shared by members).
    """

    begin_record: Callable[..., Any]
    step: Callable[..., tuple[Any, dict]]


class BaselineAdapter(NamedTuple):
    """How a baseline defense runs as a sweep member.

    Attributes:
      name: the defense's registry name (also the :class:`~awm_jax.sweep.spec.SweepSpec`
        defense).
      init: ``(variables, config) -> state``: one member's initial state.
      state_axes: the state's ``vmap`` axes as a prefix tree: ``0`` for leaves that differ per
        member, ``None`` for leaves the members share (ANP's frozen model).
      make_steps: ``(model, config, num_clean) -> MemberSteps``.
      schedule: ``(config, num_clean) -> list[range]``: the ``index`` values of each history
        record, in order.
      output: ``(state, hparams) -> output``: what a member keeps (a pytree of arrays).
      purified: ``(variables, output) -> {"params", "batch_stats"}``: a member's purified
        model from the backdoored ``variables`` (pure, vmappable over ``output``).
      details: ``(output) -> dict``: per-member numbers for the table (host, numpy).
      record: name of a history record (``"epoch"``, ``"block"``).
    """

    name: str
    init: Callable[[Variables, Any], Any]
    state_axes: Any
    make_steps: Callable[..., MemberSteps]
    schedule: Callable[[Any, int], list[range]]
    output: Callable[[Any, Any], Any]
    purified: Callable[[Variables, Any], Variables]
    details: Callable[[Any], dict]
    record: str


ADAPTERS: Registry = Registry("baseline sweep")


def get_adapter(name: str) -> BaselineAdapter:
    """The adapter of ``name`` (an unknown name raises a ValueError listing the known ones)."""
    return ADAPTERS.get(name)()


# ----------------------------------------------------------------------------- FT


def _ft_steps(model, config: FTConfig, num_clean: int) -> MemberSteps:
    batch = min(config.batch_size, num_clean)
    sgd = make_sgd_step(ce_loss_fn(model), crop_padding=config.crop_padding, flip=config.flip,
                        nesterov=config.nesterov)

    def begin_record(key, epoch):
        order_key, epoch_key = jax.random.split(jax.random.fold_in(key, epoch))
        return jax.random.permutation(order_key, num_clean), epoch_key

    def step(state, data, carry, index, hparams):
        order, epoch_key = carry
        rows = jax.lax.dynamic_slice_in_dim(order, index * batch, batch)
        minibatch = {"image": data["image"][rows], "label": data["label"][rows]}
        return sgd(state, minibatch, jax.random.fold_in(epoch_key, index), hparams)

    return MemberSteps(begin_record, step)


def _ft_schedule(config: FTConfig, num_clean: int) -> list[range]:
    return [range(max(1, num_clean // min(config.batch_size, num_clean)))] * config.epochs


@ADAPTERS.register("ft")
def ft() -> BaselineAdapter:
    return BaselineAdapter(
        name="ft", init=lambda variables, config: init_ft_state(variables), state_axes=0,
        make_steps=_ft_steps, schedule=_ft_schedule,
        output=lambda state, hparams: state.variables,
        purified=lambda variables, output: output, details=lambda output: {}, record="epoch")


# ----------------------------------------------------------------------------- ANP


def _anp_steps(model, config: ANPConfig, num_clean: int) -> MemberSteps:
    anp = make_anp_step(model, min(config.batch_size, num_clean), config.noise_steps)

    def step(state, data, key, index, hparams):
        return anp(state, data, jax.random.fold_in(key, index), hparams)

    return MemberSteps(lambda key, block: key, step)


def _anp_schedule(config: ANPConfig, num_clean: int) -> list[range]:
    per_block = max(1, num_clean // min(config.batch_size, num_clean))
    return [range(block * per_block, min((block + 1) * per_block, config.iterations))
            for block in range(math.ceil(config.iterations / per_block))]


def _anp_purified(variables: Variables, output: dict) -> Variables:
    return prune(variables, output["mask"], output["threshold"])


def _anp_details(output: dict) -> dict:
    """As ANP's single-run details: channel count, pruned channels, mean mask."""
    values = np.concatenate([np.asarray(m) for _, m in sorted(output["mask"].items())])
    return {"channels": int(values.size),
            "pruned": int(np.sum(values <= np.asarray(output["threshold"]))),
            "mask_mean": float(values.mean())}


@ADAPTERS.register("anp")
def anp() -> BaselineAdapter:
    return BaselineAdapter(
        name="anp", init=lambda variables, config: init_anp_state(variables),
        state_axes=ANPState(mask=0, velocity=0, params=None, batch_stats=None, step=0),
        make_steps=_anp_steps, schedule=_anp_schedule,
        output=lambda state, hparams: {"mask": state.mask,
                                       "threshold": jnp.asarray(hparams.threshold)},
        purified=_anp_purified, details=_anp_details, record="block")
