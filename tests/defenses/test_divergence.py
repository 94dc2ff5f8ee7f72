"""A baseline whose loss turns NaN or Inf stops with a FloatingPointError naming the defense, the
epoch and the last good checkpoint, before that epoch is saved (awm_jax.defenses.divergence).

Real divergences on the resume tests' tiny backdoor, with the resume tests' compiled setups
where the static settings allow: SGD at learning rate 1e30 (the first update sends the weights
to ~1e30, the next epoch's loss is NaN), ANP's noise bound and I-BAU's perturbation step at 1e38
(activations overflow in the first block or round). NC and the ablation compile per config, so
they run the resume tests' configs on the backdoored model with its weights scaled by 1e38
(the logits overflow). AWM's guard is tested in test_awm_resume.py.
"""

import re

import jax
import numpy as np
import pytest
import test_baseline_resume as resume

from awm_jax.defenses.anp import ANPConfig
from awm_jax.defenses.divergence import raise_if_diverged
from awm_jax.defenses.finetune import FTConfig
from awm_jax.defenses.ibau import IBAUConfig
from awm_jax.defenses.nad import NADConfig
from tests.kill_and_resume import finished_steps

backdoor = resume.backdoor  # the module fixture: 64 of the defender's images
_NO_CHECKPOINT = re.escape("; no checkpoint was written before it (workdir not set). ")


def test_ft_stops_before_saving_the_diverged_epoch(backdoor, tmp_path):
    message = (f"FT diverged in epoch 2/3: non-finite loss=nan; the last good checkpoint is "
               f"{tmp_path / '1'} (kept). Lower learning_rate "
               f"(now 1e+30).")
    with pytest.raises(FloatingPointError, match=f"^{re.escape(message)}$"):
        resume._run(backdoor, "ft", FTConfig(epochs=3, learning_rate=1e30), workdir=tmp_path)
    assert finished_steps(tmp_path) == [1]


# name -> (config, the message up to the non-finite metrics, the advice after the checkpoint).
_CASES = {
    "nad": (NADConfig(teacher_epochs=2, epochs=1, teacher_learning_rate=1e30),
            "NAD teacher diverged in epoch 2/2: non-finite loss=nan",
            "Lower teacher_learning_rate (now 1e+30)."),
    "anp": (ANPConfig(iterations=5, batch_size=32, eps=1e38),
            "ANP diverged in block 1/3: non-finite loss=nan, ",
            "Lower mask_lr (now 0.2) or eps (now 1e+38)."),
    "ibau": (IBAUConfig(rounds=3, learning_rate=1e-3, perturbation_learning_rate=1e38),
             "I-BAU diverged in round 1/3: non-finite ce=nan, hypergradient_norm=nan",
             ("Lower learning_rate (now 0.001), inner_learning_rate (now 0.1) or "
              "perturbation_learning_rate (now 1e+38).")),
    "nc": (resume._CASES["nc"][0],
           (f"NC trigger search diverged in pass 1/2: non-finite loss={[np.nan] * 10} "
            f"(classes 0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"),
           "Lower learning_rate (now 0.1) or init_cost (now 0.02)."),
    "ablation": (resume._CASES["ablation"][0],
                 "ablation diverged in epoch 1/3: non-finite ",
                 "Lower mask_lr (now 0.01) or trigger_lr (now 10.0)."),
}
_HUGE_WEIGHTS = ("nc", "ablation")


@pytest.mark.parametrize("name", list(_CASES))
def test_non_finite_loss_stops_the_defense(backdoor, name):
    config, start, advice = _CASES[name]
    if name in _HUGE_WEIGHTS:
        params = jax.tree_util.tree_map(lambda x: x * 1e38, backdoor.variables["params"])
        backdoor = backdoor._replace(variables={**backdoor.variables, "params": params})
    with pytest.raises(FloatingPointError,
                       match=f"^{re.escape(start)}.*{_NO_CHECKPOINT}{re.escape(advice)}$"):
        resume._run(backdoor, name, config)


class _Checkpointer:
    def __init__(self, latest):
        self.latest = latest

    def latest_path(self):
        return self.latest


def test_only_the_named_metrics_count():
    record = {"loss": 0.5, "ce": 0.5, "asr": float("nan"), "best_l1": np.full(3, np.inf)}
    raise_if_diverged(record, what="X", epoch=1, metrics=("loss", "ce", "missing"))
    with pytest.raises(FloatingPointError, match=re.escape(
            "X diverged in round 4/5: non-finite loss=[nan, -inf] (classes 0, 2), "
            "z=inf; no checkpoint was written before it. Lower lr (now 0.1).")):
        raise_if_diverged({"loss": np.array([np.nan, 1.0, -np.inf]), "z": np.float32(np.inf)},
                          what="X", epoch=4, total=5, unit="round", metrics=("z", "loss"),
                          lower={"lr": 0.1}, checkpointer=_Checkpointer(None))
    with pytest.raises(FloatingPointError, match=re.escape(
            "X diverged in epoch 2: non-finite loss=nan; the last good checkpoint is /w/1 "
            "(kept). Lower a, b or c.")):
        raise_if_diverged({"loss": float("nan")}, what="X", epoch=2, lower=("a", "b", "c"),
                          checkpointer=_Checkpointer("/w/1"))
