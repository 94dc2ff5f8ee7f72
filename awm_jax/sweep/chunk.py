"""One chunk of a sweep, epoch by epoch: :func:`run_awm`'s mask selection kept per member.

A chunk's whole progress is a :class:`ChunkProgress` (the stacked AWM states, the selection
bookkeeping and the metrics so far), advanced one epoch at a time by :func:`run_epoch`, so that
:mod:`awm_jax.sweep.checkpointing` can save it between any two epochs and a resumed chunk
continues exactly where it stopped: epoch ``e`` of member ``i`` uses ``fold_in(epochs_key_i,
e)``, whatever ran before it in this process.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.defenses.awm.step import AWMState
from awm_jax.sweep import mesh as mesh_lib
from awm_jax.types import Mask


@dataclasses.dataclass
class ChunkProgress:
    """Everything one chunk carries from epoch to epoch (``C`` members).

    Attributes:
      state: the stacked :class:`AWMState` (leading axis ``C``) after ``epochs_done`` epochs.
      epochs_done: finished epochs.
      best: ``(score float32[C], epoch int32[C], mask)`` of ``"min_robust_loss"``: each
        member's lowest selection score so far (``inf``: none yet), its 1-based epoch and mask;
        ``None`` for the other selections.
      mask_sum: running sum of the averaged masks (``"average"``), ``None`` until the first.
      history: one ``name -> float32[C]`` dict of step metrics per finished epoch.
      scores: selection scores ``float32[C]`` so far (``"min_robust_loss"``).
    """

    state: AWMState
    epochs_done: int = 0
    best: tuple | None = None
    mask_sum: Mask | None = None
    history: list[dict] = dataclasses.field(default_factory=list)
    scores: list = dataclasses.field(default_factory=list)


def split_member_keys(keys) -> tuple[jax.Array, jax.Array]:
    """``(shrink_keys, epochs_keys)``, each ``key[C]``: member ``i``'s key split as run_awm
    splits its key."""
    return _split(keys)


def start_chunk(driver, frozen, data, hparams, keys) -> ChunkProgress:
    """The initial states of a chunk's members, after the optional shrink epochs."""
    config = driver.config
    state = driver.init(frozen.params, data, hparams)
    shrink_keys, _ = split_member_keys(keys)
    if config.shrink_epochs:
        shrink_state = driver.shrink_init(state.mask)
        for step in range(config.shrink_epochs * driver.steps.steps_per_phase):
            state, shrink_state, _ = driver.shrink_step(
                state, shrink_state, frozen, data, fold_in(shrink_keys, step), hparams)
    best = None
    if config.mask_selection == "min_robust_loss":
        # The placeholder mask is replaced before it is returned.
        best = (*_initial_best(state.mask, config.outer_epochs),
                jax.tree_util.tree_map(jnp.copy, state.mask))
    return ChunkProgress(state=state, best=best)


def run_epoch(driver, chunk: ChunkProgress, frozen, data, hparams, epochs_keys) -> None:
    """Epoch ``chunk.epochs_done + 1`` of every member; updates ``chunk`` in place."""
    config, epoch = driver.config, chunk.epochs_done
    epoch_keys = fold_in(epochs_keys, epoch)
    state, trigger_metrics = driver.trigger_phase(chunk.state, frozen, data, epoch_keys, hparams)
    if config.mask_selection == "min_robust_loss" and epoch > 0:
        # The score of the mask after epoch ``epoch`` (1-based).
        score = trigger_metrics["selection_score"]
        chunk.best = _keep_best(chunk.best, score, epoch, state.mask)
        chunk.scores.append(score)
    state, mask_metrics = driver.mask_phase(state, frozen, data, epoch_keys, hparams)
    chunk.history.append({name: value for name, value in
                          {**trigger_metrics, **mask_metrics}.items()
                          if name != "selection_score"})
    if config.mask_selection == "average" and epoch >= average_from(config.outer_epochs):
        chunk.mask_sum = (jax.tree_util.tree_map(jnp.copy, state.mask) if chunk.mask_sum is None
                          else _add_masks(chunk.mask_sum, state.mask))
    chunk.state, chunk.epochs_done = state, epoch + 1


def finish_chunk(driver, chunk: ChunkProgress, frozen, data, hparams, epochs_keys):
    """The chunk's selected masks after its last epoch, per ``config.mask_selection``.

    Returns:
      ``(masks, history, selected_epoch)`` on the host (gathered from every process): the
      selected masks ``[C, ...]``, ``name -> float32[E, C]`` (``"selection_score"`` row ``e``:
      the score of the mask after epoch ``e + 1``) and ``int32[C]`` 1-based selected epochs.
    """
    config = driver.config
    epochs, members = config.outer_epochs, len(chunk.history[0]["loss"])
    mask, selected = chunk.state.mask, np.full((members,), epochs, np.int32)
    scores = list(chunk.scores)
    if config.mask_selection == "average":
        first = average_from(epochs)
        mask = jax.tree_util.tree_map(lambda m: m / (epochs - first), chunk.mask_sum)
        selected[:] = first + 1
    elif config.mask_selection == "min_robust_loss":  # one more trigger phase scores the last mask
        state, final = driver.trigger_phase(chunk.state, frozen, data,
                                            fold_in(epochs_keys, epochs), hparams)
        scores.append(final["selection_score"])
        _, selected, mask = _keep_best(chunk.best, final["selection_score"], epochs, state.mask,
                                       final=True)
    history = {name: np.stack([mesh_lib.to_host(h[name]) for h in chunk.history])
               for name in chunk.history[0]}
    if scores:
        history["selection_score"] = np.stack([mesh_lib.to_host(s) for s in scores])
    return mesh_lib.to_host(mask), history, np.asarray(mesh_lib.to_host(selected), np.int32)


def average_from(epochs: int) -> int:
    """The 0-based first epoch whose mask ``"average"`` selection averages (as run_awm)."""
    return epochs - math.ceil(epochs / 2)


@jax.jit
def fold_in(keys, step):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)


@jax.jit
def _split(keys):
    split = jax.vmap(jax.random.split)(keys)
    return split[:, 0], split[:, 1]


@jax.jit
def _add_masks(total, mask):
    return jax.tree_util.tree_map(jnp.add, total, mask)


@functools.partial(jax.jit, static_argnums=1)
def _initial_best(mask, epochs: int):
    # Built under jit from the (possibly sharded) mask, so the arrays live on the chunk's devices.
    members = jax.tree_util.tree_leaves(mask)[0].shape[0]
    return jnp.full((members,), jnp.inf, jnp.float32), jnp.full((members,), epochs, jnp.int32)


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
