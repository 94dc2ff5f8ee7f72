"""Backdoored-model training: config, train state, pure steps and the host loop."""

from awm_jax.training.config import SCHEDULES, TrainConfig
from awm_jax.training.loop import (TrainResult, save_result, train_backdoored_model,
                                   training_metadata)
from awm_jax.training.optimizer import create_learning_rate_schedule, create_optimizer
from awm_jax.training.state import TrainState, create_train_state
from awm_jax.training.steps import cross_entropy, make_eval_step, make_train_step

__all__ = ["SCHEDULES", "TrainConfig", "TrainResult", "TrainState", "create_learning_rate_schedule",
           "create_optimizer", "create_train_state", "cross_entropy", "make_eval_step",
           "make_train_step", "save_result", "train_backdoored_model", "training_metadata"]
