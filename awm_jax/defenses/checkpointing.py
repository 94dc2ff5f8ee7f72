"""Checkpoints of a baseline defense in progress (FT, FP, NAD, ANP, NC, I-BAU, ablation).

Every defense saves its whole state at a step boundary through one
:class:`~awm_jax.run_checkpoint.RunCheckpointer` in ``workdir``: ``state/`` holds the arrays
(parameters, batch statistics, optimiser state, masks, triggers or perturbations, counters),
``meta/`` the history so far, the phase the run is in, the elapsed seconds and the config plus a
fingerprint of the inputs (the key, a digest of the clean images and one of the model
variables, :func:`awm_jax.defenses.awm.checkpointing.fingerprint`). A checkpoint written with
another config or other inputs is refused with the differing fields named.

What a step is (the unit of ``checkpoint_every``) is the defense's own:

============  ===================================================================
``ft``        one epoch
``fp``        step 1 = the pruning decision, step ``1 + e`` = fine-tuning epoch e
``nad``       teacher epochs ``1..T``, then student epochs ``T + 1..T + E``
``anp``       a block of ``max(1, N // batch)`` iterations (one history record)
``nc``        trigger-search passes ``1..P``, then unlearning epochs ``P + e``
``ibau``      one round
``ablation``  one epoch (``steps_per_epoch`` mask steps, with the trigger phase)
============  ===================================================================

The end of a phase is always saved, whatever ``checkpoint_every`` says. Each defense derives its
step keys with ``fold_in`` from these counters, so a run killed at any moment and resumed ends
bit-identical to an uninterrupted one (on the same device type).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.defenses.awm.checkpointing import fingerprint
from awm_jax.run_checkpoint import RunCheckpointer
from awm_jax.types import PRNGKey, Variables


class DefenseCheckpointer:
    """A defense run's :class:`RunCheckpointer` (or none: then nothing is saved or restored),
    plus its wall-clock bookkeeping. A context manager that closes the checkpointer.

    Use :func:`open_checkpointer`.

    Attributes:
      run: the underlying :class:`RunCheckpointer`, or ``None`` without a workdir.
      resume: whether :meth:`restore` continues from the newest checkpoint.
      seconds_before: wall seconds the restored run had spent before it was interrupted.
    """

    def __init__(self, run: RunCheckpointer | None, resume: bool = False):
        self.run, self.resume, self.seconds_before = run, resume, 0.0
        self._start = time.perf_counter()

    def __enter__(self) -> DefenseCheckpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def restore(self, target: Any = None,
                target_for_meta: Callable[[dict], Any] | None = None
                ) -> tuple[Any, dict[str, Any]]:
        """``(arrays, meta)`` to continue from, or ``(None, {"step": 0})`` for a fresh start.

        ``meta`` holds ``"step"`` and the bookkeeping given to :meth:`save`. Without ``resume``
        a workdir that already holds checkpoints is an error (see :meth:`RunCheckpointer.start`,
        which also names the differing config fields or inputs of a refused checkpoint).

        Args:
          target: a pytree shaped like the saved arrays.
          target_for_meta: ``meta -> target`` for runs whose saved structure depends on their
            phase; overrides ``target``.
        """
        restored = (None if self.run is None else
                    self.run.start(target, self.resume, target_for_meta=target_for_meta))
        if restored is None:
            return None, {"step": 0}
        arrays, meta = restored
        self.seconds_before = float(meta.get("seconds", 0.0))
        # Uncommitted arrays like a fresh state's, so the jitted steps do not compile again.
        return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x)), arrays), meta

    def save(self, step: int, arrays: Any, meta: dict[str, Any], *,
             force: bool = False) -> bool:
        """Saves if ``step`` is due (or ``force``: a phase's end); ``meta`` gets the seconds."""
        if self.run is None:
            return False
        seconds = self.seconds_before + time.perf_counter() - self._start
        return self.run.maybe_save(step, arrays, {**meta, "seconds": seconds}, force=force)

    def close(self) -> None:
        if self.run is not None:
            self.run.close()


def open_checkpointer(workdir: str | os.PathLike | None, *, kind: str, unit: str, config,
                      key: PRNGKey, data: dict, variables: Variables, total_steps: int,
                      checkpoint_every: int = 1, max_to_keep: int = 2,
                      resume: bool = False) -> DefenseCheckpointer:
    """The checkpointer of a defense run (one that does nothing without ``workdir``).

    Args:
      workdir: the run's checkpoint directory, or ``None`` for no checkpoints.
      kind: the defense's registry name (a checkpoint of another defense is refused).
      unit: what a step counts, for messages (see the module docstring).
      config: the defense's config (``to_dict()`` is stored and compared).
      key, data, variables: the run's key, validated clean batch and input model (their
        fingerprint is stored and compared).
      total_steps: the run's last step (always saved).
      checkpoint_every: save after every this many steps.
      max_to_keep: checkpoints kept.
      resume: continue from the newest checkpoint (a fresh start when there is none).

    Raises:
      ValueError: ``resume`` without ``workdir``, or a bad ``checkpoint_every``/``max_to_keep``.
    """
    if workdir is None:
        if resume:
            raise ValueError("resume=True needs a workdir to resume from; got workdir=None.")
        return DefenseCheckpointer(None)
    run = RunCheckpointer(workdir, kind=kind, unit=unit, config=config.to_dict(),
                          fingerprint=fingerprint(key, data, variables),
                          total_steps=max(1, int(total_steps)),
                          checkpoint_every=checkpoint_every, max_to_keep=max_to_keep)
    return DefenseCheckpointer(run, resume)
