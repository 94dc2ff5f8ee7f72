"""Vmapped sweeps of the baseline defenses (FT, ANP): every member's steps as one program.

As :func:`awm_jax.sweep.runner.run_sweep` does for AWM: the members' states are stacked on a
leading axis, the defense's pure step (:mod:`awm_jax.sweep.adapters`) is ``jax.vmap``-ed over
(state, key, hparams) with the clean set shared (``in_axes None``) and jitted once here with the
state donated, and Python drives the records (FT: epochs; ANP: blocks of iterations) and the
steps within them. Members run in equal chunks (the last padded with copies of the last member,
whose results are dropped), sharded over a mesh's ``"sweep"`` axis when a mesh is given
(:mod:`awm_jax.sweep.mesh`); the clean set may be split over ``"data"``.

Keys equal the single runs': member ``i`` uses its defense key exactly as the defense's
``purify`` does (FT's per-epoch permutation and batch keys, ANP's per-iteration keys), so a
member equals ``purify`` with that key and its settings up to float32 rounding (batched
convolutions sum in another order; the tests find ~1e-7 after a few steps). As for AWM, longer
runs may drift further where the dynamics amplify rounding (ANP's signed noise ascent, pruning
at a threshold).

Speed: what a sweep buys is one program for many members, for accelerators and meshes. On a
CPU it is not faster than a loop of single runs: 8 FT (ANP) members of a (16, 32) small CNN on
100 images took 2.1 s (5.9 s) vmapped against 1.2 s (3.9 s) for 8 warm ``purify`` calls (2 busy
cores), the convolutions with per-member kernels or images batching poorly there.

Not here: checkpointing (``workdir``/``resume``) and sweeps spanning processes are AWM only
(:func:`run_sweep`); a baseline sweep refuses them. A member whose loss turns NaN/Inf does not
stop the sweep (a single run raises ``FloatingPointError``): it is flagged in
:attr:`BaselineSweepResult.diverged` and a warning names it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from awm_jax.data.dataset import Split
from awm_jax.defenses.base import build_once
from awm_jax.defenses.finetune import validate_clean
from awm_jax.sweep import mesh as mesh_lib
from awm_jax.sweep.adapters import BaselineAdapter, get_adapter
from awm_jax.sweep.runner import (
    _check_inputs,
    _mean_over_steps,
    _pad_members,
    estimate_chunk_size,
)
from awm_jax.sweep.spec import HPARAMS, SweepSpec, config_class
from awm_jax.types import PRNGKey, Variables


@dataclasses.dataclass
class BaselineSweepResult:
    """What :func:`run_baseline_sweep` returns.

    Attributes:
      defense: the swept defense (``"ft"``, ``"anp"``).
      outputs: every member's output, each leaf with a leading member axis ``[M, ...]`` (FT:
        the fine-tuned ``{"params", "batch_stats"}``; ANP: ``{"mask": {bn: float32[M, C]},
        "threshold": float32[M]}``).
      history: ``name -> float32[R, M]``: per-record (FT: epoch, ANP: block) means of the step
        metrics.
      diverged: ``bool[M]``: the member's loss turned NaN/Inf in some record.
      seconds: wall time of the whole sweep (compilation included).
      chunk_size: members per compiled chunk.
    """

    defense: str
    outputs: Any
    history: dict[str, np.ndarray]
    diverged: np.ndarray
    seconds: float
    chunk_size: int

    @property
    def num_members(self) -> int:
        return int(jax.tree_util.tree_leaves(self.outputs)[0].shape[0])

    def member_output(self, index: int) -> Any:
        return jax.tree_util.tree_map(lambda x: x[index], self.outputs)

    def purified(self, variables: Variables, index: int) -> Variables:
        """Member ``index``'s purified ``{"params", "batch_stats"}``."""
        return get_adapter(self.defense).purified(variables, self.member_output(index))

    def details(self, index: int) -> dict:
        """Member ``index``'s defense-specific numbers (ANP: channels, pruned, mask_mean)."""
        return get_adapter(self.defense).details(self.member_output(index))


class _VmappedSteps:
    """An adapter's member steps vmapped over the member axis and jitted once."""

    def __init__(self, adapter: BaselineAdapter, model: nn.Module, config, num_clean: int):
        steps = adapter.make_steps(model, config, num_clean)
        axes = adapter.state_axes
        self.begin_record = jax.jit(jax.vmap(steps.begin_record, in_axes=(0, None)))
        # state, data (shared), carry, index (shared), hparams
        self.step = jax.jit(jax.vmap(steps.step, in_axes=(axes, None, 0, None, 0),
                                     out_axes=(axes, 0)), donate_argnums=0)
        self.output = jax.jit(jax.vmap(adapter.output, in_axes=(axes, 0)))


def _vmapped_steps(name: str, model, config, num_clean: int) -> _VmappedSteps:
    return _VmappedSteps(get_adapter(name), model, config, num_clean)


def _stacked_state(state, axes, size: int, mesh):
    """``size`` copies of one member's ``state`` where ``axes`` is 0 (sharded over ``"sweep"``),
    the rest shared (replicated)."""
    def place(axis, subtree):
        if axis is None:
            return mesh_lib.replicate(subtree, mesh)
        stacked = jax.tree_util.tree_map(lambda x: jnp.repeat(x[None], size, axis=0), subtree)
        return mesh_lib.shard_members(stacked, mesh)
    return jax.tree_util.tree_map(place, axes, state, is_leaf=lambda x: x is None)


def _member_elements(adapter: BaselineAdapter, variables, config) -> int:
    """Array elements of one member's own part of the state (shapes only, nothing allocated)."""
    state = jax.eval_shape(lambda v: adapter.init(v, config), variables)
    sizes = jax.tree_util.tree_map(
        lambda axis, sub: 0 if axis is None else sum(math.prod(x.shape) for x in
                                                    jax.tree_util.tree_leaves(sub)),
        adapter.state_axes, state, is_leaf=lambda x: x is None)
    return sum(jax.tree_util.tree_leaves(sizes))


def _check_arguments(adapter, config, spec, workdir, resume) -> None:
    if workdir is not None or resume:
        raise ValueError(f"workdir={workdir!r}, resume={resume}: checkpointing (--workdir, "
                         f"--resume) is supported for AWM sweeps only, not {adapter.name}.")
    if jax.process_count() > 1:
        raise ValueError(f"a {adapter.name} sweep spanning {jax.process_count()} processes is "
                         "not supported (multi-host sweeps are AWM only); run one per host.")
    expected = config_class(adapter.name)
    if not isinstance(config, expected):
        raise TypeError(f"a {adapter.name} sweep needs a {expected.__name__}; got "
                        f"{type(config).__name__}.")
    hparams_class = HPARAMS[adapter.name][1]
    if not isinstance(spec, SweepSpec | hparams_class):
        raise TypeError(f"spec must be a SweepSpec or stacked {hparams_class.__name__}; got "
                        f"{type(spec).__name__}.")
    if isinstance(spec, SweepSpec) and spec.defense != adapter.name:
        raise ValueError(f"the spec sweeps {spec.defense!r} but the defense is "
                         f"{adapter.name!r}; build it with SweepSpec(..., "
                         f"defense={adapter.name!r}).")


def run_baseline_sweep(defense: str, model: nn.Module, variables: Variables, clean: Split,
                       config, spec: SweepSpec | Any, keys: PRNGKey | None = None, *,
                       chunk_size: int | None = None, mesh: jax.sharding.Mesh | None = None,
                       num_classes: int | None = None, progress: bool = True,
                       workdir: str | os.PathLike | None = None,
                       resume: bool = False) -> BaselineSweepResult:
    """Runs baseline ``defense`` for every sweep member at once (vmapped), in chunks.

    Args:
      defense: ``"ft"`` or ``"anp"`` (:data:`awm_jax.sweep.adapters.ADAPTERS`).
      model, variables: the backdoored model and its ``{"params", "batch_stats"}``.
      clean: the defender's clean images ``float32[N, H, W, C]`` and labels ``int32[N]``,
        shared by all members.
      config: the defense's config (:class:`FTConfig`, :class:`ANPConfig`): static settings and
        the values of unswept hparams.
      spec: a :class:`SweepSpec` with ``defense=defense`` (hparams and keys from
        :meth:`SweepSpec.stack`), or the stacked hparams (``SGDHparams``/``ANPHparams`` of
        ``float32[M]``) with ``keys``.
      keys: ``key[M]`` defense keys; required with stacked hparams, ignored with a spec.
      chunk_size: members per compiled chunk; None estimates it from memory (16 bytes per
        element of a member's state). Rounded up to a multiple of the mesh's ``"sweep"`` size.
      mesh: a :func:`~awm_jax.sweep.mesh.make_sweep_mesh` mesh of this process's devices;
        None runs on the default device.
      num_classes: if given, clean labels are checked against it.
      progress: show a progress bar over chunks x records.
      workdir, resume: not supported for baseline sweeps (a ValueError); see :func:`run_sweep`.

    Returns:
      A :class:`BaselineSweepResult` with ``M`` members in spec order.

    Raises:
      ValueError: an unknown defense, a spec of another defense, ``workdir`` or ``resume``, a
        sweep spanning processes, invalid clean data, hparams/keys of mismatched sizes, a
        non-positive chunk size, or clean data that the mesh's ``"data"`` axis does not divide.
      TypeError: ``config`` is not the defense's config class, or ``spec`` is neither a
        :class:`SweepSpec` nor the defense's hparams.
    """
    adapter = get_adapter(defense)
    _check_arguments(adapter, config, spec, workdir, resume)
    hparams, keys = spec.stack(config) if isinstance(spec, SweepSpec) else (spec, keys)
    count = _check_inputs(config, hparams, keys)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
    data = validate_clean(clean, num_classes)
    num_clean = int(data["label"].shape[0])
    steps = build_once(_vmapped_steps, adapter.name, model, config, num_clean)
    schedule = adapter.schedule(config, num_clean)
    multiple = mesh_lib.sweep_size(mesh)
    if chunk_size is None:
        chunk_size = estimate_chunk_size(_member_elements(adapter, variables, config), count,
                                         multiple)
    chunk_size = math.ceil(min(chunk_size, count) / multiple) * multiple
    num_chunks = math.ceil(count / chunk_size)
    hparams, keys = _pad_members((hparams, keys), num_chunks * chunk_size)
    data = mesh_lib.shard_data(data, mesh)
    start = time.perf_counter()
    outputs, histories = [], []
    with tqdm(total=num_chunks * len(schedule), desc=f"{defense.upper()} sweep",
              unit=adapter.record, disable=not progress) as bar:
        for first in range(0, num_chunks * chunk_size, chunk_size):
            chunk_hparams, chunk_keys = mesh_lib.shard_members(jax.tree_util.tree_map(
                lambda x, first=first: x[first:first + chunk_size], (hparams, keys)), mesh)
            state = _stacked_state(adapter.init(variables, config), adapter.state_axes,
                                   chunk_size, mesh)
            state, history = _run_chunk(steps, state, data, chunk_hparams, chunk_keys,
                                        schedule, bar)
            outputs.append(mesh_lib.to_host(steps.output(state, chunk_hparams)))
            histories.append(history)
    outputs = jax.tree_util.tree_map(lambda *x: np.concatenate(x)[:count], *outputs)
    history = {name: np.concatenate([h[name] for h in histories], axis=1)[:, :count]
               for name in histories[0]}
    diverged = ~np.all(np.isfinite(history["loss"]), axis=0)
    if diverged.any():
        warnings.warn(f"{defense} sweep: the loss of members {np.flatnonzero(diverged).tolist()} "
                      "turned NaN/Inf (lower their learning rate); their results are "
                      "meaningless.", RuntimeWarning, stacklevel=2)
    return BaselineSweepResult(defense, outputs, history, diverged,
                               time.perf_counter() - start, chunk_size)


def _run_chunk(steps: _VmappedSteps, state, data, hparams, keys, schedule, bar):
    """Every record of one chunk; returns ``(state, name -> float32[R, C])`` on the host."""
    records = []
    for record, indices in enumerate(schedule):
        carry = steps.begin_record(keys, record)
        metrics = []
        for index in indices:
            state, step_metrics = steps.step(state, data, carry, index, hparams)
            metrics.append(step_metrics)
        records.append(_mean_over_steps(metrics))
        bar.update(1)
    history = {name: np.stack([mesh_lib.to_host(r[name]) for r in records])
               for name in records[0] if name != "finite"}
    return state, history
