"""Baseline-defense checkpoints: an interrupted run resumes bit-identically, for every defense.

The in-process tests stop a run by raising from :meth:`RunCheckpointer.maybe_save` on its
``kill_at``-th call (before that step is saved, as a kill between two checkpoints would), then
resume it and compare with an uninterrupted run: every output array bit for bit, the history
and the details exactly. One test kills a real child process with SIGKILL.
"""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from baseline_backdoor import tiny_backdoor

from awm_jax.data.dataset import Split
from awm_jax.defenses import purify
from awm_jax.defenses.ablation import preset
from awm_jax.defenses.anp import ANPConfig
from awm_jax.defenses.fine_pruning import FPConfig
from awm_jax.defenses.finetune import FTConfig
from awm_jax.defenses.ibau import IBAUConfig
from awm_jax.defenses.nad import NADConfig
from awm_jax.defenses.neural_cleanse import NCConfig
from awm_jax.run_checkpoint import RunCheckpointer
from tests.kill_and_resume import finished_steps, kill_after_checkpoint

_CHILD = Path(__file__).with_name("baseline_resume_child.py")
_spec = importlib.util.spec_from_file_location("baseline_resume_child", _CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)


class _Interrupt(Exception):
    """Stands in for a kill in the in-process tests."""


# name -> (tiny config, kill_at: the maybe_save call that "kills", checkpoints left by then).
# Each run writes >= 2 checkpoints; the kill points cross the phase boundaries: FP resumes
# from its pruning decision, NAD from the student's first epoch (teacher done), NC from the
# end of its trigger search, the ablation and ANP mid-run (ANP's last block is partial).
_CASES = {
    "ft": (FTConfig(epochs=3), 3, [1, 2]),
    "fp": (FPConfig(epochs=2), 2, [1]),
    "nad": (NADConfig(teacher_epochs=1, epochs=2), 3, [1, 2]),
    "anp": (ANPConfig(iterations=5, batch_size=32), 3, [1, 2]),
    "nc": (NCConfig(adaptive_cost=False, init_cost=0.02, epochs=2, batches_per_epoch=2,
                    batch_size=16, anomaly_threshold=1e-3, unlearn_epochs=2), 4, [2, 3]),
    "ibau": (IBAUConfig(rounds=3, batch_size=32), 3, [1, 2]),
    "ablation": (preset("weight_mask_trigger", epochs=3, batch_size=32), 3, [1, 2]),
}


@pytest.fixture(scope="module")
def backdoor():
    bd = tiny_backdoor()
    # 64 of the defender's images: every step is small, the steps per epoch are 2 at batch 32.
    return bd._replace(clean=Split(bd.clean.images[:64], bd.clean.labels[:64]))


def _run(backdoor, name, config, **kwargs):
    return purify(name, backdoor.model, backdoor.variables, backdoor.clean, jax.random.key(0),
                  config, num_classes=backdoor.num_classes, progress=False, **kwargs)


def _assert_same_run(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a.variables), jax.tree_util.tree_leaves(
        b.variables)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert a.history == b.history  # exact float equality, every epoch, every metric
    assert a.details == b.details


def _kill_at(monkeypatch, call: int) -> None:
    maybe_save, calls = RunCheckpointer.maybe_save, []

    def interrupted(self, step, arrays, meta, **kwargs):
        calls.append(step)
        if len(calls) == call:
            raise _Interrupt(f"killed before saving step {step}")
        return maybe_save(self, step, arrays, meta, **kwargs)

    monkeypatch.setattr(RunCheckpointer, "maybe_save", interrupted)


@pytest.mark.parametrize("name", list(_CASES))
def test_interrupted_run_resumes_bit_identically(backdoor, tmp_path, monkeypatch, name):
    config, kill_at, left = _CASES[name]
    full = _run(backdoor, name, config)
    with monkeypatch.context() as patch:
        _kill_at(patch, kill_at)
        with pytest.raises(_Interrupt):
            _run(backdoor, name, config, workdir=tmp_path)
    assert finished_steps(tmp_path) == left
    resumed = _run(backdoor, name, config, workdir=tmp_path, resume=True)
    _assert_same_run(resumed, full)
    assert len(finished_steps(tmp_path)) == 2 and finished_steps(tmp_path)[-1] > left[-1]
    # A finished run resumed again only reports, with the same result.
    _assert_same_run(_run(backdoor, name, config, workdir=tmp_path, resume=True), full)


def test_checkpoint_of_another_config_or_model_is_refused(backdoor, tmp_path):
    config = _CASES["ibau"][0]
    _run(backdoor, "ibau", config, workdir=tmp_path, checkpoint_every=2)
    assert finished_steps(tmp_path) == [2, 3]  # every 2nd round and the last
    with pytest.raises(ValueError, match=r"already holds ibau checkpoints \(rounds \[2, 3\]\)"):
        _run(backdoor, "ibau", config, workdir=tmp_path)
    with pytest.raises(ValueError, match=r"different config \(batch_size: checkpoint 32, "
                                         r"requested 16\)"):
        _run(backdoor, "ibau", IBAUConfig(rounds=3, batch_size=16), workdir=tmp_path,
             resume=True)
    other = jax.tree_util.tree_map(lambda x: x * 1.5, backdoor.variables)
    with pytest.raises(ValueError, match="different inputs .*variables_sha256"):
        purify("ibau", backdoor.model, other, backdoor.clean, jax.random.key(0), config,
               progress=False, workdir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="'ibau' checkpoint, not a 'ft' one"):
        _run(backdoor, "ft", _CASES["ft"][0], workdir=tmp_path, resume=True)
    with pytest.raises(ValueError, match="needs a workdir"):
        _run(backdoor, "ft", _CASES["ft"][0], resume=True)


def test_run_killed_with_sigkill_resumes_bit_identically(tmp_path):
    uninterrupted = child.run()
    workdir = tmp_path / "ft"
    kill_after_checkpoint(_CHILD, workdir, 2, env={"BASELINE_TEST_EPOCH_SLEEP": "0.5"})
    done = finished_steps(workdir)
    assert 2 <= done[-1] < child.CONFIG.epochs and len(done) <= 2  # max_to_keep=2
    resumed = child.run(workdir=workdir, resume=True)
    _assert_same_run(resumed, uninterrupted)
    assert finished_steps(workdir)[-1] == child.CONFIG.epochs
