"""Saving and resuming sweeps: a :class:`~awm_jax.run_checkpoint.RunCheckpointer` over a whole
sweep's progress.

A sweep's progress is a :class:`SweepProgress`: the finished chunks' results and the current
chunk's :class:`~awm_jax.sweep.chunk.ChunkProgress`. Its step counter is the number of finished
epochs over all chunks, ``chunks_done * outer_epochs + epochs done in the current chunk``, so a
workdir holds one directory per saved count (``<workdir>/<step>/``), each with

* ``state/``: an orbax ``StandardSave`` of ``{"chunk": {"state", "best", "mask_sum"}, "masks"}``:
  the current chunk's stacked :class:`AWMState` (masks, Adam states with their learning rates,
  triggers, inner labels, epoch counters), its per-member selection bookkeeping (best score,
  epoch and mask; the running mask sum) and the finished chunks' selected masks (``None`` where
  there is nothing to hold);
* ``meta/``: JSON with the config (plus the chunk size and the ``"sweep"`` mesh size, which
  fix the compiled batch), a fingerprint of the inputs (hparams, keys, clean images, model
  variables), the chunk cursor, the metrics so far (float32 values, which JSON holds exactly),
  the finished chunks' selected epochs and library versions.

A chunk that finishes is saved with ``chunk = None`` and its results in ``masks``, so the step
``k * outer_epochs`` means "chunk ``k`` not started". Epoch ``e`` of member ``i`` uses
``fold_in(epochs_key_i, e)``, so a sweep resumed from any step computes what the uninterrupted
sweep computes next, bit for bit on the same device type and mesh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from awm_jax.checkpoint import variables_digest
from awm_jax.defenses.awm.config import AWMConfig, AWMHparams
from awm_jax.defenses.awm.step import AWMState
from awm_jax.run_checkpoint import RunCheckpointer
from awm_jax.sweep.chunk import ChunkProgress
from awm_jax.types import Mask, Variables

KIND = "AWM sweep"


@dataclasses.dataclass
class SweepProgress:
    """A sweep's progress (what a checkpoint holds).

    Attributes:
      chunks_done: finished chunks.
      chunk: the current chunk, or ``None`` between chunks.
      masks: the finished chunks' selected masks, numpy ``[chunks_done * C, ...]``, or None.
      history: ``name -> float32[E, chunks_done * C]`` of the finished chunks, or None.
      selected: ``int32[chunks_done * C]`` 1-based selected epochs of the finished chunks.
    """

    chunks_done: int = 0
    chunk: ChunkProgress | None = None
    masks: Mask | None = None
    history: dict[str, np.ndarray] | None = None
    selected: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))

    def step(self, epochs: int) -> int:
        """Finished epochs over all chunks."""
        return self.chunks_done * epochs + (self.chunk.epochs_done if self.chunk else 0)

    def add_chunk(self, masks: Mask, history: dict[str, np.ndarray],
                  selected: np.ndarray) -> None:
        """Appends a finished chunk's results and closes the chunk."""
        if self.masks is None:
            self.masks, self.history, self.selected = masks, history, selected
        else:
            self.masks = jax.tree_util.tree_map(lambda a, b: np.concatenate([a, b]),
                                                self.masks, masks)
            self.history = {k: np.concatenate([v, history[k]], axis=1)
                            for k, v in self.history.items()}
            self.selected = np.concatenate([self.selected, selected])
        self.chunks_done += 1
        self.chunk = None


def fingerprint(hparams: AWMHparams, keys, data: dict, variables: Variables) -> dict[str, Any]:
    """What besides the config a resumed sweep must share with the sweep that saved it."""
    def digest(*arrays) -> str:
        sha = hashlib.sha256()
        for array in arrays:
            sha.update(np.ascontiguousarray(np.asarray(array)).tobytes())
        return sha.hexdigest()

    return {"members": int(np.shape(keys)[0]),
            "hparams_sha256": digest(*hparams),
            "keys_sha256": digest(jax.random.key_data(keys)),
            "clean_shape": list(np.shape(data["image"])),
            "clean_sha256": digest(data["image"], data["label"]),
            "variables_sha256": variables_digest(variables)}


def _floats(tree) -> Any:
    """float32 device/host arrays as nested lists of Python floats (exact for float32)."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), tree)


class SweepCheckpointer:
    """Saves and restores :class:`SweepProgress` in ``workdir`` (a :class:`RunCheckpointer` of
    kind ``"AWM sweep"`` whose steps are finished epochs over all chunks).

    Args:
      workdir: directory of the sweep's checkpoints (created if missing).
      config: the sweep's static config, stored as JSON and compared on restore.
      fingerprint: :func:`fingerprint` of the sweep's inputs, compared on restore.
      chunk_size: members per chunk (after rounding to the mesh).
      num_chunks: chunks of the sweep.
      sweep_devices: size of the mesh's ``"sweep"`` axis (1 without a mesh).
      checkpoint_every: save after every this many epochs (and always after the last one).
      max_to_keep: checkpoints kept; older ones are deleted after each save.

    Raises:
      ValueError: ``checkpoint_every`` or ``max_to_keep`` < 1.
    """

    def __init__(self, workdir: str | os.PathLike, config: AWMConfig,
                 fingerprint: dict[str, Any], *, chunk_size: int, num_chunks: int,
                 sweep_devices: int = 1, checkpoint_every: int = 1, max_to_keep: int = 2):
        self.epochs = config.outer_epochs
        self.chunk_size = chunk_size
        self.run = RunCheckpointer(
            workdir, kind=KIND, unit="epochs",
            config={**config.to_dict(), "chunk_size": chunk_size, "sweep_devices": sweep_devices},
            fingerprint=fingerprint, total_steps=num_chunks * config.outer_epochs,
            checkpoint_every=checkpoint_every, max_to_keep=max_to_keep)
        self.workdir = self.run.workdir

    def latest_path(self) -> str | None:
        return self.run.latest_path()

    def maybe_save(self, progress: SweepProgress) -> bool:
        """Saves ``progress`` if its step is due (every ``checkpoint_every``, or the last)."""
        step = progress.step(self.epochs)
        if not self.run.due(step):
            return False
        chunk = progress.chunk
        arrays = {"chunk": None, "masks": progress.masks}
        meta = {"chunks_done": progress.chunks_done,
                "history": _floats(progress.history) if progress.history else None,
                "selected": np.asarray(progress.selected).tolist(),
                "has_chunk": chunk is not None, "has_best": False, "has_mask_sum": False}
        if chunk is not None:
            best = None if chunk.best is None else dict(zip(("score", "epoch", "mask"),
                                                            chunk.best))
            arrays["chunk"] = {"state": chunk.state, "best": best, "mask_sum": chunk.mask_sum}
            meta.update(epochs_done=chunk.epochs_done, chunk_history=_floats(chunk.history),
                        chunk_scores=_floats(chunk.scores), has_best=best is not None,
                        has_mask_sum=chunk.mask_sum is not None)
        return self.run.maybe_save(step, arrays, meta)

    def start(self, resume: bool, state_like: Callable[[], AWMState]) -> SweepProgress | None:
        """The progress to continue from: the newest checkpoint if ``resume`` (``None`` if there
        is none: a fresh start), else ``None`` after checking that the workdir holds none.

        Args:
          resume: continue from the newest checkpoint.
          state_like: returns a host pytree shaped like one chunk's stacked state (zeros).

        Raises:
          ValueError: checkpoints exist and ``resume`` is False, or the newest checkpoint was
            written with another config, chunk size or mesh, or other inputs, or does not fit.
        """
        def target(meta):
            like = state_like()
            rows = meta["chunks_done"] * self.chunk_size
            masks = None if rows == 0 else jax.tree_util.tree_map(
                lambda m: np.zeros((rows, *m.shape[1:]), m.dtype), like.mask)
            chunk = None
            if meta["has_chunk"]:
                members = self.chunk_size
                best = None if not meta["has_best"] else {
                    "score": np.zeros(members, np.float32), "epoch": np.zeros(members, np.int32),
                    "mask": like.mask}
                chunk = {"state": like, "best": best,
                         "mask_sum": like.mask if meta["has_mask_sum"] else None}
            return {"chunk": chunk, "masks": masks}

        restored = self.run.start(None, resume, target_for_meta=target)
        if restored is None:
            return None
        arrays, meta = restored
        progress = SweepProgress(chunks_done=int(meta["chunks_done"]))
        if arrays["masks"] is not None:
            progress.masks = jax.tree_util.tree_map(np.asarray, arrays["masks"])
            progress.history = {k: np.asarray(v, np.float32) for k, v in meta["history"].items()}
            progress.selected = np.asarray(meta["selected"], np.int32)
        saved = arrays["chunk"]
        if saved is not None:
            best = saved["best"]
            progress.chunk = ChunkProgress(
                state=saved["state"], epochs_done=int(meta["epochs_done"]),
                best=None if best is None else (best["score"], best["epoch"], best["mask"]),
                mask_sum=saved["mask_sum"],
                history=[{k: np.asarray(v, np.float32) for k, v in h.items()}
                         for h in meta["chunk_history"]],
                scores=[np.asarray(s, np.float32) for s in meta["chunk_scores"]])
        return progress

    def close(self) -> None:
        self.run.close()
