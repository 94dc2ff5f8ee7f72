"""Sweeps over many hosts: ``jax.distributed.initialize`` from flags or the environment.

JAX runs one Python process per host (or per GPU); every process runs the same program. After
:func:`initialize`, ``jax.devices()`` lists the devices of all processes (ordered by process),
so :func:`awm_jax.sweep.mesh.make_sweep_mesh` builds one global ``("sweep", "data")`` mesh whose
``"sweep"`` axis spans the processes. Every process builds the same inputs from the same seeds
(the model checkpoint, the clean draw, the stacked hparams and keys); :func:`~awm_jax.sweep.mesh.
put` turns them into global arrays, each process handing over only its own devices' slices; the
steps run as one SPMD program; :func:`~awm_jax.sweep.mesh.to_host` gathers the results, so every
process gets the whole :class:`~awm_jax.sweep.runner.SweepResult`, and only process 0 writes the
table (:func:`awm_jax.sweep.job.sweep_model`). Members need no communication, so the only
cross-host traffic is the final gather. On CPU, JAX's cross-process collectives use gloo
(``jax_cpu_collectives_implementation``), which :func:`initialize` selects.

Where the settings come from, first found wins: the arguments (``awm-jax sweep --coordinator
HOST:PORT --num-processes N --process-id I``), then the environment variables
``JAX_COORDINATOR_ADDRESS`` (read by JAX itself), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``,
then JAX's cluster auto-detection (Cloud TPU pod slices, SLURM, Open MPI), which ``auto=True``
(``awm-jax sweep --distributed``) asks for. With none of these, or with one process, nothing is
initialised and the sweep runs on the local devices.

A Cloud TPU pod slice (every worker runs the same command; JAX finds the slice's topology)::

    gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b --worker=all --command="
      cd awm-jax && .venv/bin/awm-jax sweep --distributed --checkpoint gs-fuse/runs/bd \\
        --grid alpha=0.5,0.8,0.9 --grid tau=50,100 --seeds 0 1 2 3 --one-shot --out runs/sweep"

A SLURM job with 2 nodes x 4 GPUs, one process per GPU (JAX reads ``SLURM_*`` for the
coordinator, the process count and the process id)::

    #!/bin/bash
    #SBATCH --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=8
    srun .venv/bin/awm-jax sweep --distributed --checkpoint runs/bd \\
      --grid alpha=0.5,0.8,0.9 --grid tau=50,100 --seeds 0 1 2 3 --one-shot --out runs/sweep

Or by hand, with explicit settings (here two processes on one machine, as the tests do)::

    awm-jax sweep --coordinator localhost:12355 --num-processes 2 --process-id 0 ... &
    awm-jax sweep --coordinator localhost:12355 --num-processes 2 --process-id 1 ...

``out`` needs to be visible to process 0 only. Checkpointing (``--workdir``) is not supported
across processes yet: the restore target of :class:`~awm_jax.run_checkpoint.RunCheckpointer`
lives on the first device, which other processes cannot address.
"""

from __future__ import annotations

import os

import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"the environment variable {name}={raw!r} must be an integer.") from None


def settings_from_env(coordinator: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None) -> dict:
    """The arguments, each falling back to its environment variable when ``None``.

    Raises:
      ValueError: a non-integer environment value, ``num_processes`` < 1, or ``process_id``
        outside ``[0, num_processes)``.
    """
    settings = {"coordinator_address": coordinator or os.environ.get(ENV_COORDINATOR) or None,
                "num_processes": (num_processes if num_processes is not None
                                  else _env_int(ENV_NUM_PROCESSES)),
                "process_id": process_id if process_id is not None else _env_int(ENV_PROCESS_ID)}
    count, index = settings["num_processes"], settings["process_id"]
    if count is not None and count < 1:
        raise ValueError(f"num_processes must be >= 1; got {count}.")
    if count is not None and index is not None and not 0 <= index < count:
        raise ValueError(f"process_id must be in [0, num_processes={count}); got {index}.")
    return settings


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               initialization_timeout: int = 300) -> bool:
    """Calls ``jax.distributed.initialize`` when this run spans several processes.

    Must run before anything else touches JAX's devices. A no-op (returning False) with one
    process, or when no setting is given anywhere and ``auto`` is False.

    Args:
      coordinator: ``HOST:PORT`` of process 0's coordinator service (env
        ``JAX_COORDINATOR_ADDRESS``).
      num_processes: processes in the run (env ``JAX_NUM_PROCESSES``).
      process_id: this process's index in ``[0, num_processes)`` (env ``JAX_PROCESS_ID``).
      auto: initialise even without settings, letting JAX detect the cluster (TPU pod slice,
        SLURM, Open MPI); unset settings are always left to that detection.
      initialization_timeout: seconds to wait for the other processes.

    Returns:
      Whether ``jax.distributed.initialize`` was called.

    Raises:
      ValueError: see :func:`settings_from_env`.
      RuntimeError: JAX's backend was already initialised (from ``jax.distributed``).
    """
    settings = settings_from_env(coordinator, num_processes, process_id)
    if settings["num_processes"] == 1:
        return False
    if not auto and all(value is None for value in settings.values()):
        return False
    if jax.distributed.is_initialized():
        return True
    # Only consulted on CPU; gloo is what multi-process CPU runs need for their collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**settings, initialization_timeout=initialization_timeout)
    return True


def is_main_process() -> bool:
    """Whether this process writes outputs (process 0, or the only process)."""
    return jax.process_index() == 0
