"""Checkpoints of a run in progress (training, a defense, a sweep), for resuming after a kill.

One orbax ``CheckpointManager`` per workdir; each saved step is a directory
``<workdir>/<step>/`` with

* ``state/``: an orbax ``StandardSave`` of the run's array pytree (its whole state: parameters,
  optimiser state, masks, keys, counters; ``None`` leaves allowed);
* ``meta/``: JSON with the run's kind, config, a fingerprint of its inputs, the caller's
  bookkeeping (history, counters) and library versions.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoints intact; ``max_to_keep`` prunes the oldest. Arrays are
restored into the shapes of a freshly initialised state, so a checkpoint of another model is
rejected, and a checkpoint whose config or inputs differ is refused with the differing fields
named. A resumed run is bit-identical to an uninterrupted one as long as the caller derives
every step's randomness from the saved counters (e.g. ``fold_in(key, epoch)``), as the library's
loops do.

Example::

    checkpointer = RunCheckpointer(workdir, kind="train", config=config.to_dict(),
                                   fingerprint={"data": digest}, total_steps=epochs)
    restored = checkpointer.start(initial_state, resume=True)
    state, meta = restored if restored else (initial_state, {})
    for epoch in range(meta.get("step", 0), epochs):
        state = run_epoch(state, epoch)
        checkpointer.maybe_save(epoch + 1, state, {"history": history})
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from awm_jax.serialization import json_default, library_versions

FORMAT_VERSION = 1


def as_json(value: Any) -> Any:
    """``value`` after a JSON round trip: tuples become lists, numpy scalars become numbers."""
    return json.loads(json.dumps(value, default=json_default))


def abstract_tree(tree: Any) -> Any:
    """The ``jax.ShapeDtypeStruct`` tree of ``tree`` on the first local device (a restore target)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        jax.eval_shape(lambda: tree))


def _differing(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(stored) | set(requested) if stored.get(k) != requested.get(k))


class RunCheckpointer:
    """Saves and restores a run's state every ``checkpoint_every`` steps in ``workdir``.

    Args:
      workdir: the run's checkpoint directory (created if missing).
      kind: what the run is (``"train"``, ``"AWM"``, ...); a checkpoint of another kind is
        refused.
      unit: what a step counts (``"epochs"``), for messages.
      config: the run's configuration as a JSON-serialisable dict, compared on restore.
      fingerprint: JSON-serialisable facts about the inputs (data digests, keys), compared on
        restore.
      total_steps: the run's last step; it is always saved.
      checkpoint_every: save after every this many steps.
      max_to_keep: checkpoints kept; older ones are deleted after each save.

    Raises:
      ValueError: ``checkpoint_every``, ``max_to_keep`` or ``total_steps`` < 1.
    """

    def __init__(self, workdir: str | os.PathLike, *, kind: str, unit: str = "steps",
                 config: Mapping[str, Any],
                 fingerprint: Mapping[str, Any], total_steps: int, checkpoint_every: int = 1,
                 max_to_keep: int = 2):
        for name, value in (("checkpoint_every", checkpoint_every),
                            ("max_to_keep", max_to_keep), ("total_steps", total_steps)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.kind = kind
        self.unit = unit
        self.config = as_json(dict(config))
        self.fingerprint = as_json(dict(fingerprint))
        self.total_steps = int(total_steps)
        self.checkpoint_every = int(checkpoint_every)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(max_to_keep), save_interval_steps=self.checkpoint_every,
            enable_async_checkpointing=False, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.workdir, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        return self.manager.latest_step()

    def latest_path(self) -> str | None:
        """The directory of the newest complete checkpoint, or ``None``."""
        step = self.latest_step()
        return None if step is None else os.path.join(self.workdir, str(step))

    def due(self, step: int) -> bool:
        """Whether :meth:`maybe_save` would save at ``step``."""
        return step % self.checkpoint_every == 0 or step == self.total_steps

    def maybe_save(self, step: int, arrays: Any, meta: Mapping[str, Any], *,
                   force: bool = False) -> bool:
        """Saves ``arrays`` and ``meta`` as ``step`` if it is due (or ``force``, e.g. at the end
        of a run's phase); returns whether it saved.

        ``meta`` is the caller's JSON-serialisable bookkeeping; it comes back from
        :meth:`restore_latest` together with ``"step"``.
        """
        if not (force or self.due(step)):
            return False
        record = {"format_version": FORMAT_VERSION, "kind": self.kind, "config": self.config,
                  "fingerprint": self.fingerprint, "step": int(step), "user": as_json(dict(meta)),
                  "versions": library_versions()}
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(record)), force=True)
        self.manager.wait_until_finished()
        return bool(saved)

    def start(self, target: Any, resume: bool,
              target_for_meta=None) -> tuple[Any, dict[str, Any]] | None:
        """What to continue from: ``(arrays, meta)`` of the newest checkpoint if ``resume``
        (``None`` if there is none: a fresh start); without ``resume``, ``None`` after checking
        that the workdir holds no checkpoint.

        Args:
          target: a pytree shaped like the saved arrays (e.g. the freshly initialised state).
          resume: continue from the newest checkpoint.
          target_for_meta: optional ``meta -> target`` for runs whose saved structure depends on
            their bookkeeping (e.g. optional ``None`` leaves); overrides ``target``.

        Raises:
          ValueError: checkpoints exist and ``resume`` is False, or see :meth:`restore_latest`.
        """
        if resume:
            return self.restore_latest(target, target_for_meta)
        steps = self.manager.all_steps()
        if steps:
            raise ValueError(f"{self.workdir} already holds {self.kind} checkpoints ({self.unit} "
                             f"{sorted(steps)}); pass resume=True (--resume) to continue that "
                             "run, or use another directory.")
        return None

    def restore_latest(self, target: Any,
                       target_for_meta=None) -> tuple[Any, dict[str, Any]] | None:
        """The newest checkpoint as ``(arrays, meta)``, or ``None`` if there is none.

        ``meta`` is the dict given to :meth:`maybe_save` plus ``"step"``.

        Raises:
          ValueError: the checkpoint is unreadable, of another kind, was written with another
            config (the differing fields are named) or other inputs, or does not fit ``target``.
        """
        step = self.latest_step()
        if step is None:
            return None
        path = os.path.join(self.workdir, str(step))
        try:
            record = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # orbax raises many types for unreadable files.
            raise ValueError(f"cannot read the checkpoint metadata in {path}: {err}; delete "
                             "that step directory to fall back to an older one.") from err
        self._check_compatible(record, path)
        user = dict(record.get("user", {}))
        if target_for_meta is not None:
            target = target_for_meta(user)
        try:
            arrays = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_tree(target))))["state"]
        except Exception as err:  # orbax/tensorstore raise many types; report them in one place.
            raise ValueError(f"cannot restore the {self.kind} checkpoint {path}: {err}") from err
        user["step"] = int(record["step"])
        return arrays, user

    def _check_compatible(self, record: dict, path: str) -> None:
        kind = record.get("kind", self.kind)
        if kind != self.kind:
            raise ValueError(f"{path} is a {kind!r} checkpoint, not a {self.kind!r} one; use "
                             "another directory.")
        fields = _differing(record.get("config", {}), self.config)
        if fields:
            stored = record.get("config", {})
            detail = ", ".join(f"{k}: checkpoint {stored.get(k)!r}, requested "
                               f"{self.config.get(k)!r}" for k in fields)
            raise ValueError(f"the {self.kind} checkpoint {path} was written with a different "
                             f"config ({detail}); resume with the same config or use another "
                             "directory.")
        inputs = _differing(record.get("fingerprint", {}), self.fingerprint)
        if inputs:
            raise ValueError(f"the {self.kind} checkpoint {path} was written for different "
                             f"inputs (differing: {', '.join(inputs)}); resume with the same "
                             "inputs or use another directory.")

    def close(self) -> None:
        self.manager.close()
