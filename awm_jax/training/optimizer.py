"""The optax optimiser and learning-rate schedule described by a :class:`TrainConfig`."""

from __future__ import annotations

import optax

from awm_jax.training.config import TrainConfig


def create_learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
    """Maps the optimiser step count to a learning rate.

    Linear warm-up from 0 over ``warmup_epochs``, then ``config.schedule`` over the remaining
    steps: constant, cosine decay to 0 at the last step, or multistep (times ``decay_factor`` at
    each milestone epoch, counted from the start of training as in PyTorch's ``MultiStepLR``).

    Raises:
      ValueError: ``steps_per_epoch`` < 1.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1; got {steps_per_epoch}.")
    lr = config.learning_rate
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps=max(total - warmup, 1))
    else:
        # join_schedules restarts the clock at the warm-up boundary, so shift the milestones.
        main = optax.piecewise_constant_schedule(
            lr, {m * steps_per_epoch - warmup: config.decay_factor for m in config.milestones})
    if warmup == 0:
        return main
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), main], boundaries=[warmup])


def create_optimizer(config: TrainConfig,
                     steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD with momentum and coupled weight decay, as PyTorch's ``torch.optim.SGD``.

    The decay is added to the gradient before momentum (``add_decayed_weights`` first in the
    chain), which is what the reference backdoor recipes (ANP, I-BAU, AWM) trained with. It
    applies to every parameter, BatchNorm scales and biases included, as PyTorch does by default.

    Returns:
      ``(tx, schedule)``; the schedule is returned so the host can log the learning rate.
    """
    schedule = create_learning_rate_schedule(config, steps_per_epoch)
    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
    )
    return tx, schedule
