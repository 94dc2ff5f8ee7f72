"""Stopping a defense whose loss became NaN or infinite, naming the last good checkpoint.

Every defense's host loop calls :func:`raise_if_diverged` on an epoch's (round's, block's,
pass's) record once it is complete and before that epoch's checkpoint is written, so a run that
diverges leaves the checkpoint of its last epoch with finite metrics as the newest one. (A
resume with the same config would diverge again, since runs are deterministic, so the message
suggests what to lower for a new run instead of ``resume=True``.) (An epoch's metrics are measured before each of its updates,
so the last update of the last good epoch is kept unmeasured, as in training.) The steps
themselves only report non-finite values as metrics (inside jit nothing can raise).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np


class HasLatestPath(Protocol):
    def latest_path(self) -> str | None: ...


def raise_if_diverged(record: Mapping[str, Any], *, what: str, epoch: int,
                      total: int | None = None, unit: str = "epoch",
                      metrics: Iterable[str] = ("loss",),
                      lower: Mapping[str, Any] | Sequence[str] = (),
                      checkpointer: HasLatestPath | None = None,
                      entry: str = "classes") -> None:
    """Raises FloatingPointError if a metric of ``record`` named in ``metrics`` is NaN or Inf.

    Args:
      record: the epoch's metrics; a value is a number or a 1-D array (one entry per class, say),
        whose non-finite entries are named by index (the first ten).
      what: the run as the user knows it ("FT", "NAD teacher", "NC trigger search").
      epoch: the 1-based epoch (round, block, pass) the record belongs to.
      total: the epochs in all, shown as ``epoch/total``; ``None`` shows the epoch alone.
      unit: what ``epoch`` counts ("epoch", "round", "block", "pass").
      metrics: the names to check (the optimisation losses); names absent from ``record`` are
        skipped, so evaluation metrics never stop a run.
      lower: the hyperparameters to suggest lowering: names, or names and their values.
      checkpointer: the run's checkpointer (``latest_path() -> str | None``), or ``None``
        without a workdir.
      entry: what the entries of an array metric are, for the message.

    Raises:
      FloatingPointError: a checked metric is NaN or infinite; the message names the run, the
        epoch, every non-finite metric and its value, the newest checkpoint (kept) or that none
        was written, and what to lower.
    """
    bad = [_describe(name, record[name], entry) for name in sorted(set(metrics) & set(record))]
    bad = [text for text in bad if text]
    if not bad:
        return
    latest = checkpointer.latest_path() if checkpointer is not None else None
    where = (f"the last good checkpoint is {latest} (kept)"
             if latest else "no checkpoint was written before it" +
             ("" if checkpointer is not None else " (workdir not set)"))
    at = f"{unit} {epoch}" if total is None else f"{unit} {epoch}/{total}"
    raise FloatingPointError(
        f"{what} diverged in {at}: non-finite {', '.join(bad)}; {where}.{_advice(lower)}")


def _describe(name: str, value: Any, entry: str) -> str | None:
    """``"name=value"`` for a non-finite number, ``"name=[...] (entry i, j)"`` for an array
    with non-finite entries, ``None`` when all is finite."""
    values = np.asarray(value, dtype=np.float64)
    if values.ndim == 0:
        return None if math.isfinite(float(values)) else f"{name}={float(values)}"
    where = np.flatnonzero(~np.isfinite(values))
    if where.size == 0:
        return None
    shown = where[:_SHOWN]
    more = f", ... ({where.size} of {values.size})" if where.size > _SHOWN else ""
    return (f"{name}={[float(v) for v in values[shown]]} "
            f"({entry} {', '.join(str(int(i)) for i in shown)}{more})")


_SHOWN = 10  # non-finite entries of an array metric named in the message


def _advice(lower: Mapping[str, Any] | Sequence[str]) -> str:
    names = ([f"{name} (now {value})" for name, value in lower.items()]
             if isinstance(lower, Mapping) else list(lower))
    if not names:
        return ""
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f" Lower {listed}."
