"""Multi-process sweeps: settings from flags and the environment, and 2 processes over loopback
(one CPU device each, one global mesh) equal one process."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from sweep_fixtures import as_json, tiny_setup

from awm_jax.sweep import distributed
from awm_jax.sweep.runner import run_sweep

_CHILD = Path(__file__).with_name("sweep_multiprocess_child.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


def test_settings_come_from_arguments_then_environment(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert distributed.settings_from_env() == {"coordinator_address": None,
                                               "num_processes": None, "process_id": None}
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    assert distributed.settings_from_env(process_id=1) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 1}
    with pytest.raises(ValueError, match=r"process_id must be in \[0, num_processes=4\); got 4"):
        distributed.settings_from_env(process_id=4)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' must be an integer"):
        distributed.settings_from_env()


def test_one_process_or_no_settings_is_a_no_op(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    assert distributed.initialize("localhost:1", num_processes=1, process_id=0) is False
    assert not jax.distributed.is_initialized() and distributed.is_main_process()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_two_processes_over_loopback_equal_one_process(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), str(_CHILD.parent),
                                                      os.environ.get("PYTHONPATH")]))}
    port = _free_port()
    children = [subprocess.Popen([sys.executable, str(_CHILD), str(port), "2", str(index),
                                  str(out)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for index in range(2)]
    try:
        logs = [child.communicate(timeout=400) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    failed = [(c.returncode, err[-3000:]) for c, (_, err) in zip(children, logs) if c.returncode]
    if failed and any("UNIMPLEMENTED" in err or "collectives" in err.lower()
                      for _, err in failed):
        pytest.skip(f"this JAX cannot run multi-process computations on CPU: {failed}")
    assert not failed, failed
    payload = json.loads(out.read_text())
    assert payload["processes"] == 2 and payload["devices"] == 2
    assert payload["local_devices"] == 1 and payload["mesh_processes"] == [0, 1]
    assert payload["mesh"] == {"sweep": 2, "data": 1} and payload["chunk_size"] == 2

    model, variables, clean, config, spec = tiny_setup()
    config = dataclasses.replace(config, outer_epochs=1)
    expected = as_json(run_sweep(model, variables, clean, config, spec, chunk_size=2,
                                 progress=False))
    assert payload["selected_epoch"] == expected["selected_epoch"]
    for got, want in zip(payload["masks"], expected["masks"], strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    for name, values in expected["history"].items():
        np.testing.assert_allclose(payload["history"][name], values, rtol=1e-4, atol=1e-5)
