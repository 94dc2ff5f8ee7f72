"""AWM checkpoints: a run killed with SIGKILL resumes bit-identically; determinism; NaN guard."""

import dataclasses
import importlib.util
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from awm_jax.defenses.awm import runner
from tests.kill_and_resume import finished_steps, kill_after_checkpoint

_CHILD = Path(__file__).with_name("awm_resume_child.py")
_spec = importlib.util.spec_from_file_location("awm_resume_child", _CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

class _Interrupt(Exception):
    """Stands in for a kill in the in-process tests."""


@pytest.fixture(scope="module")
def uninterrupted():
    return child.run()


def _assert_same_run(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a.mask), jax.tree_util.tree_leaves(b.mask)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert a.history == b.history  # exact float equality, every epoch, every metric
    names = sorted(a.history[0])
    assert np.array_equal(np.array([[h[k] for k in names] for h in a.history]),
                          np.array([[h[k] for k in names] for h in b.history]))
    assert a.selected_epoch == b.selected_epoch


def _kill_after_two_checkpoints(workdir: Path) -> None:
    kill_after_checkpoint(_CHILD, workdir, 2, env={"AWM_TEST_EPOCH_SLEEP": "0.5"})


def test_run_killed_with_sigkill_resumes_bit_identically(tmp_path, uninterrupted):
    workdir = tmp_path / "awm"
    _kill_after_two_checkpoints(workdir)
    done = finished_steps(workdir)
    assert 2 <= done[-1] < child.CONFIG.outer_epochs and len(done) <= 2  # max_to_keep=2
    resumed = child.run(workdir=workdir, resume=True)
    _assert_same_run(resumed, uninterrupted)
    assert finished_steps(workdir)[-1] == child.CONFIG.outer_epochs


@pytest.mark.parametrize("selection", [
    "min_robust_loss", pytest.param("average", marks=pytest.mark.slow)])
def test_selection_bookkeeping_survives_a_resume(tmp_path, selection):
    config = dataclasses.replace(child.CONFIG, outer_epochs=4, mask_selection=selection)

    def stop_after_epoch_2(epoch, variables):
        if epoch == 3:
            raise _Interrupt
        return {}

    full = child.run(config)
    with pytest.raises(_Interrupt):
        child.run(config, workdir=tmp_path, on_epoch=stop_after_epoch_2)
    assert finished_steps(tmp_path) == [1, 2]
    _assert_same_run(child.run(config, workdir=tmp_path, resume=True), full)


def test_resume_without_a_checkpoint_starts_fresh(tmp_path, uninterrupted):
    _assert_same_run(child.run(workdir=tmp_path / "empty", resume=True, checkpoint_every=4),
                     uninterrupted)
    assert finished_steps(tmp_path / "empty") == [4, 6]  # every 4th epoch and the last


def test_resume_with_another_config_names_the_fields(tmp_path):
    config = child.CONFIG  # the module's compiled setup: no extra compile
    child.run(config, workdir=tmp_path)
    changed = dataclasses.replace(config, tau=7.0, alpha=0.5)
    with pytest.raises(ValueError, match=r"different config \(alpha: .*tau: checkpoint 5\.0, "
                                         r"requested 7\.0"):
        child.run(changed, workdir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="different inputs .*key"):
        child.run(config, seed=3, workdir=tmp_path, resume=True)


def test_same_key_is_deterministic_and_another_key_is_not(uninterrupted):
    _assert_same_run(child.run(), uninterrupted)
    other = child.run(seed=5)
    assert not all(np.array_equal(x, y) for x, y in zip(
        jax.tree_util.tree_leaves(other.mask), jax.tree_util.tree_leaves(uninterrupted.mask)))


def test_infinite_loss_stops_with_floating_point_error(tmp_path):
    # gamma * |m|_1 overflows float32 (1e38 * 250 weights): a real divergence, in epoch 1.
    config = dataclasses.replace(child.CONFIG, gamma=1e38, outer_epochs=2)
    with pytest.raises(FloatingPointError, match="epoch 1: non-finite loss=inf.*no checkpoint"):
        child.run(config, workdir=tmp_path)
    assert finished_steps(tmp_path) == []


def test_late_divergence_names_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    mask_phase = runner._Driver.mask_phase

    def diverging_in_epoch_3(self, state, *args):
        state, metrics = mask_phase(self, state, *args)
        if int(state.epoch) == 3:
            metrics = {**metrics, "loss": jnp.float32(math.nan)}
        return state, metrics

    monkeypatch.setattr(runner._Driver, "mask_phase", diverging_in_epoch_3)
    with pytest.raises(FloatingPointError,
                       match=f"epoch 3: non-finite loss=nan.*{re.escape(str(tmp_path / '2'))} "
                             r"\(kept\)"):
        child.run(workdir=tmp_path, max_to_keep=1)
    assert finished_steps(tmp_path) == [2]


def test_defense_interface_passes_checkpointing_through(tmp_path, uninterrupted):
    from awm_jax.defenses.base import purify

    model, variables, clean = child.setup()
    result = purify("awm", model, variables, clean, jax.random.key(2), child.CONFIG,
                    progress=False, workdir=tmp_path, checkpoint_every=3, resume=True)
    assert finished_steps(tmp_path) == [3, 6]
    assert result.history == uninterrupted.history
    with pytest.raises(ValueError, match="needs a workdir"):
        child.run(resume=True)


def test_workdir_with_checkpoints_needs_resume(tmp_path):
    child.run(workdir=tmp_path)
    with pytest.raises(ValueError, match=r"already holds AWM checkpoints \(epochs \[5, 6\]\); "
                                         "pass resume=True"):
        child.run(workdir=tmp_path)


def test_a_resumed_run_reports_the_time_of_the_whole_run(tmp_path):
    """A finished run restored from its last checkpoint reports the seconds it took, not the
    fraction of a second the restore took."""
    config = dataclasses.replace(child.CONFIG, outer_epochs=2)
    finished = child.run(config, workdir=tmp_path)
    restored = child.run(config, workdir=tmp_path, resume=True)
    # The restored time is the checkpoint's (the epochs) plus the restore; the finished run's
    # is the epochs plus the final mask selection.
    assert 0.9 * finished.seconds <= restored.seconds
    assert finished.history == restored.history
