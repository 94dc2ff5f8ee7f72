"""Saving and resuming AWM runs: one orbax ``CheckpointManager`` over the run's whole progress.

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
import json
import math
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from awm_jax.checkpoint import variables_digest
from awm_jax.defenses.awm.config import AWMConfig
from awm_jax.defenses.awm.step import AWMState
from awm_jax.serialization import json_default, library_versions
from awm_jax.types import Mask, PRNGKey, Variables

FORMAT_VERSION = 1


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
    """

    state: AWMState
    history: list[dict]
    epochs_done: int
    best_score: float
    best_epoch: int
    best_mask: Mask | None = None
    mask_sum: Mask | None = None

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


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=json_default))


def _abstract(tree: Any) -> Any:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        jax.eval_shape(lambda: tree))


class AWMCheckpointer:
    """Saves and restores :class:`Progress` in ``workdir`` with an orbax ``CheckpointManager``.

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
        for name, value in (("checkpoint_every", checkpoint_every),
                            ("max_to_keep", max_to_keep)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1; got {value}.")
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.config = _as_json(config.to_dict())
        self.fingerprint = _as_json(fingerprint)
        self.checkpoint_every = int(checkpoint_every)
        self.outer_epochs = int(config.outer_epochs)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(max_to_keep), save_interval_steps=self.checkpoint_every,
            enable_async_checkpointing=False, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.workdir, options=options)

    def latest_path(self) -> str | None:
        """The directory of the newest complete checkpoint, or ``None``."""
        step = self.manager.latest_step()
        return None if step is None else os.path.join(self.workdir, str(step))

    def maybe_save(self, progress: Progress) -> bool:
        """Saves ``progress`` if its epoch count is due (every ``checkpoint_every``, or last)."""
        step = progress.epochs_done
        if step % self.checkpoint_every and step != self.outer_epochs:
            return False
        meta = {"format_version": FORMAT_VERSION, "config": self.config,
                "fingerprint": self.fingerprint, "epochs_done": step,
                "history": _as_json(progress.history),  # callbacks may return numpy scalars
                "best_score": (None if math.isinf(progress.best_score)
                               else progress.best_score),
                "best_epoch": progress.best_epoch,
                "has_best_mask": progress.best_mask is not None,
                "has_mask_sum": progress.mask_sum is not None,
                "versions": library_versions()}
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(progress.arrays()), meta=ocp.args.JsonSave(meta)),
            force=True)
        self.manager.wait_until_finished()
        return bool(saved)

    def start(self, initial: Progress, resume: bool) -> Progress | None:
        """The progress to continue from: the newest checkpoint if ``resume`` (``None`` if there
        is none: a fresh start), else ``None`` after checking that the workdir holds none.

        Raises:
          ValueError: checkpoints exist and ``resume`` is False, or see :meth:`restore_latest`.
        """
        if resume:
            return self.restore_latest(initial)
        steps = self.manager.all_steps()
        if steps:
            raise ValueError(f"{self.workdir} already holds AWM checkpoints (epochs "
                             f"{sorted(steps)}); pass resume=True (--resume) to continue that "
                             "run, or use another workdir.")
        return None

    def restore_latest(self, initial: Progress) -> Progress | None:
        """The newest checkpoint restored into ``initial``'s shapes, or ``None`` if there is none.

        Raises:
          ValueError: the checkpoint was written with another config (the differing fields are
            named) or other inputs (key, clean images, model variables), or does not fit.
        """
        step = self.manager.latest_step()
        if step is None:
            return None
        path = os.path.join(self.workdir, str(step))
        meta = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        self._check_compatible(meta, path)
        target = {"awm": initial.state,
                  "best_mask": initial.state.mask if meta["has_best_mask"] else None,
                  "mask_sum": initial.state.mask if meta["has_mask_sum"] else None}
        try:
            arrays = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(target))))["state"]
        except Exception as err:  # orbax/tensorstore raise many types; report them in one place.
            raise ValueError(f"cannot restore the AWM checkpoint {path}: {err}") from err
        best_score = meta["best_score"]
        return Progress(state=arrays["awm"], history=list(meta["history"]),
                        epochs_done=int(meta["epochs_done"]),
                        best_score=np.inf if best_score is None else float(best_score),
                        best_epoch=int(meta["best_epoch"]), best_mask=arrays["best_mask"],
                        mask_sum=arrays["mask_sum"])

    def _check_compatible(self, meta: dict, path: str) -> None:
        stored = meta.get("config", {})
        fields = sorted(k for k in set(stored) | set(self.config)
                        if stored.get(k) != self.config.get(k))
        if fields:
            detail = ", ".join(f"{k}: checkpoint {stored.get(k)!r}, requested "
                               f"{self.config.get(k)!r}" for k in fields)
            raise ValueError(f"the AWM checkpoint {path} was written with a different config "
                             f"({detail}); resume with the same config or use another workdir.")
        stored = meta.get("fingerprint", {})
        inputs = sorted(k for k in set(stored) | set(self.fingerprint)
                        if stored.get(k) != self.fingerprint.get(k))
        if inputs:
            raise ValueError(f"the AWM checkpoint {path} was written for different inputs "
                             f"(differing: {', '.join(inputs)}); resume with the same key, clean "
                             "images and model, or use another workdir.")

    def close(self) -> None:
        self.manager.close()
