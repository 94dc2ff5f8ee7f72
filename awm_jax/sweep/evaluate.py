"""Backdoor metrics of every sweep member, with the prediction vmapped over the members.

The predict function maps ``(members[M], images[B]) -> int32[M, B]``: ``vmap`` over the
members' outputs (AWM: masks; a baseline: its adapter's output, e.g. FT's variables or ANP's
masks and threshold), the images shared, the evaluation set fed in fixed-size batches (the last
padded, so one compile). The metrics themselves are
:func:`awm_jax.eval.metrics.backdoor_metrics` per member.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from awm_jax.attacks.base import TriggeredTestSet
from awm_jax.data.dataset import Split
from awm_jax.defenses.awm.mask import apply_mask
from awm_jax.defenses.base import build_once
from awm_jax.eval.metrics import backdoor_metrics
from awm_jax.models.base import apply_model
from awm_jax.types import Mask, Variables


def masked(variables: Variables, mask: Mask) -> Variables:
    """An AWM member's model: ``variables`` with ``mask`` applied to the params."""
    return {"params": apply_mask(variables["params"], mask),
            "batch_stats": variables["batch_stats"]}


def make_member_predict_fn(model, purified: Callable[[Variables, Any], Variables] = masked
                           ) -> Callable:
    """Jitted ``(variables, members, images) -> int32[M, B]`` argmax predictions (eval mode).

    ``purified(variables, member) -> variables`` builds one member's model from the backdoored
    ``variables`` and its output (default: an AWM mask, :func:`masked`).
    """

    def predict_one(variables, member, images):
        model_variables = purified(variables, member)
        return apply_model(model, model_variables["params"], model_variables["batch_stats"],
                           images)[0].argmax(-1)

    return jax.jit(jax.vmap(predict_one, in_axes=(None, 0, None)))


def _predict_all(predict, variables, masks, images: np.ndarray, batch_size: int) -> np.ndarray:
    count, outputs = len(images), []
    for start in range(0, count, batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - len(chunk) if count > batch_size else 0
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        outputs.append(np.asarray(predict(variables, masks, chunk))[:, :len(chunk) - pad])
    return np.concatenate(outputs, axis=1)


def evaluate_members(model, variables: Variables, masks: Any, clean: Split,
                     triggered: TriggeredTestSet, *, batch_size: int = 500,
                     member_chunk: int | None = None,
                     purified: Callable[[Variables, Any], Variables] = masked
                     ) -> list[dict[str, float]]:
    """``{"acc", "asr", "asr_all", "ra"}`` of every member on the evaluation split.

    Args:
      model, variables: the backdoored model (unmasked weights).
      masks: member masks, every leaf ``[M, ...]`` (e.g. :attr:`SweepResult.masks`), or with
        ``purified`` any per-member outputs (e.g. :attr:`BaselineSweepResult.outputs`).
      clean: clean evaluation images and labels.
      triggered: the same images triggered (:func:`awm_jax.attacks.triggered_test_set`).
      batch_size: images per batch.
      member_chunk: members per predict call (default: all at once).
      purified: ``(variables, member) -> variables`` of one member (default: AWM masks;
        a baseline passes its adapter's ``purified``).

    Returns:
      One metrics dict per member, in member order.
    """
    # One compile per model and purified function, reused by every seed group of a sweep.
    predict = build_once(make_member_predict_fn, model, purified)
    count = int(jax.tree_util.tree_leaves(masks)[0].shape[0])
    member_chunk = member_chunk or count
    results = []
    for first in range(0, count, member_chunk):
        chunk = jax.tree_util.tree_map(lambda m, first=first: m[first:first + member_chunk], masks)
        clean_pred = _predict_all(predict, variables, chunk, clean.images, batch_size)
        trig_pred = _predict_all(predict, variables, chunk, triggered.images, batch_size)
        results += [backdoor_metrics(c, clean.labels, t, triggered)
                    for c, t in zip(clean_pred, trig_pred)]
    return results
