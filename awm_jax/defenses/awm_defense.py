"""AWM registered under the common defense interface."""

from __future__ import annotations

from awm_jax.defenses.awm.config import AWMConfig
from awm_jax.defenses.awm.runner import run_awm
from awm_jax.defenses.base import DEFENSES, Defense, DefenseResult


def _purify(model, variables, clean, key, config: AWMConfig, *, num_classes=None,
            on_epoch=None, progress=True, workdir=None, checkpoint_every=1, max_to_keep=2,
            resume=False) -> DefenseResult:
    """:func:`run_awm`; ``workdir``/``checkpoint_every``/``max_to_keep``/``resume`` checkpoint
    and resume it (steps: epochs)."""
    result = run_awm(model, variables, clean, config, key, num_classes=num_classes,
                     on_epoch=on_epoch, progress=progress, workdir=workdir,
                     checkpoint_every=checkpoint_every, max_to_keep=max_to_keep,
                     resume=resume)
    return DefenseResult(result.variables, result.history, result.seconds,
                         {"mask": result.mask_stats, "selected_epoch": result.selected_epoch,
                          "compile_seconds": result.compile_seconds})


@DEFENSES.register("awm")
def awm() -> Defense:
    return Defense("awm", AWMConfig, _purify)
