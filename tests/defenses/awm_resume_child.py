"""A tiny AWM run for tests/defenses/test_awm_resume.py, importable and runnable as a script.

``python tests/defenses/awm_resume_child.py WORKDIR`` runs :func:`run` with checkpoints in
WORKDIR; the environment variable ``AWM_TEST_EPOCH_SLEEP`` (seconds) makes every epoch that much
slower (in the ``on_epoch`` callback, not in library code) so that the test can kill the run
between two checkpoints.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

from awm_jax.data.dataset import Split
from awm_jax.defenses.awm import AWMConfig, run_awm
from awm_jax.models import create_model, init_variables

NUM_CLASSES = 3
CONFIG = AWMConfig(batch_size=4, inner_passes=1, tau=5.0, outer_epochs=6)


def setup():
    """``(model, variables, clean)``: small_cnn (4, 6) on random 8x8 grey images."""
    model = create_model("small_cnn", NUM_CLASSES, features=(4, 6))
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    images = np.asarray(jax.random.uniform(jax.random.key(1), (12, 8, 8, 1)), np.float32)
    labels = np.arange(12, dtype=np.int32) % NUM_CLASSES
    return model, variables, Split(images, labels)


def run(config=CONFIG, seed=2, **kwargs):
    model, variables, clean = setup()
    return run_awm(model, variables, clean, config, jax.random.key(seed), progress=False,
                   **kwargs)


def _slow_epoch(epoch, variables):
    del epoch, variables
    time.sleep(float(os.environ.get("AWM_TEST_EPOCH_SLEEP", "0")))
    return {}


if __name__ == "__main__":
    run(workdir=sys.argv[1], checkpoint_every=1, max_to_keep=2, on_epoch=_slow_epoch)
    print("finished")
