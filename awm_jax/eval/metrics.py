"""Backdoor metrics: clean accuracy, attack success rate (two definitions) and robust accuracy.

* ``acc``: accuracy on clean test images.
* ``asr``: the project's ASR: the fraction of triggered test images *whose true class is not the
  target* that the model assigns to the target.
* ``asr_all``: the official AWM code's ASR: every test image is triggered, target-class images
  included, so it has a floor near the target class's share (~0.1 on CIFAR-10).
* ``ra``: robust accuracy: accuracy w.r.t. the true label on triggered non-target images.

All are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from awm_jax.attacks.base import TriggeredTestSet
from awm_jax.data.dataset import Split
from awm_jax.types import Array

PredictFn = Callable[[Array], Array]  # float32[B, H, W, C] -> int32[B] predicted classes


def predict_in_batches(predict: PredictFn, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Runs ``predict`` over ``images`` in fixed-size batches (the last one padded, so one compile)."""
    count = len(images)
    outputs = []
    for start in range(0, count, batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - len(chunk) if count > batch_size else 0
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        outputs.append(np.asarray(predict(chunk))[:len(chunk) - pad])
    return np.concatenate(outputs)


def backdoor_metrics(clean_predictions: np.ndarray, clean_labels: np.ndarray,
                     triggered_predictions: np.ndarray, test: TriggeredTestSet) -> dict[str, float]:
    """Computes acc, asr, asr_all and ra from predictions (numpy oracle-friendly)."""
    non_target = test.non_target
    hit = triggered_predictions == test.target_labels
    return {
        "acc": float(np.mean(clean_predictions == clean_labels)),
        "asr": float(np.mean(hit[non_target])) if non_target.any() else float("nan"),
        "asr_all": float(np.mean(hit)),
        "ra": float(np.mean(triggered_predictions[non_target] == test.true_labels[non_target]))
        if non_target.any() else float("nan"),
    }


def evaluate_backdoor(predict: PredictFn, clean: Split, triggered: TriggeredTestSet,
                      batch_size: int = 500) -> dict[str, float]:
    """Evaluates ``predict`` on clean images and on their triggered versions.

    Args:
      predict: jitted ``images -> predicted classes``.
      clean: the clean evaluation split.
      triggered: the same images triggered (from :func:`awm_jax.attacks.triggered_test_set`).
      batch_size: evaluation batch size.

    Returns:
      ``{"acc", "asr", "asr_all", "ra"}`` as floats in [0, 1].
    """
    clean_pred = predict_in_batches(predict, clean.images, batch_size)
    trig_pred = predict_in_batches(predict, triggered.images, batch_size)
    return backdoor_metrics(clean_pred, clean.labels, trig_pred, triggered)


def make_predict_fn(model) -> Callable:
    """Returns jitted ``(variables, images) -> int32[B]`` argmax predictions of ``model`` (eval mode)."""
    from awm_jax.models.base import apply_model

    @jax.jit
    def predict(variables, images):
        logits, _ = apply_model(model, variables["params"], variables["batch_stats"], images)
        return logits.argmax(-1)

    return predict
