"""Vmapped AWM sweeps: every member's steps run as one compiled program per step.

The pure AWM steps (:mod:`awm_jax.defenses.awm.step`) are ``jax.vmap``-ed over a leading member
axis (state, key and hparams batched; the frozen weights and the clean data shared, ``in_axes
None``) and jitted once here, with the state donated. As in :func:`run_awm`, Python drives the
epochs (``loop="python"``: a Python loop over the vmapped, jitted trigger/mask steps, the fast
mode on CPU) or each phase is one ``lax.scan`` (``loop="scan"``).

On one CPU device the default ``member_loop="auto"`` calls the jitted single-member steps once
per member instead (:func:`resolve_member_loop`: XLA's CPU backend runs convolutions whose
kernels differ per member slower than the members one by one); the state stays stacked, so
chunking, checkpoints and results keep their shapes.

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

Each chunk advances epoch by epoch (:mod:`awm_jax.sweep.chunk`), so with a ``workdir`` the whole
sweep (chunk cursor, the chunk's stacked states and selection bookkeeping, finished chunks'
results) is checkpointed every ``checkpoint_every`` epochs and a killed sweep resumes bit for bit
(:mod:`awm_jax.sweep.checkpointing`). A mesh may span processes (:mod:`awm_jax.sweep.distributed`).
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
from awm_jax.sweep.checkpointing import SweepCheckpointer, SweepProgress, fingerprint
from awm_jax.sweep.chunk import (
    ChunkProgress,
    finish_chunk,
    run_epoch,
    split_member_keys,
    start_chunk,
)
from awm_jax.sweep.chunk import fold_in as _fold_in  # noqa: F401 (benchmarks import it here)
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
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 30


MEMBER_LOOPS = ("auto", "vmap", "loop")


def resolve_member_loop(member_loop: str, mesh=None) -> str:
    """``"auto"`` -> ``"loop"`` on a single CPU device, else ``"vmap"``.

    On XLA's CPU backend a convolution whose kernel is batched over members (every member masks
    the weights differently) becomes a grouped convolution that runs slower per member than
    the plain one: 8 vmapped small-VGG members took longer than 8 sequential runs
    (``experiments/results/performance.json``, ``sweep``). GPUs and TPUs batch them well.
    """
    if member_loop not in MEMBER_LOOPS:
        raise ValueError(f"member_loop must be one of {MEMBER_LOOPS}; got {member_loop!r}.")
    if member_loop != "auto":
        if member_loop == "loop" and mesh_lib.sweep_size(mesh) > 1:
            raise ValueError("member_loop='loop' runs members one after another on one device; "
                             "a mesh with a 'sweep' axis of size "
                             f"{mesh_lib.sweep_size(mesh)} needs member_loop='vmap'.")
        return member_loop
    on_one_cpu = (jax.default_backend() == "cpu" and mesh_lib.sweep_size(mesh) == 1
                  and jax.process_count() == 1)
    return "loop" if on_one_cpu else "vmap"


@jax.jit
def _member(tree, index):
    return jax.tree_util.tree_map(lambda x: x[index], tree)


@jax.jit
def _stack_members(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def _over_members(fn, in_axes, donate_argnums=(), member_loop="vmap"):
    """``fn`` over a leading member axis of the ``in_axes == 0`` arguments: one vmapped
    program (``"vmap"``), or the jitted single-member ``fn`` called per member and the results
    stacked (``"loop"``: the same function, each member exactly as a single run computes it)."""
    if member_loop == "vmap":
        return jax.jit(jax.vmap(fn, in_axes=in_axes), donate_argnums=donate_argnums)
    single = jax.jit(fn)

    def looped(*args):
        count = next(jax.tree_util.tree_leaves(arg)[0].shape[0]
                     for arg, axis in zip(args, in_axes) if axis == 0)
        return _stack_members([
            single(*(_member(arg, index) if axis == 0 else arg
                     for arg, axis in zip(args, in_axes)))
            for index in range(count)])
    return looped


class _VmappedDriver:
    """The AWM steps over members (vmapped and jitted once, state donated; or, with
    ``member_loop="loop"``, the jitted single-member steps called per member)."""

    def __init__(self, steps: AWMSteps, config: AWMConfig, member_loop: str = "vmap"):
        self.steps, self.config, self.member_loop = steps, config, member_loop
        over = functools.partial(_over_members, member_loop=member_loop)
        shared = (0, None, None)  # state, frozen, data
        self.init = over(steps.init, (None, None, 0))
        self.begin_epoch = over(steps.begin_epoch, (*shared, 0), donate_argnums=0)
        self.trigger_step = over(steps.trigger_step, (*shared, 0, 0), donate_argnums=0)
        self.end_trigger_phase = over(steps.end_trigger_phase, (0, 0), donate_argnums=0)
        self.mask_step = over(steps.mask_step, (*shared, 0, 0), donate_argnums=0)
        self.end_epoch = over(steps.end_epoch, (0,), donate_argnums=0)
        self.selection_score = over(steps.selection_score, (*shared, 0))
        self.scanned_trigger_phase = over(steps.trigger_phase, (*shared, 0, 0),
                                          donate_argnums=0)
        self.scanned_mask_phase = over(steps.mask_phase, (*shared, 0, 0), donate_argnums=0)
        self.shrink_init = over(steps.shrink_init, (0,))
        self.shrink_step = over(steps.shrink_step, (0, 0, None, None, 0, 0),
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


@functools.lru_cache(maxsize=8)
def _cached_driver(model: nn.Module, config: AWMConfig, num_clean: int,
                   member_loop: str) -> _VmappedDriver:
    return _VmappedDriver(make_awm_steps(model, config, num_clean), config, member_loop)


def _driver(model: nn.Module, config: AWMConfig, num_clean: int,
            member_loop: str = "vmap") -> _VmappedDriver:
    """The jitted steps over members of one setup, reused so that a second sweep (the next
    seed group, a resume) with an equal model and config does not compile again."""
    try:
        return _cached_driver(model, config, num_clean, member_loop)
    except TypeError:  # an unhashable module attribute: build the steps uncached.
        return _VmappedDriver(make_awm_steps(model, config, num_clean), config, member_loop)


@jax.jit
def _trigger_l1(trigger):
    return jnp.sum(jnp.abs(trigger), axis=tuple(range(1, trigger.ndim)))


@jax.jit
def _mean_over_steps(history):
    return {name: jnp.mean(jnp.stack([m[name] for m in history]), axis=0) for name in history[0]}


@functools.partial(jax.jit, static_argnums=1)
def _step_keys(epoch_keys, steps_per_phase):
    """``T`` trigger and ``T`` mask step keys ``key[M]``: member ``m`` gets ``phase_keys`` of its
    key. Tuples of arrays rather than ``key[T, M]``, so that no step indexes an array that spans
    processes."""
    trigger, mask = jax.vmap(lambda k: phase_keys(k, steps_per_phase))(epoch_keys)
    return tuple(trigger.swapaxes(0, 1)), tuple(mask.swapaxes(0, 1))


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
              num_classes: int | None = None, progress: bool = True,
              workdir: str | os.PathLike | None = None, checkpoint_every: int = 1,
              max_to_keep: int = 2, resume: bool = False,
              member_loop: str = "auto") -> SweepResult:
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
      mesh: a :func:`make_sweep_mesh` mesh; None runs on the default device. The mesh may span
        processes (:mod:`awm_jax.sweep.distributed`); every process then calls this function
        with the same arguments and gets the whole result.
      num_classes: if given, clean labels are checked against it.
      progress: show a progress bar over chunks x epochs (on process 0).
      workdir: if given, the sweep's whole progress is checkpointed there with orbax
        (:mod:`awm_jax.sweep.checkpointing`) every ``checkpoint_every`` epochs (counted over
        all chunks) and after the last one.
      checkpoint_every: epochs between checkpoints.
      max_to_keep: checkpoints kept in ``workdir``.
      resume: continue from the newest checkpoint in ``workdir`` (a fresh start if there is
        none; a finished sweep returns its saved results). Without ``resume``, a ``workdir``
        holding checkpoints is an error. A resumed sweep returns the same masks, metrics and
        selected epochs, bit for bit, as an uninterrupted one with the same inputs, chunk size
        and mesh (on the same device type).
      member_loop: how a chunk's members run: ``"vmap"`` (one batched program per step),
        ``"loop"`` (each member's jitted single-run step in turn, so each member computes
        exactly what its single run does) or ``"auto"`` (:func:`resolve_member_loop`: loop
        on one CPU device, where batched convolutions are slower, else vmap).

    Returns:
      A :class:`SweepResult` with ``M`` members in spec order.

    Raises:
      ValueError: invalid clean data, hparams/keys of mismatched sizes, a non-positive chunk
        size, an unknown ``member_loop`` or ``"loop"`` with a multi-device mesh, clean data
        that the mesh's ``"data"`` axis does not divide, ``resume`` without ``workdir``, a ``workdir`` with a sweep spanning processes, checkpoints in ``workdir``
        without ``resume``, or a checkpoint of another config, chunk size, mesh or inputs.
    """
    if resume and workdir is None:
        raise ValueError("resume=True needs a workdir to resume from; got workdir=None.")
    if workdir is not None and jax.process_count() > 1:
        raise ValueError(f"workdir={str(workdir)!r}: checkpointing a sweep that spans "
                         f"{jax.process_count()} processes is not supported; run it without "
                         "a workdir, or checkpoint single-process sweeps (one per host).")
    hparams, keys = spec.stack(config) if isinstance(spec, SweepSpec) else (spec, keys)
    count = _check_inputs(config, hparams, keys)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
    data = _validate_clean(clean, num_classes)
    driver = _driver(model, config, int(data["label"].shape[0]),
                     resolve_member_loop(member_loop, mesh))
    frozen = Frozen(variables["params"], variables["batch_stats"])
    multiple = mesh_lib.sweep_size(mesh)
    if chunk_size is None:
        chunk_size = estimate_chunk_size(mask_size(create_mask(frozen.params, config.mask_scope)),
                                         count, multiple)
    chunk_size = math.ceil(min(chunk_size, count) / multiple) * multiple
    num_chunks = math.ceil(count / chunk_size)
    checkpointer = None
    if workdir is not None:
        checkpointer = SweepCheckpointer(
            workdir, config, fingerprint(hparams, keys, data, variables), chunk_size=chunk_size,
            num_chunks=num_chunks, sweep_devices=multiple, checkpoint_every=checkpoint_every,
            max_to_keep=max_to_keep)
    hparams, keys = _pad_members((hparams, keys), num_chunks * chunk_size)
    frozen, data = mesh_lib.replicate(frozen, mesh), mesh_lib.shard_data(data, mesh)

    def members(index):
        first = index * chunk_size
        chunk = jax.tree_util.tree_map(lambda x: x[first:first + chunk_size], (hparams, keys))
        return mesh_lib.shard_members(chunk, mesh)

    def state_like():
        shapes = jax.eval_shape(driver.init, frozen.params, data, members(0)[0])
        return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)

    start = time.perf_counter()
    epochs = config.outer_epochs
    bar = None
    try:
        run = checkpointer.start(resume, state_like) if checkpointer is not None else None
        run = run or SweepProgress()
        if run.chunk is not None:
            run.chunk = _placed(run.chunk, mesh)
        bar = tqdm(total=num_chunks * epochs, initial=run.step(epochs), desc="AWM sweep",
                   unit="epoch", disable=not progress or jax.process_index() != 0)
        while run.chunks_done < num_chunks:
            chunk_hparams, chunk_keys = members(run.chunks_done)
            _, epochs_keys = split_member_keys(chunk_keys)
            if run.chunk is None:
                run.chunk = start_chunk(driver, frozen, data, chunk_hparams, chunk_keys)
            while run.chunk is not None:
                run_epoch(driver, run.chunk, frozen, data, chunk_hparams, epochs_keys)
                if run.chunk.epochs_done == epochs:
                    run.add_chunk(*finish_chunk(driver, run.chunk, frozen, data, chunk_hparams,
                                                epochs_keys))
                if checkpointer is not None:
                    checkpointer.maybe_save(run)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if checkpointer is not None:
            checkpointer.close()
    return SweepResult(jax.tree_util.tree_map(lambda m: m[:count], run.masks),
                       {name: values[:, :count] for name, values in run.history.items()},
                       run.selected[:count], time.perf_counter() - start, chunk_size)


def _placed(chunk: ChunkProgress, mesh) -> ChunkProgress:
    """A restored chunk's arrays with their member axis over the mesh's ``"sweep"`` axis."""
    if mesh is None:
        return chunk
    return dataclasses.replace(chunk, **mesh_lib.shard_members(
        {"state": chunk.state, "best": chunk.best, "mask_sum": chunk.mask_sum}, mesh))
