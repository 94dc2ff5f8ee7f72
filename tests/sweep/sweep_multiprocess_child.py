"""One process of a multi-process sweep over loopback, for test_sweep_distributed.py.

``sweep_multiprocess_child.py PORT NUM_PROCESSES PROCESS_ID OUT_JSON`` initialises
``jax.distributed`` with a coordinator on ``localhost:PORT``, builds one global mesh over every
process's CPU devices (``XLA_FLAGS`` sets how many each has), runs the tiny sweep of
``sweep_fixtures`` and, on process 0 only, writes the result as JSON to OUT_JSON.
"""

import dataclasses
import json
import sys

from awm_jax.sweep import distributed

EPOCHS = 1


def main(port: str, num_processes: int, process_id: int, out: str) -> None:
    assert distributed.initialize(f"localhost:{port}", num_processes, process_id,
                                  initialization_timeout=120)
    import jax
    from sweep_fixtures import as_json, tiny_setup

    from awm_jax.sweep.mesh import make_sweep_mesh
    from awm_jax.sweep.runner import run_sweep

    model, variables, clean, config, spec = tiny_setup()
    config = dataclasses.replace(config, outer_epochs=EPOCHS)
    mesh = make_sweep_mesh()
    result = run_sweep(model, variables, clean, config, spec, mesh=mesh, chunk_size=2,
                       progress=False)
    if distributed.is_main_process():
        with open(out, "w") as handle:
            json.dump({"processes": jax.process_count(), "devices": jax.device_count(),
                       "local_devices": jax.local_device_count(), "mesh": dict(mesh.shape),
                       "mesh_processes": sorted({d.process_index for d in mesh.devices.flat}),
                       "chunk_size": result.chunk_size, **as_json(result)}, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
