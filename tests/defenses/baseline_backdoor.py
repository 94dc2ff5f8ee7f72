"""One tiny real backdoor shared by the baseline-defense tests (trained once per session).

digits + BadNets (target 0, 3x3 patch), small CNN, 4 epochs (~7 s on 2 idle cores). The
defender holds 150 clean test images; the other 300 evaluate.
"""

import functools
from typing import NamedTuple

import jax

from awm_jax.attacks.base import create_attack, triggered_test_set
from awm_jax.data.clean_subset import CleanDataConfig, draw_clean_subset
from awm_jax.data.sources import load_dataset
from awm_jax.eval.metrics import (
    evaluate_backdoor,
    make_predict_fn,
)
from awm_jax.training.config import TrainConfig
from awm_jax.training.loop import train_backdoored_model


class Backdoor(NamedTuple):
    model: object
    variables: dict
    clean: object
    evaluate: object  # variables -> {"acc", "asr", "asr_all", "ra"}
    before: dict
    num_classes: int
    trained: object  # the TrainResult, dataset and attack, for saving a checkpoint
    dataset: object
    attack: object


@functools.lru_cache(maxsize=1)
def tiny_backdoor() -> Backdoor:
    dataset = load_dataset("digits")
    attack = create_attack("badnets", target=0, patch_size=3)
    trained = train_backdoored_model(
        dataset, attack, TrainConfig(model="small_cnn", model_kwargs={"features": (16, 32)},
                                     epochs=4, batch_size=64, learning_rate=0.02,
                                     poison_rate=0.1, seed=0), progress=False)
    clean, rest = draw_clean_subset(dataset.test, dataset.num_classes, jax.random.key(1),
                                    CleanDataConfig(n_clean=150))
    triggered = triggered_test_set(rest, attack, jax.random.key(2))
    predict = make_predict_fn(trained.model)

    def evaluate(variables):
        return evaluate_backdoor(functools.partial(predict, variables), rest, triggered)

    return Backdoor(trained.model, trained.variables, clean, evaluate,
                    evaluate(trained.variables), dataset.num_classes, trained, dataset, attack)
