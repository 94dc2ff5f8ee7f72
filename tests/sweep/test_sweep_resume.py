"""Sweep checkpoints: an interrupted or SIGKILLed sweep resumes bit-identically, chunk cursor
included; a finished sweep reloads; a changed setup is refused."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from awm_jax.sweep import runner
from tests.kill_and_resume import finished_steps, kill_after_checkpoint

_CHILD = Path(__file__).with_name("sweep_resume_child.py")
_spec = importlib.util.spec_from_file_location("sweep_resume_child", _CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)


class _Interrupt(Exception):
    """Stands in for a kill in the in-process tests."""


@pytest.fixture(scope="module")
def uninterrupted():
    return child.run()


def _assert_same_sweep(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a.masks), jax.tree_util.tree_leaves(b.masks)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        assert x.shape[0] == 4 and np.array_equal(x, y)  # exact, every member
    assert sorted(a.history) == sorted(b.history)
    for name in a.history:
        assert a.history[name].shape == b.history[name].shape
        assert np.array_equal(a.history[name], b.history[name]), name
    assert np.array_equal(a.selected_epoch, b.selected_epoch)


@pytest.mark.parametrize("every,stop_at,saved", [
    (2, 5, [2, 4]),  # resumes inside chunk 2, chunk 1's results from the checkpoint
    (3, 5, [3]),     # resumes at the chunk boundary: chunk 2 not started
])
def test_interrupted_sweep_resumes_bit_identically(tmp_path, monkeypatch, uninterrupted,
                                                    every, stop_at, saved):
    assert "selection_score" in uninterrupted.history
    calls = []
    run_epoch = runner.run_epoch

    def interrupting(*args):
        calls.append(1)
        if len(calls) == stop_at:
            raise _Interrupt
        return run_epoch(*args)

    monkeypatch.setattr(runner, "run_epoch", interrupting)
    with pytest.raises(_Interrupt):
        child.run(workdir=tmp_path, checkpoint_every=every)
    monkeypatch.undo()
    assert finished_steps(tmp_path) == saved
    resumed = child.run(workdir=tmp_path, checkpoint_every=every, resume=True)
    _assert_same_sweep(resumed, uninterrupted)
    assert finished_steps(tmp_path)[-1] == child.TOTAL_STEPS
    # A finished sweep resumes to its saved results without running an epoch.
    monkeypatch.setattr(runner, "run_epoch", None)
    _assert_same_sweep(child.run(workdir=tmp_path, checkpoint_every=every, resume=True),
                       uninterrupted)


def test_sweep_killed_with_sigkill_resumes_bit_identically(tmp_path, uninterrupted):
    workdir = tmp_path / "sweep"
    kill_after_checkpoint(_CHILD, workdir, 2, env={"SWEEP_TEST_EPOCH_SLEEP": "0.5"})
    done = finished_steps(workdir)
    assert 2 <= done[-1] < child.TOTAL_STEPS and len(done) <= 2  # max_to_keep=2
    _assert_same_sweep(child.run(workdir=workdir, resume=True), uninterrupted)
    assert finished_steps(workdir)[-1] == child.TOTAL_STEPS


def test_resume_refuses_another_chunk_size_and_needs_resume(tmp_path, monkeypatch):
    calls = []
    run_epoch = runner.run_epoch

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 2:
            raise _Interrupt
        return run_epoch(*args)

    monkeypatch.setattr(runner, "run_epoch", interrupting)
    with pytest.raises(_Interrupt):
        child.run(workdir=tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"different config \(chunk_size: checkpoint 2, "
                                         r"requested 4\)"):
        child.run(chunk_size=4, workdir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"already holds AWM sweep checkpoints"):
        child.run(workdir=tmp_path)
    with pytest.raises(ValueError, match="needs a workdir"):
        child.run(resume=True)
