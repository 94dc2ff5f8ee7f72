"""Vmapped AWM sweeps: every member's steps run as one compiled program per step.

The pure AWM steps (:mod:`awm_jax.defenses.awm.step`) are ``jax.vmap``-ed over a leading member
axis (state, key and hparams batched; the frozen weights and the clean data shared, ``in_axes
None``) and jitted once here, with the state donated. As in :func:`run_awm`, Python drives the
epochs (``loop="python"``: a Python loop over the vmapped, jitted trigger/mask steps, the fast
mode on CPU) or each phase is one ``lax.scan`` (``loop="scan"``).

Members run in chunks of ``chunk_size``; every chunk has the same size (the last is padded with
copies of the last member, whose results are dropped), so the steps compile once. With a mesh,
each chunk's member axis is sharded over ``"sweep"`` (:mod:`awm_jax.sweep.mesh`) and the chunk
size is rounded up to a multiple of that axis, so any member count works on any mesh. Chunking
and sharding change only how many members one XLA call batches: results agree with an unchunked
single-device run to float32 rounding (XLA may order a batched convolution's sums differently
for another batch size; the tests measure differences of ~1e-7).

The clean data is shared by every member: a spec's seeds vary only the defense keys here.
:func:`awm_jax.sweep.job.sweep_model` groups members by seed, drawing each seed's clean set as
the single-run pipeline does.

Keys equal :func:`run_awm`'s: member ``i``'s defense key is split into ``(shrink, epochs)`` and
epoch ``e`` uses ``fold_in(epochs, e)``, so a member equals a single run with the same key.
Every mask selection of :func:`run_awm` works per member: ``"average"`` averages each member's
own masks; ``"min_robust_loss"`` scores each member's masks and keeps each member's best, so the
members' selected epochs differ (``SweepResult.selected_epoch`` is ``int32[M]``).

How close is "equal"? Step for step, a member agrees with its single run to float32 rounding: the
vmapped convolutions (kernels batched over members) sum in another order, so the first
differences are ~1e-7 (tests: masks and metrics within 1e-5 over 2 epochs, tiny model). AWM's
dynamics then amplify any such rounding, as they would any 1-ulp change: mainly the trigger
ascent (step size 10, unconstrained until the end-of-epoch rescale; in the measurement below a
7.7e-7 trigger difference after one step became 0.06 at the end of that epoch's ascent), after
which the mask steps and the argmax inner labels diverge too. On the demo model
(``experiments/benchmarks/sweep_drift.py``, 4 members, keys asserted identical) the max mask
difference stays at 1e-7 to 4e-6 for 4 epochs, then grows to 0.02 (epoch 5), 0.3 (epoch 8) and
0.47 (epoch 30). A single run against itself with one mask entry lowered by 2**-24 at the start
diverges alike (0.01 after one epoch, 0.3-0.6 after 12; also with SGD instead of Adam on the
mask). So long sweeps reproduce single runs statistically (same settings, same key, another
rounding path), not bit for bit; run a member alone with :func:`run_awm` when that matters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from awm_jax.data.dataset import Split
from awm_jax.defenses.awm.config import AWMConfig, AWMHparams
from awm_jax.defenses.awm.mask import create_mask, fold_mask, mask_size
from awm_jax.defenses.awm.runner import _validate_clean
from awm_jax.defenses.awm.step import AWMSteps, Frozen, make_awm_steps, phase_keys
from awm_jax.sweep import mesh as mesh_lib
from awm_jax.sweep.spec import SweepSpec
from awm_jax.types import Mask, PRNGKey, Variables

# Per member and masked weight: mask, Adam mu and nu, gradient (float32 each).
BYTES_PER_MASKED_WEIGHT = 4 * 4
MEMORY_FRACTION = 0.25  # of the free memory; the rest covers activations and the frozen model


@dataclasses.dataclass
class SweepResult:
    """What :func:`run_sweep` returns.

    Attributes:
      masks: the selected masks, every leaf with a leading member axis ``[M, ...]``.
      history: ``name -> float32[E, M]`` per-epoch means of the step metrics.
      selected_epoch: ``int32[M]``, each member's 1-based epoch of its returned mask
        (``"average"``: the first averaged epoch; ``"min_robust_loss"``: the member's own best).
      seconds: wall time of the whole sweep (compilation included).
      chunk_size: members per compiled chunk.
    """

    masks: Mask
    history: dict[str, np.ndarray]
    selected_epoch: np.ndarray
    seconds: float
    chunk_size: int

    @property
    def num_members(self) -> int:
        return int(jax.tree_util.tree_leaves(self.masks)[0].shape[0])

    def member_mask(self, index: int) -> Mask:
        return jax.tree_util.tree_map(lambda m: m[index], self.masks)

    def purified(self, variables: Variables, index: int) -> Variables:
        """Member ``index``'s purified ``{"params", "batch_stats"}`` (mask folded in)."""
        return {"params": fold_mask(variables["params"], self.member_mask(index)),
                "batch_stats": variables["batch_stats"]}


def estimate_chunk_size(num_masked: int, num_members: int, multiple: int = 1,
                        available_bytes: int | None = None) -> int:
    """Members per chunk from a memory estimate.

    Each member holds ``BYTES_PER_MASKED_WEIGHT`` bytes per masked weight (mask, Adam's mu and
    nu, the gradient, float32); a chunk may use ``MEMORY_FRACTION`` of the free memory (the rest
    is left to activations, which scale with the batch rather than the mask). The result is at
    least ``multiple`` (the sweep-axis size), a multiple of it, and no more than needed.
    """
    if available_bytes is None:
        available_bytes = available_memory()
    per_member = max(1, num_masked * BYTES_PER_MASKED_WEIGHT)
    fits = int(available_bytes * MEMORY_FRACTION) // per_member
    needed = math.ceil(num_members / multiple) * multiple
    return max(multiple, min(needed, fits // multiple * multiple))


def available_memory(device: jax.Device | None = None) -> int:
    """Free bytes of ``device``'s memory (accelerators) or of the host (CPU)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 30


class _VmappedDriver:
    """The AWM steps vmapped over members and jitted once (state donated)."""

    def __init__(self, steps: AWMSteps, config: AWMConfig):
        self.steps, self.config = steps, config
        shared = (0, None, None)  # state, frozen, data
        self.init = jax.jit(jax.vmap(steps.init, in_axes=(None, None, 0)))
        self.begin_epoch = jax.jit(jax.vmap(steps.begin_epoch, in_axes=(*shared, 0)),
                                   donate_argnums=0)
        self.trigger_step = jax.jit(jax.vmap(steps.trigger_step, in_axes=(*shared, 0, 0)),
                                    donate_argnums=0)
        self.end_trigger_phase = jax.jit(jax.vmap(steps.end_trigger_phase, in_axes=(0, 0)),
                                         donate_argnums=0)
        self.mask_step = jax.jit(jax.vmap(steps.mask_step, in_axes=(*shared, 0, 0)),
                                 donate_argnums=0)
        self.end_epoch = jax.jit(jax.vmap(steps.end_epoch, in_axes=(0,)), donate_argnums=0)
        self.selection_score = jax.jit(jax.vmap(steps.selection_score, in_axes=(*shared, 0)))
        self.scanned_trigger_phase = jax.jit(
            jax.vmap(steps.trigger_phase, in_axes=(*shared, 0, 0)), donate_argnums=0)
        self.scanned_mask_phase = jax.jit(jax.vmap(steps.mask_phase, in_axes=(*shared, 0, 0)),
                                          donate_argnums=0)
        self.shrink_init = jax.jit(jax.vmap(steps.shrink_init, in_axes=(0,)))
        self.shrink_step = jax.jit(jax.vmap(steps.shrink_step, in_axes=(0, 0, None, None, 0, 0)),
                                   donate_argnums=(0, 1))

    def trigger_phase(self, state, frozen, data, epoch_key, hparams):
        """begin_epoch and the trigger ascent for every member (``epoch_key``: ``key[M]``);
        metrics are ``float32[M]``, with ``"selection_score"`` for ``"min_robust_loss"``."""
        if self.config.loop == "scan":
            return self.scanned_trigger_phase(state, frozen, data, epoch_key, hparams)
        trigger_keys, _ = _step_keys(epoch_key, self.steps.steps_per_phase)
        state = self.begin_epoch(state, frozen, data, hparams)
        history = []
        for step_keys in trigger_keys:
            state, metrics = self.trigger_step(state, frozen, data, step_keys, hparams)
            history.append(metrics)
        state = self.end_trigger_phase(state, hparams)
        metrics = {**_mean_over_steps(history), "trigger_l1": _trigger_l1(state.trigger)}
        if self.config.mask_selection == "min_robust_loss":
            metrics["selection_score"] = self.selection_score(state, frozen, data, hparams)
        return state, metrics

    def mask_phase(self, state, frozen, data, epoch_key, hparams):
        """The mask steps and end_epoch for every member; metrics are ``float32[M]``."""
        if self.config.loop == "scan":
            return self.scanned_mask_phase(state, frozen, data, epoch_key, hparams)
        _, mask_keys = _step_keys(epoch_key, self.steps.steps_per_phase)
        history = []
        for step_keys in mask_keys:
            state, metrics = self.mask_step(state, frozen, data, step_keys, hparams)
            history.append(metrics)
        return self.end_epoch(state), _mean_over_steps(history)


@jax.jit
def _trigger_l1(trigger):
    return jnp.sum(jnp.abs(trigger), axis=tuple(range(1, trigger.ndim)))


@jax.jit
def _mean_over_steps(history):
    return {name: jnp.mean(jnp.stack([m[name] for m in history]), axis=0) for name in history[0]}


@jax.jit
def _add_masks(total, mask):
    return jax.tree_util.tree_map(jnp.add, total, mask)


@functools.partial(jax.jit, static_argnames="final")
def _keep_best(best, score, epoch, mask, final=False):
    """Per member, replaces ``(score, epoch, mask)`` of ``best`` where ``score`` is lower (as
    :func:`run_awm` keeps a strictly lower score); ``final`` also replaces members that never
    had a finite score, so every member returns a mask."""
    best_score, best_epoch, best_mask = best
    better = score < best_score
    if final:
        better = better | ~jnp.isfinite(best_score)
    pick = lambda new, old: jnp.where(better.reshape(-1, *[1] * (new.ndim - 1)), new, old)
    return (pick(score, best_score), pick(jnp.full_like(best_epoch, epoch), best_epoch),
            jax.tree_util.tree_map(pick, mask, best_mask))


@jax.jit
def _fold_in(keys, step):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


@functools.partial(jax.jit, static_argnums=1)
def _step_keys(epoch_keys, steps_per_phase):
    """``key[T, M]`` trigger and mask step keys: member ``m`` gets ``phase_keys`` of its key."""
    trigger, mask = jax.vmap(lambda k: phase_keys(k, steps_per_phase))(epoch_keys)
    return trigger.swapaxes(0, 1), mask.swapaxes(0, 1)


def _check_inputs(config: AWMConfig, hparams: AWMHparams, keys) -> int:
    sizes = {name: tuple(np.shape(v)) for name, v in hparams._asdict().items()}
    count = int(np.shape(keys)[0]) if keys is not None and np.ndim(keys) else -1
    if any(len(s) != 1 or s[0] != count for s in sizes.values()):
        raise ValueError(f"hparams must be float32[M] with M = the number of keys ({count}); "
                         f"got shapes {sizes}.")
    return count


def _pad_members(tree, total: int):
    """Pads the leading axis to ``total`` by repeating the last member."""
    def pad(x):
        extra = total - x.shape[0]
        return x if extra == 0 else jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])
    return jax.tree_util.tree_map(pad, tree)


def run_sweep(model: nn.Module, variables: Variables, clean: Split, config: AWMConfig,
              spec: SweepSpec | AWMHparams, keys: PRNGKey | None = None, *,
              chunk_size: int | None = None, mesh: jax.sharding.Mesh | None = None,
              num_classes: int | None = None, progress: bool = True) -> SweepResult:
    """Runs AWM for every sweep member at once (vmapped), in chunks, optionally over devices.

    Args:
      model, variables: the backdoored model and its ``{"params", "batch_stats"}``.
      clean: the defender's clean images ``float32[N, H, W, C]`` and labels ``int32[N]``,
        shared by all members.
      config: static settings (and the values of unswept hparams).
      spec: a :class:`SweepSpec` (hparams and defense keys from :meth:`SweepSpec.stack`), or
        stacked :class:`AWMHparams` of ``float32[M]`` with ``keys``.
      keys: ``key[M]`` defense keys; required with stacked hparams, ignored with a spec.
      chunk_size: members per compiled chunk; None picks it with :func:`estimate_chunk_size`.
        Rounded up to a multiple of the mesh's ``"sweep"`` size.
      mesh: a :func:`make_sweep_mesh` mesh; None runs on the default device.
      num_classes: if given, clean labels are checked against it.
      progress: show a progress bar over chunks x epochs.

    Returns:
      A :class:`SweepResult` with ``M`` members in spec order.

    Raises:
      ValueError: invalid clean data, hparams/keys of mismatched sizes, a non-positive chunk
        size, or clean data that the mesh's ``"data"`` axis does not divide.
    """
    hparams, keys = spec.stack(config) if isinstance(spec, SweepSpec) else (spec, keys)
    count = _check_inputs(config, hparams, keys)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
    data = _validate_clean(clean, num_classes)
    steps = make_awm_steps(model, config, int(data["label"].shape[0]))
    frozen = Frozen(variables["params"], variables["batch_stats"])
    multiple = mesh_lib.sweep_size(mesh)
    if chunk_size is None:
        chunk_size = estimate_chunk_size(mask_size(create_mask(frozen.params, config.mask_scope)),
                                         count, multiple)
    chunk_size = math.ceil(min(chunk_size, count) / multiple) * multiple
    padded = math.ceil(count / chunk_size) * chunk_size
    hparams, keys = _pad_members((hparams, keys), padded)
    driver = _VmappedDriver(steps, config)
    frozen, data = mesh_lib.replicate(frozen, mesh), mesh_lib.shard_data(data, mesh)
    start = time.perf_counter()
    bar = tqdm(total=padded // chunk_size * config.outer_epochs, desc="AWM sweep",
               unit="epoch", disable=not progress)
    outputs = []
    for first in range(0, padded, chunk_size):
        chunk = jax.tree_util.tree_map(lambda x, first=first: x[first:first + chunk_size],
                                       (hparams, keys))
        outputs.append(_run_chunk(driver, frozen, data, *mesh_lib.shard_members(chunk, mesh),
                                  bar))
    bar.close()
    masks = jax.tree_util.tree_map(lambda *m: np.concatenate(m)[:count],
                                   *[mask for mask, _, _ in outputs])
    history = {name: np.concatenate([h[name] for _, h, _ in outputs], axis=1)[:, :count]
               for name in outputs[0][1]}
    selected = np.concatenate([epochs for _, _, epochs in outputs])[:count]
    return SweepResult(masks, history, selected, time.perf_counter() - start, chunk_size)


def _run_chunk(driver: _VmappedDriver, frozen, data, hparams, keys, bar):
    """All epochs of one chunk, with :func:`run_awm`'s selection bookkeeping per member.

    Returns:
      ``(masks, history, selected_epoch)``: the selected masks ``[C, ...]`` (numpy),
      ``name -> float32[E, C]`` (``"selection_score"`` row ``e``: the score of the mask after
      epoch ``e + 1``) and ``int32[C]`` 1-based selected epochs.
    """
    config = driver.config
    epochs = config.outer_epochs
    state = driver.init(frozen.params, data, hparams)
    shrink_keys, epochs_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    if config.shrink_epochs:
        shrink_state = driver.shrink_init(state.mask)
        for step in range(config.shrink_epochs * driver.steps.steps_per_phase):
            state, shrink_state, _ = driver.shrink_step(
                state, shrink_state, frozen, data, _fold_in(shrink_keys, step), hparams)
    average_from = epochs - math.ceil(epochs / 2)
    selecting = config.mask_selection == "min_robust_loss"
    members = keys.shape[0]
    # (score, epoch, mask) per member; the placeholder mask is replaced before it is returned.
    best = (jnp.full((members,), jnp.inf, jnp.float32), jnp.full((members,), epochs, jnp.int32),
            jax.tree_util.tree_map(jnp.copy, state.mask))
    mask_sum, history, scores = None, [], []
    for epoch in range(epochs):
        epoch_keys = _fold_in(epochs_keys, epoch)
        state, trigger_metrics = driver.trigger_phase(state, frozen, data, epoch_keys, hparams)
        if selecting and epoch > 0:  # the score of the mask after epoch ``epoch`` (1-based)
            best = _keep_best(best, trigger_metrics["selection_score"], epoch, state.mask)
            scores.append(trigger_metrics["selection_score"])
        state, mask_metrics = driver.mask_phase(state, frozen, data, epoch_keys, hparams)
        history.append({**trigger_metrics, **mask_metrics})
        if config.mask_selection == "average" and epoch >= average_from:
            mask_sum = (jax.tree_util.tree_map(jnp.copy, state.mask) if mask_sum is None
                        else _add_masks(mask_sum, state.mask))
        bar.update(1)
    mask, selected = state.mask, np.full((members,), epochs, np.int32)
    if config.mask_selection == "average":
        mask = jax.tree_util.tree_map(lambda m: m / (epochs - average_from), mask_sum)
        selected[:] = average_from + 1
    elif selecting:  # one more trigger phase scores the final mask, as in run_awm
        state, final = driver.trigger_phase(state, frozen, data,
                                            _fold_in(epochs_keys, epochs), hparams)
        scores.append(final["selection_score"])
        _, selected, mask = _keep_best(best, final["selection_score"], epochs, state.mask,
                                       final=True)
    history = {name: np.stack([np.asarray(h[name]) for h in history])
               for name in history[0] if name != "selection_score"}
    if selecting:
        history["selection_score"] = np.stack([np.asarray(s) for s in scores])
    return jax.tree_util.tree_map(np.asarray, mask), history, np.asarray(selected, np.int32)
