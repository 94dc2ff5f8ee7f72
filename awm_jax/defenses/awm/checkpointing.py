"""Saving and resuming AWM runs: a :class:`~awm_jax.run_checkpoint.RunCheckpointer` over the
run's whole progress.

A workdir holds one directory per saved epoch count (``<workdir>/<epochs done>/``), each with

* ``state/``: an orbax ``StandardSave`` of ``{"awm": AWMState, "best_mask", "mask_sum"}`` (the
  mask, the Adam state with its learning rate, the trigger, the inner labels, the epoch counter,
  and the selection bookkeeping's masks; ``None`` where a selection mode keeps no mask);
* ``meta/``: JSON with the config, a fingerprint of the inputs (key, clean images, model
  variables), the history so far, the best score and epoch, and library versions.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact; ``max_to_keep`` prunes the oldest. Arrays are
restored into the ``jax.eval_shape`` of the freshly initialised progress, so a checkpoint of a
different model is rejected. Because each epoch's key is ``fold_in(epochs_key, epoch)``, a run
resumed from epoch ``k`` draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any

import jax
import numpy as np

from awm_jax.checkpoint import variables_digest
from awm_jax.defenses.awm.config import AWMConfig
from awm_jax.defenses.awm.step import AWMState
from awm_jax.run_checkpoint import RunCheckpointer
from awm_jax.types import Mask, PRNGKey, Variables


@dataclasses.dataclass
class Progress:
    """Everything a run carries from one epoch to the next (what a checkpoint holds).

    Attributes:
      state: the AWM state after ``epochs_done`` epochs.
      history: one dict per finished epoch.
      epochs_done: finished epochs.
      best_score: lowest selection score so far (``"min_robust_loss"``), ``inf`` if none.
      best_epoch: the epoch (1-based) of ``best_mask``.
      best_mask: the best mask so far, or ``None``.
      mask_sum: running sum of the masks being averaged (``"average"``), or ``None``.
      seconds: wall seconds of the epochs run so far, over every process that ran them (so a
        resumed run reports the time of the whole run, not of its last piece).
    """

    state: AWMState
    history: list[dict]
    epochs_done: int
    best_score: float
    best_epoch: int
    best_mask: Mask | None = None
    mask_sum: Mask | None = None
    seconds: float = 0.0

    def arrays(self) -> dict[str, Any]:
        return {"awm": self.state, "best_mask": self.best_mask, "mask_sum": self.mask_sum}


def fingerprint(key: PRNGKey, data: dict, variables: Variables) -> dict[str, Any]:
    """What besides the config a resumed run must share with the run that saved it."""
    images = np.ascontiguousarray(np.asarray(data["image"]))
    labels = np.ascontiguousarray(np.asarray(data["label"]))
    clean = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return {"key": np.asarray(jax.random.key_data(key)).tolist(),
            "clean_shape": list(images.shape), "clean_sha256": clean,
            "variables_sha256": variables_digest(variables)}




class AWMCheckpointer:
    """Saves and restores :class:`Progress` in ``workdir`` (a :class:`RunCheckpointer` of kind
    ``"AWM"`` whose steps are finished epochs).

    Args:
      workdir: directory of the run's checkpoints (created if missing).
      config: the run's config, stored as JSON and compared on restore.
      fingerprint: :func:`fingerprint` of the run's inputs, compared on restore.
      checkpoint_every: save after every this many epochs (and always after the last one).
      max_to_keep: checkpoints kept; older ones are deleted after each save.

    Raises:
      ValueError: ``checkpoint_every`` or ``max_to_keep`` < 1.
    """

    def __init__(self, workdir: str | os.PathLike, config: AWMConfig,
                 fingerprint: dict[str, Any], *, checkpoint_every: int = 1,
                 max_to_keep: int = 2):
        self.run = RunCheckpointer(workdir, kind="AWM", unit="epochs",
                                   config=config.to_dict(),
                                   fingerprint=fingerprint, total_steps=config.outer_epochs,
                                   checkpoint_every=checkpoint_every, max_to_keep=max_to_keep)
        self.workdir = self.run.workdir

    def latest_path(self) -> str | None:
        """The directory of the newest complete checkpoint, or ``None``."""
        return self.run.latest_path()

    def maybe_save(self, progress: Progress) -> bool:
        """Saves ``progress`` if its epoch count is due (every ``checkpoint_every``, or last)."""
        meta = {"history": progress.history,
                "best_score": (None if math.isinf(progress.best_score)
                               else progress.best_score),
                "best_epoch": progress.best_epoch,
                "has_best_mask": progress.best_mask is not None,
                "has_mask_sum": progress.mask_sum is not None,
                "seconds": progress.seconds}
        return self.run.maybe_save(progress.epochs_done, progress.arrays(), meta)

    def start(self, initial: Progress, resume: bool) -> Progress | None:
        """The progress to continue from: the newest checkpoint if ``resume`` (``None`` if there
        is none: a fresh start), else ``None`` after checking that the workdir holds none.

        Raises:
          ValueError: checkpoints exist and ``resume`` is False, or the newest checkpoint was
            written with another config (the differing fields are named) or other inputs (key,
            clean images, model variables), or does not fit.
        """
        def target(meta):
            return {"awm": initial.state,
                    "best_mask": initial.state.mask if meta["has_best_mask"] else None,
                    "mask_sum": initial.state.mask if meta["has_mask_sum"] else None}

        restored = self.run.start(None, resume, target_for_meta=target)
        if restored is None:
            return None
        arrays, meta = restored
        best_score = meta["best_score"]
        return Progress(state=arrays["awm"], history=list(meta["history"]),
                        epochs_done=meta["step"],
                        best_score=np.inf if best_score is None else float(best_score),
                        best_epoch=int(meta["best_epoch"]), best_mask=arrays["best_mask"],
                        mask_sum=arrays["mask_sum"],
                        # Checkpoints written before the field existed carry no time.
                        seconds=float(meta.get("seconds", 0.0)))

    def close(self) -> None:
        self.run.close()
