"""A tiny checkpointed sweep for test_sweep_resume.py, importable and runnable as a script.

4 members in chunks of 2 (so the chunk cursor moves), 3 epochs, per-member
``"min_robust_loss"`` selection: 6 steps (epochs over all chunks). ``python
sweep_resume_child.py WORKDIR`` runs it with a checkpoint after every epoch; the environment
variable ``SWEEP_TEST_EPOCH_SLEEP`` (seconds) makes every epoch that much slower (by wrapping
the runner's epoch function here, not in library code) so that the test can kill the sweep
between two checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from sweep_fixtures import tiny_setup

from awm_jax.sweep import runner

MODEL, VARIABLES, CLEAN, BASE, SPEC = tiny_setup()
CONFIG = dataclasses.replace(BASE, outer_epochs=3, mask_selection="min_robust_loss")
CHUNK_SIZE = 2
TOTAL_STEPS = 2 * CONFIG.outer_epochs


def run(config=CONFIG, chunk_size=CHUNK_SIZE, **kwargs):
    return runner.run_sweep(MODEL, VARIABLES, CLEAN, config, SPEC, chunk_size=chunk_size,
                            progress=False, **kwargs)


def _slowed(run_epoch):
    def slow_epoch(*args):
        time.sleep(float(os.environ.get("SWEEP_TEST_EPOCH_SLEEP", "0")))
        return run_epoch(*args)
    return slow_epoch


if __name__ == "__main__":
    runner.run_epoch = _slowed(runner.run_epoch)
    run(workdir=sys.argv[1], checkpoint_every=1, max_to_keep=2)
    print("finished")
