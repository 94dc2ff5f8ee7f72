"""Runs a checkpointing child process and kills it with SIGKILL once it has saved enough."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def finished_steps(workdir: Path) -> list[int]:
    """Finished checkpoints: orbax renames a step's directory to its number when complete."""
    if not workdir.is_dir():
        return []
    return sorted(int(name) for name in os.listdir(workdir) if name.isdigit())


def kill_after_checkpoint(script: Path, workdir: Path, step: int, env: dict | None = None,
                          timeout: float = 180) -> None:
    """Runs ``python script workdir`` and SIGKILLs it once checkpoint ``>= step`` exists.

    Fails the test if the child exits on its own or writes no such checkpoint in ``timeout``.
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    process = subprocess.Popen([sys.executable, str(script), str(workdir)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not (finished_steps(workdir) and finished_steps(workdir)[-1] >= step):
            if process.poll() is not None:
                pytest.fail(f"child exited early ({process.returncode}): "
                            f"{process.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"child wrote no checkpoint >= {step} within {timeout} s")
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, "the child finished before it was killed"
