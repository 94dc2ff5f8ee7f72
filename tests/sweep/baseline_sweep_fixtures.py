"""A tiny model, clean set, FT/ANP configs and specs for the baseline sweep tests.

Run as a script (``baseline_sweep_fixtures.py DEFENSE...``), it runs those sweeps on a mesh over
every device present and prints their outputs and histories as JSON (the 4-fake-device test
starts it with ``XLA_FLAGS`` set).
"""

import json
import sys

import jax
import numpy as np

from awm_jax.data.dataset import Split
from awm_jax.defenses.anp import ANPConfig
from awm_jax.defenses.finetune import FTConfig
from awm_jax.models import create_model, init_variables
from awm_jax.sweep.spec import SweepSpec

NUM_CLASSES = 3

# 12 images, batch 4: FT 2 epochs x 3 batches; ANP 5 iterations in blocks of 3 (the last short).
CONFIGS = {"ft": FTConfig(epochs=2, batch_size=4),
           "anp": ANPConfig(iterations=5, batch_size=4, threshold=0.5)}
SPECS = {"ft": SweepSpec(zip={"learning_rate": [0.01, 0.1], "momentum": [0.0, 0.9],
                              "weight_decay": [0.0, 1e-2]}, seeds=[0, 1], defense="ft"),
         "anp": SweepSpec(zip={"eps": [0.2, 0.4], "mask_lr": [0.1, 0.3], "threshold": [0.75, 0.85],
                               "alpha": [0.2, 0.8]}, seeds=[0, 1], defense="anp")}


def tiny_setup():
    model = create_model("small_cnn", NUM_CLASSES, features=(4,))
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    images = np.asarray(jax.random.uniform(jax.random.key(1), (12, 8, 8, 1)))
    clean = Split(images, np.arange(12, dtype=np.int32) % NUM_CLASSES)
    return model, variables, clean


def as_json(result) -> dict:
    return {"outputs": [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(result.outputs)],
            "history": {k: v.tolist() for k, v in result.history.items()},
            "chunk_size": result.chunk_size}


def main(defenses) -> None:
    from awm_jax.sweep.baselines import run_baseline_sweep
    from awm_jax.sweep.mesh import make_sweep_mesh

    model, variables, clean = tiny_setup()
    mesh = make_sweep_mesh()
    payload = {"devices": jax.device_count(), "mesh": dict(mesh.shape)}
    for name in defenses:
        result = run_baseline_sweep(name, model, variables, clean, CONFIGS[name], SPECS[name],
                                    mesh=mesh, progress=False)
        payload[name] = as_json(result)
    print(json.dumps(payload))


if __name__ == "__main__":
    main(sys.argv[1:])
