"""Training checkpoints: a run killed with SIGKILL resumes bit-identically; refusals."""

import dataclasses
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.kill_and_resume import finished_steps, kill_after_checkpoint

_CHILD = Path(__file__).with_name("train_resume_child.py")
_spec = importlib.util.spec_from_file_location("train_resume_child", _CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)


@pytest.fixture(scope="module")
def uninterrupted():
    return child.run()


def _without_seconds(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def _assert_same_run(a, b):
    leaves_a = jax.tree_util.tree_leaves(a.variables)
    leaves_b = jax.tree_util.tree_leaves(b.variables)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert _without_seconds(a.history) == _without_seconds(b.history)
    assert a.metrics == b.metrics


def test_training_killed_with_sigkill_resumes_bit_identically(tmp_path, uninterrupted):
    workdir = tmp_path / "train"
    kill_after_checkpoint(_CHILD, workdir, 2)
    done = finished_steps(workdir)
    assert 2 <= done[-1] < child.CONFIG.epochs and len(done) <= 2  # max_to_keep=2
    resumed = child.run(checkpoint_dir=workdir, resume=True)
    _assert_same_run(resumed, uninterrupted)
    assert finished_steps(workdir)[-1] == child.CONFIG.epochs
    # The restored epochs' records come from the checkpoint, the rest from this process.
    assert [record["epoch"] for record in resumed.history] == list(
        range(1, child.CONFIG.epochs + 1))


def test_resume_after_the_last_epoch_only_reports(tmp_path, uninterrupted):
    config = dataclasses.replace(child.CONFIG, epochs=2)
    first = child.run(config, checkpoint_dir=tmp_path)
    again = child.run(config, checkpoint_dir=tmp_path, resume=True)
    _assert_same_run(again, first)


def test_refusals(tmp_path):
    config = dataclasses.replace(child.CONFIG, epochs=1)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        child.run(config, resume=True)
    child.run(config, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"already holds training checkpoints \(epochs \[1\]\)"):
        child.run(config, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"different config \(learning_rate: checkpoint 0\.05, "
                                         r"requested 0\.1\)"):
        child.run(dataclasses.replace(config, learning_rate=0.1), checkpoint_dir=tmp_path,
                  resume=True)


def test_final_save_can_drop_the_checkpoints(tmp_path):
    config = dataclasses.replace(child.CONFIG, epochs=1)
    checkpoints = tmp_path / "model" / "checkpoints"
    child.run(config, workdir=tmp_path / "model", checkpoint_dir=checkpoints,
              keep_checkpoints=False)
    assert (tmp_path / "model" / "metadata.json").is_file() and not checkpoints.exists()
