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

Defaults. NAD's settings do not carry over between architectures, so there are three:

* the class defaults, which work on our CIFAR-10 ResNet-18 (width 16) with 500 clean images:
  beta 1000 on the last three stage outputs, student SGD at a constant lr 0.01 (Nesterov,
  momentum 0.9, weight decay 1e-4, batch 64, 20 epochs). They follow BackdoorBench's
  PreAct-ResNet-18 config (``config/defense/nad/cifar10.yaml``: lr 0.01, betas 500/1000/1000
  on layer2-4) with one beta for the three stages. Measured there (``compare`` on the BadNets
  model of ``experiments/results/compare/``): ACC 0.831 -> 0.802, ASR 0.971 -> 0.037.
* ``preset("official")``, the official ``config.py``: beta 5000 on the last group only of its
  WRN-16-1 (``beta3``; ``beta1 = beta2 = 0``), lr 0.1 for epochs 0-1 then 0.01
  (``utils.adjust_learning_rate``), same SGD otherwise.
* ``preset("paper")``: beta 5000 on every stage at a constant lr 0.1 (our first default). On
  the digits test backdoor (plain CNN, 150 clean images) it erases the backdoor: ASR
  0.01-0.22 at ACC 0.86-0.90 (keys 0-2), where beta 0 leaves ASR 0.86-0.89 and lr 0.01 ASR
  ~0.99.

On the ResNet-18 the two beta-5000 settings collapse clean accuracy (``compare``, 500 images:
ACC 0.148 with ``official``, 0.169 with ``paper``): the attention loss is 50-110 against a CE of ~1 and drives the student to one
class within two epochs. Our last stage is 4 x 4 where the WRN's is 8 x 8; the loss is a mean
over positions of unit-normalised maps, so the same beta weighs about 4x more here. The
teacher (FT defaults: lr 0.01, 10 epochs, plain momentum) keeps its accuracy in all three.

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

from awm_jax.defenses.base import (
    DEFENSES,
    Defense,
    DefenseResult,
    build_once,
    config_preset,
)
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


_PRESETS = {
    "official": {"beta": 5000.0, "last_layers": 1, "learning_rate": 0.1,
                 "lr_decay_epochs": (2,), "lr_decay": 0.1},
    "paper": {"beta": 5000.0, "last_layers": None, "learning_rate": 0.1},
}


@dataclasses.dataclass(frozen=True)
class NADConfig(ConfigDictMixin):
    """NAD settings (see the module docstring for the sources of the defaults and presets).

    Attributes:
      beta: attention-loss weight of every distilled layer (1000).
      power: exponent p of the attention map (2).
      layers: ``"/"``-joined module paths whose outputs are distilled; None = automatic.
      last_layers: with automatic ``layers``, distil only the last this many (3); None = all.
      learning_rate, momentum, weight_decay, epochs, batch_size, nesterov: the student's SGD
        (0.01, 0.9, 1e-4, 20, 64, Nesterov).
      lr_decay_epochs, lr_decay: the student's rate is multiplied by ``lr_decay`` (0.1) from
        each of these epochs (0-based) on (none; the official code: 2).
      teacher_epochs, teacher_learning_rate: the teacher's fine-tuning (10 epochs, 0.01; same
        momentum, decay and batch size, plain momentum).
      crop_padding, flip: light augmentation of both phases (off).
    """

    PRESETS = tuple(_PRESETS)

    beta: float = 1000.0
    power: float = 2.0
    layers: tuple[str, ...] | None = None
    last_layers: int | None = 3
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 20
    batch_size: int = 64
    nesterov: bool = True
    lr_decay_epochs: tuple[int, ...] = ()
    lr_decay: float = 0.1
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
        check_positive("lr_decay", self.lr_decay)
        if self.last_layers is not None and int(self.last_layers) < 1:
            raise ValueError(f"last_layers must be >= 1 or None; got {self.last_layers}.")
        decay_epochs = tuple(self.lr_decay_epochs)
        if any(int(e) != e or e < 0 for e in decay_epochs):
            raise ValueError(f"lr_decay_epochs must be epoch numbers >= 0; "
                             f"got {self.lr_decay_epochs!r}.")
        object.__setattr__(self, "lr_decay_epochs", tuple(int(e) for e in decay_epochs))
        if self.layers is not None:
            if isinstance(self.layers, str) or not self.layers:
                raise ValueError(f"layers must be a non-empty tuple of module paths or None; "
                                 f"got {self.layers!r}.")
            object.__setattr__(self, "layers", tuple(self.layers))

    @classmethod
    def preset(cls, name: str, **overrides) -> NADConfig:
        """The named setting (``official`` or ``paper``) with ``overrides`` applied.

        Raises:
          ValueError: unknown name; the message lists the known ones.
        """
        return config_preset(cls, _PRESETS, name, "NAD", overrides)

    def learning_rate_at(self, epoch: int) -> float:
        """The student's rate in (0-based) ``epoch``: the step decay of ``lr_decay_epochs``."""
        return self.learning_rate * self.lr_decay ** sum(epoch >= e for e in self.lr_decay_epochs)

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
    """``config.layers`` checked against the forward pass, or the automatic choice (its last
    ``config.last_layers``).

    Raises:
      ValueError: a named layer is not a module of the model, or no layer was found.
    """
    calls = {"/".join(path): shape for path, _, shape in
             forward_call_order(model, variables, image_shape)}
    layers = config.layers
    if layers is None:
        found = default_layers(model, variables, image_shape)
        layers = found if config.last_layers is None else found[-config.last_layers:]
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
            step, student, data, student_key,
            lambda epoch: config.hparams()._replace(
                learning_rate=jnp.float32(config.learning_rate_at(epoch))),
            epochs=config.epochs,
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
