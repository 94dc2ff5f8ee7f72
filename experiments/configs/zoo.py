"""The backdoored-model zoo: which (dataset, attack, model) to train, and how.

Two sizes per dataset:

* ``cpu``: what this project trains on a 2-core CPU (ResNet-18 at width 16 for CIFAR-10, the
  paper's small VGG for GTSRB), with short schedules; the committed table comes from these.
* ``full``: the paper's architectures at full width with long schedules, for GPU/TPU users.
* ``smoke``: one epoch of a small CNN on 32x32 digits, to check every attack's path quickly.

Attack settings follow the official AWM code where it has them (awm-paper.md 2.3: targets,
trigger geometry); poison rates are this project's (the AWM code's own recipe is unknown):
10% of the candidate images for dirty-label attacks, and half of the target class for the
clean-label SIG and CLB, which poison only target-class images.

Launch: ``python experiments/backdoor_zoo.py --datasets cifar10 gtsrb`` (see that script).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from awm_jax.training.config import TrainConfig

DIRTY_LABEL_RATE = 0.1
CLEAN_LABEL_RATE = 0.5


@dataclasses.dataclass(frozen=True)
class AttackRecipe:
    """One attack of the zoo: its registered name, parameters and poison rate."""

    attack: str
    params: Mapping[str, Any]
    poison_rate: float


# name in the table -> recipe. "clean" trains without an attack (CLB's reference model).
ATTACKS: dict[str, AttackRecipe | None] = {
    "clean": None,
    "badnets": AttackRecipe("badnets", {"target": 8}, DIRTY_LABEL_RATE),
    "blend": AttackRecipe("blend", {"target": 0, "alpha": 0.2}, DIRTY_LABEL_RATE),
    "trojan_sq": AttackRecipe("trojan_sq", {"target": 2}, DIRTY_LABEL_RATE),
    "trojan_wm": AttackRecipe("trojan_wm", {"target": 2}, DIRTY_LABEL_RATE),
    "l0_inv": AttackRecipe("l0_inv", {"target": 0}, DIRTY_LABEL_RATE),
    "l2_inv": AttackRecipe("l2_inv", {"target": 0}, DIRTY_LABEL_RATE),
    "sig": AttackRecipe("sig", {"target": 0}, CLEAN_LABEL_RATE),
    "clb": AttackRecipe("clb", {"target": 0}, CLEAN_LABEL_RATE),
    "wanet": AttackRecipe("wanet", {"target": 0}, DIRTY_LABEL_RATE),
    "all_to_all": AttackRecipe("all_to_all", {"base": "trojan_sq"}, DIRTY_LABEL_RATE),
}


@dataclasses.dataclass(frozen=True)
class DatasetRecipe:
    """How to train every model of one dataset.

    Attributes:
      source: the dataset source string (a path relative to the repository root, or a TFDS
        name); ``--source NAME=SOURCE`` overrides it.
      train: the training config (model, schedule, augmentation); each attack sets
        ``poison_rate``.
      attack_params: per attack name, parameters that replace the attack's own on this dataset.
    """

    source: str
    train: TrainConfig
    attack_params: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


# conv_impl="fast" trains a width-16 step 1.16x faster on this CPU (idle machine,
# experiments/results/performance.json train_step; 1.44x under load, perf_notes.md); on a
# GPU pass ``--set conv_impl=lax`` (cuDNN). The two differ only by float32 rounding, and each
# model's metadata.json records the one it was trained with. Epochs: 12 CIFAR-10 epochs gave
# ACC 0.831 (below the 0.85 bar), 20 give 0.851-0.860 over the zoo.
_CIFAR_CPU = TrainConfig(model="resnet18", model_kwargs={"width": 16}, epochs=20,
                         learning_rate=0.1, warmup_epochs=1, crop_padding=4, flip=True,
                         conv_impl="fast")
_GTSRB_CPU = TrainConfig(model="small_vgg", epochs=10, learning_rate=0.05, warmup_epochs=0.5,
                         crop_padding=2, conv_impl="fast")
# GTSRB's class 0 has 210 training images, so the clean-label attacks (which poison half of the
# target class) would poison 105 of 39,209 images; with target 0 they reached ASR 0.09 (SIG) and
# 0.002 (CLB). Class 2 has 2,250 (the largest class), so they poison 1,125.
_GTSRB_CLEAN_LABEL_TARGET = {"sig": {"target": 2}, "clb": {"target": 2}}

DATASETS: dict[str, dict[str, DatasetRecipe]] = {
    "cpu": {
        "cifar10": DatasetRecipe("../shared/data/cifar10-jpeg.tar.gz", _CIFAR_CPU),
        "gtsrb": DatasetRecipe("../shared/data/gtsrb-32.tar.gz", _GTSRB_CPU,
                               _GTSRB_CLEAN_LABEL_TARGET),
    },
    "smoke": {
        "digits": DatasetRecipe("digits32", TrainConfig(
            model_kwargs={"features": (8, 16)}, epochs=1, batch_size=64)),
    },
    "full": {
        "cifar10": DatasetRecipe("cifar10", dataclasses.replace(
            _CIFAR_CPU, model_kwargs={"width": 64}, epochs=100, warmup_epochs=2)),
        "gtsrb": DatasetRecipe("../shared/data/gtsrb-32.tar.gz", dataclasses.replace(
            _GTSRB_CPU, epochs=30), _GTSRB_CLEAN_LABEL_TARGET),
    },
}
