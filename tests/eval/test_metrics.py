"""Metrics against hand-computed values: ASR excludes target-class images, ASR_all does not."""

import numpy as np

from awm_jax.attacks.base import TriggeredTestSet
from awm_jax.eval.metrics import backdoor_metrics, predict_in_batches


def test_asr_excludes_target_class_and_asr_all_includes_it():
    true = np.array([0, 0, 1, 1, 2, 2])
    test = TriggeredTestSet(np.zeros((6, 2, 2, 1)), true, np.full(6, 0), true != 0)
    clean_pred = np.array([0, 1, 1, 1, 2, 0])
    triggered_pred = np.array([0, 0, 0, 1, 0, 2])
    metrics = backdoor_metrics(clean_pred, true, triggered_pred, test)
    assert metrics["acc"] == 4 / 6
    assert metrics["asr"] == 2 / 4  # of the four non-target images, two went to the target
    assert metrics["asr_all"] == 4 / 6  # target-class images count as successes here
    assert metrics["ra"] == 2 / 4  # triggered non-target images still classified correctly


def test_predict_in_batches_pads_the_last_batch_and_keeps_order():
    calls = []

    def predict(images):
        calls.append(images.shape[0])
        return images[:, 0, 0, 0].astype(np.int32)

    images = np.arange(7, dtype=np.float32).reshape(7, 1, 1, 1)
    np.testing.assert_array_equal(predict_in_batches(predict, images, 3), np.arange(7))
    assert calls == [3, 3, 3]  # one shape, so one compilation
