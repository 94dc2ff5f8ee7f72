"""A tiny model, clean set and sweep shared by the sweep tests and their 4-device subprocess.

Run as a script (``sweep_fixtures.py DATA_AXIS [MASK_SELECTION]``), it runs the sharded sweep on
every device present and prints the masks, history and selected epochs as JSON (the
4-fake-device test starts it with ``XLA_FLAGS`` set).
"""

import dataclasses
import json
import sys

import jax
import numpy as np

from awm_jax.data.dataset import Split
from awm_jax.defenses.awm import AWMConfig
from awm_jax.models import create_model, init_variables
from awm_jax.sweep.spec import SweepSpec

NUM_CLASSES = 3


def tiny_setup():
    model = create_model("small_cnn", NUM_CLASSES, features=(4, 6))
    variables = init_variables(model, jax.random.key(0), (8, 8, 1))
    images = np.asarray(jax.random.uniform(jax.random.key(1), (12, 8, 8, 1)))
    clean = Split(images, np.arange(12, dtype=np.int32) % NUM_CLASSES)
    config = AWMConfig(batch_size=4, inner_passes=1, tau=5.0, outer_epochs=2, gamma=1e-3)
    spec = SweepSpec(grid={"alpha": [0.8, 0.9], "tau": [2.0, 5.0]}, seeds=[0])
    return model, variables, clean, config, spec


def as_json(result) -> dict:
    return {"masks": [np.asarray(m).tolist() for m in jax.tree_util.tree_leaves(result.masks)],
            "history": {k: v.tolist() for k, v in result.history.items()},
            "selected_epoch": np.asarray(result.selected_epoch).tolist()}


def main(data_axis: int, selection: str = "last") -> None:
    from awm_jax.sweep.mesh import make_sweep_mesh, shard_members
    from awm_jax.sweep.runner import run_sweep

    model, variables, clean, config, spec = tiny_setup()
    config = dataclasses.replace(config, mask_selection=selection)
    mesh = make_sweep_mesh(data=data_axis)
    hparams, _ = spec.stack(config)
    placed = shard_members(hparams, mesh)  # how run_sweep places each chunk
    result = run_sweep(model, variables, clean, config, spec, mesh=mesh, progress=False)
    print(json.dumps({"devices": jax.device_count(), "mesh": dict(mesh.shape),
                      "member_sharding": str(placed.alpha.sharding.spec), **as_json(result)}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1, *sys.argv[2:3])
