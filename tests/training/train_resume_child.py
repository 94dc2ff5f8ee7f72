"""A short digits training run, imported by the resume tests and run by them as a child process.

``python train_resume_child.py CHECKPOINT_DIR`` trains with a checkpoint after every epoch; the
test kills it with SIGKILL after the second checkpoint and resumes in process.
"""

import sys

from awm_jax.attacks import create_attack
from awm_jax.data.digits import load_digits
from awm_jax.training import TrainConfig, train_backdoored_model

CONFIG = TrainConfig(model="small_cnn", model_kwargs={"features": (8,)}, epochs=24,
                     batch_size=32, learning_rate=0.05, crop_padding=1, seed=3)


def run(config: TrainConfig = CONFIG, **kwargs):
    dataset = load_digits(8)
    attack = create_attack("badnets", target=0, patch_size=2, num_classes=10)
    return train_backdoored_model(dataset, attack, config, progress=False, **kwargs)


if __name__ == "__main__":
    run(checkpoint_dir=sys.argv[1], checkpoint_every=1)
