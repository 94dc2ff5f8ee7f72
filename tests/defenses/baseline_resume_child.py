"""A tiny fine-tuning (FT) run for tests/defenses/test_baseline_resume.py, importable and runnable.

``python tests/defenses/baseline_resume_child.py WORKDIR`` runs :func:`run` with checkpoints in
WORKDIR after every epoch; the environment variable ``BASELINE_TEST_EPOCH_SLEEP`` (seconds)
makes every epoch that much slower (in the ``on_epoch`` callback, not in library code) so that
the test can kill the run between two checkpoints.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
from awm_resume_child import setup

from awm_jax.defenses import purify
from awm_jax.defenses.finetune import FTConfig

CONFIG = FTConfig(epochs=6, batch_size=4)


def run(config=CONFIG, seed=2, **kwargs):
    model, variables, clean = setup()
    return purify("ft", model, variables, clean, jax.random.key(seed), config,
                  progress=False, **kwargs)


def _slow_epoch(epoch, variables):
    del epoch, variables
    time.sleep(float(os.environ.get("BASELINE_TEST_EPOCH_SLEEP", "0")))
    return {}


if __name__ == "__main__":
    run(workdir=sys.argv[1], checkpoint_every=1, max_to_keep=2, on_epoch=_slow_epoch)
    print("finished")
