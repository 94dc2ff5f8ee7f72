"""Neural Attention Distillation ("nad").

Reference: Li, Lyu, Koren, Lyu, Li & Ma, "Neural Attention Distillation: Erasing Backdoor
Triggers from Deep Neural Networks" (ICLR 2021) and its official code ``bboylyg/NAD``
(``main.py``, ``at.py``, ``config.py``).

1. Teacher: the backdoored model fine-tuned on the defender's clean images
   (:mod:`awm_jax.defenses.finetune`; paper: 10 epochs).
2. Student: the backdoored model trained with ``CE + sum_l beta * AT_l`` where, for a layer
   output ``a`` of shape ``[B, H, W, C]``, ``A(a) = sum_c |a|^p`` (p = 2) normalised by its L2
   norm over H x W (``+ 1e-6``, ``at.py``), and ``AT_l`` is the mean squared difference between
   the student's and the teacher's maps. The teacher is frozen and runs in eval mode, the
   student in train mode (``main.py``).

Defaults. Official ``config.py``: SGD with Nesterov momentum 0.9, weight decay 1e-4, batch 64,
20 epochs, p = 2, beta 5000 on the last group of its WRN-16-1 (``beta3``; ``beta1 = beta2 =
0``), lr 0.1 with the step decay of ``utils.adjust_learning_rate`` (0.1 for epochs 0-1,
then 0.01; we keep 0.1 constant, a deviation). We keep those except that ``beta`` (5000)
weights *every* selected layer
(the paper's ResNet setting; set ``layers`` to one name for the code's last-group-only
variant). The teacher's fine-tuning uses lr 0.01 for 10 epochs (paper's teacher; our FT
defaults). On the digits test backdoor with 150 clean images the student's 0.1 matters: at
0.01 NAD leaves ASR ~0.99, at 0.1 it reaches ASR 0.01-0.22 with ACC 0.86-0.90 (seeds 0-2),
and with ``beta = 0`` (plain fine-tuning at 0.1) ASR stays at 0.86-0.89. On a CIFAR-10
ResNet-18 (width 16, last stage 4 x 4 where the code's WRN-16-1 has 8 x 8, so the same beta
weighs its AT about 4x more) with 500 clean images these defaults collapse clean accuracy
(``compare``: ACC 0.17): beta 5000 on all four stages, or on ``layer4`` alone, drives the
student's CE to ~90 within two epochs at lr 0.1 (the code's 0.1 -> 0.01 decay after epoch 2
does not recover it), and beta 5000 at lr 0.01 collapses it too, while beta 0 at lr 0.1
dips and recovers; the teacher (lr 0.01) keeps its accuracy.

Which layers: ``layers=None`` picks, from the forward pass, the output of the last block of
each stage (top-level composite modules grouped by output shape, e.g. ResNet's
``layer{i}_block1``), or, for plain CNNs without blocks, the output of every BatchNorm.
Activations are captured with flax's ``capture_intermediates`` (no model edits).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.traverse_util import flatten_dict

from awm_jax.defenses.base import DEFENSES, Defense, DefenseResult, build_once
from awm_jax.defenses.checkpointing import open_checkpointer
from awm_jax.defenses.fine_pruning import forward_call_order
from awm_jax.defenses.finetune import (
    ConfigDictMixin,
    check_fields,
    check_positive,
    finetune,
    init_ft_state,
    make_sgd_step,
    run_epochs,
    validate_clean,
)
from awm_jax.types import Array, Variables

_LEAF_TYPES = ("Conv", "BatchNorm", "Dense", "Normalize", "Dropout")


def attention_map(activation: Array, p: float = 2.0, eps: float = 1e-6) -> Array:
    """NAD's ``at.py``: ``float32[B, H, W, C] -> float32[B, H, W]``, L2-normalised over H, W."""
    am = jnp.sum(jnp.abs(activation) ** p, axis=-1)
    norm = jnp.sqrt(jnp.sum(am ** 2, axis=(1, 2), keepdims=True))
    return am / (norm + eps)


def attention_loss(student: Array, teacher: Array, p: float = 2.0) -> Array:
    """``F.mse_loss(A(student), A(teacher))``: the mean over batch and positions."""
    return jnp.mean((attention_map(student, p) - attention_map(teacher, p)) ** 2)


def default_layers(model: nn.Module, variables: Variables, image_shape) -> tuple[str, ...]:
    """Stage outputs (last composite top-level module per output shape), else BN outputs."""
    calls = forward_call_order(model, variables, image_shape)
    blocks = [(path, shape) for path, kind, shape in calls
              if len(path) == 1 and kind not in _LEAF_TYPES and len(shape) == 4]
    if blocks:
        last_of_stage = [path for i, (path, shape) in enumerate(blocks)
                         if i + 1 == len(blocks) or blocks[i + 1][1] != shape]
        return tuple("/".join(path) for path in last_of_stage)
    return tuple("/".join(path) for path, kind, shape in calls
                 if kind == "BatchNorm" and len(shape) == 4)


class NADHparams(NamedTuple):
    """Swept numbers of the student's training (float32 scalars)."""

    learning_rate: Array
    momentum: Array
    weight_decay: Array
    beta: Array


class NADState(struct.PyTreeNode):
    """The student's weights and momentum, plus the frozen teacher (``mask`` is unused)."""

    params: Any
    batch_stats: Any
    velocity: Any
    mask: Any
    step: Array
    teacher: Any

    @property
    def variables(self) -> Variables:
        return {"params": self.params, "batch_stats": self.batch_stats}


@dataclasses.dataclass(frozen=True)
class NADConfig(ConfigDictMixin):
    """NAD settings (see the module docstring for the sources of the defaults).

    Attributes:
      beta: attention-loss weight of every selected layer (5000).
      power: exponent p of the attention map (2).
      layers: ``"/"``-joined module paths whose outputs are distilled; None = automatic.
      learning_rate, momentum, weight_decay, epochs, batch_size, nesterov: the student's SGD
        (0.1 constant, 0.9, 1e-4, 20, 64, Nesterov, as in the code).
      teacher_epochs, teacher_learning_rate: the teacher's fine-tuning (10 epochs, 0.01; same
        momentum, decay and batch size, plain momentum).
      crop_padding, flip: light augmentation of both phases (off).
    """

    beta: float = 5000.0
    power: float = 2.0
    layers: tuple[str, ...] | None = None
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 20
    batch_size: int = 64
    nesterov: bool = True
    teacher_epochs: int = 10
    teacher_learning_rate: float = 0.01
    crop_padding: int = 0
    flip: bool = False

    def __post_init__(self):
        check_fields(self)
        check_positive("beta", self.beta, allow_zero=True)
        check_positive("power", self.power)
        check_positive("teacher_epochs", self.teacher_epochs)
        check_positive("teacher_learning_rate", self.teacher_learning_rate)
        if self.layers is not None:
            if isinstance(self.layers, str) or not self.layers:
                raise ValueError(f"layers must be a non-empty tuple of module paths or None; "
                                 f"got {self.layers!r}.")
            object.__setattr__(self, "layers", tuple(self.layers))

    def hparams(self) -> NADHparams:
        return NADHparams(*(jnp.asarray(v, jnp.float32) for v in (
            self.learning_rate, self.momentum, self.weight_decay, self.beta)))


def nad_loss_fn(model: nn.Module, layers: tuple[str, ...], power: float):
    """The student's ``CE + beta * sum_l AT_l`` for :func:`make_sgd_step`."""
    wanted = {tuple(name.split("/")) for name in layers}
    capture = lambda module, method: method == "__call__" and tuple(module.path) in wanted

    def outputs(state_dict) -> list[Array]:
        flat = flatten_dict(state_dict["intermediates"])
        return [flat[(*name.split("/"), "__call__")][0] for name in layers]

    def loss_fn(params, state: NADState, images, labels, key, hparams):
        logits, new_state = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, images, train=True,
            mutable=["batch_stats", "intermediates"], capture_intermediates=capture,
            rngs={"dropout": key})
        _, teacher_state = model.apply(dict(state.teacher), images, train=False,
                                       mutable=["intermediates"], capture_intermediates=capture)
        teacher_out = [jax.lax.stop_gradient(a) for a in outputs(teacher_state)]
        at = sum(attention_loss(s, t, power) for s, t in zip(outputs(new_state), teacher_out))
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        metrics = {"ce": ce, "at": at, "accuracy": jnp.mean(logits.argmax(-1) == labels)}
        return ce + hparams.beta * at, (new_state.get("batch_stats", state.batch_stats), metrics)

    return loss_fn


def resolve_layers(model, variables, image_shape, config: NADConfig) -> tuple[str, ...]:
    """``config.layers`` checked against the forward pass, or the automatic choice.

    Raises:
      ValueError: a named layer is not a module of the model, or no layer was found.
    """
    calls = {"/".join(path): shape for path, _, shape in
             forward_call_order(model, variables, image_shape)}
    layers = config.layers or default_layers(model, variables, image_shape)
    bad = [name for name in layers if len(calls.get(name, ())) != 4]
    if bad or not layers:
        known = sorted(name for name, shape in calls.items() if len(shape) == 4)
        raise ValueError(f"NAD layers {bad or layers} are not modules with [B, H, W, C] "
                         f"outputs; known: {known}.")
    return tuple(layers)


def _jitted_step(model, layers, power, crop_padding, flip, nesterov):
    return jax.jit(make_sgd_step(nad_loss_fn(model, layers, power), crop_padding=crop_padding,
                                 flip=flip, nesterov=nesterov), donate_argnums=0)


def init_student(variables: Variables, teacher: Variables) -> NADState:
    """The student starts from (a copy of) the backdoored ``variables``, zero momentum."""
    params = jax.tree_util.tree_map(jnp.array, variables["params"])
    return NADState(params=params,
                    batch_stats=jax.tree_util.tree_map(jnp.array, variables["batch_stats"]),
                    velocity=jax.tree_util.tree_map(jnp.zeros_like, params), mask=None,
                    step=jnp.zeros((), jnp.int32), teacher=teacher)


def _purify(model, variables, clean, key, config: NADConfig, *, num_classes=None,
            on_epoch=None, progress=True, workdir=None, checkpoint_every=1, max_to_keep=2,
            resume=False) -> DefenseResult:
    """NAD; with ``workdir`` the run is checkpointed per epoch: steps ``1..T`` are the
    teacher's epochs (its :class:`FTState`; step T always saved), steps ``T + e`` the student's
    (its :class:`NADState`, which holds the teacher) (:mod:`awm_jax.defenses.checkpointing`)."""
    start = time.perf_counter()
    data = validate_clean(clean, num_classes)
    layers = resolve_layers(model, variables, data["image"].shape[1:], config)
    teacher_key, student_key = jax.random.split(key)
    teacher_config = dataclasses.replace(config, learning_rate=config.teacher_learning_rate,
                                         epochs=config.teacher_epochs, nesterov=False)
    teacher_epochs = config.teacher_epochs
    plain = {"params": variables["params"], "batch_stats": variables["batch_stats"]}

    def target(meta):
        if meta["phase"] == "teacher":
            return {"teacher": init_ft_state(variables)}
        return {"student": init_student(variables, plain)}

    with open_checkpointer(workdir, kind="nad",
                           unit="epochs (teacher, then student)", config=config, key=key,
                           data=data, variables=variables,
                           total_steps=teacher_epochs + config.epochs,
                           checkpoint_every=checkpoint_every, max_to_keep=max_to_keep,
                           resume=resume) as checkpointer:
        arrays, meta = checkpointer.restore(target_for_meta=target)
        teacher_history = meta.get("teacher_history", [])
        student = None
        if meta["step"] <= teacher_epochs:
            teacher, teacher_history, _ = finetune(
                model, variables, data, teacher_key, teacher_config, progress=progress,
                desc="NAD teacher", state=None if arrays is None else arrays["teacher"],
                first_epoch=meta["step"], history=teacher_history,
                after_epoch=lambda done, s, h: checkpointer.save(
                    done, {"teacher": s}, {"phase": "teacher", "teacher_history": h},
                    force=done == teacher_epochs),
                lower={"teacher_learning_rate": config.teacher_learning_rate},
                checkpointer=checkpointer.run)
        else:
            student = arrays["student"]
            teacher = student.teacher
        teacher_seconds = time.perf_counter() - start
        step = build_once(_jitted_step, model, layers, config.power, config.crop_padding,
                          config.flip, config.nesterov)
        if student is None:
            student = init_student(variables, teacher)
        student, history, seconds = run_epochs(
            step, student, data, student_key, config.hparams(), epochs=config.epochs,
            batch_size=config.batch_size, on_epoch=on_epoch, progress=progress, desc="NAD",
            first_epoch=max(0, meta["step"] - teacher_epochs), history=meta.get("history"),
            after_epoch=lambda done, s, h: checkpointer.save(
                teacher_epochs + done, {"student": s},
                {"phase": "student", "teacher_history": teacher_history, "history": h}),
            lower={"learning_rate": config.learning_rate, "beta": config.beta},
            checkpointer=checkpointer.run)
    details = {"layers": list(layers),
               "teacher_final_ce": teacher_history[-1]["ce"] if teacher_history else None}
    return DefenseResult(student.variables, history,
                         seconds + teacher_seconds + checkpointer.seconds_before, details)


@DEFENSES.register("nad")
def nad() -> Defense:
    return Defense("nad", NADConfig, _purify)
