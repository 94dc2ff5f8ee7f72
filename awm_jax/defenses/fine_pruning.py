"""Fine-pruning ("fp"): prune the last conv layer's dormant channels, then fine-tune.

Reference: Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks" (RAID 2018), Sec. 3-4. The paper ranks the channels of the *last*
convolutional layer by their mean activation on clean validation data, prunes them in
increasing order until the clean validation accuracy has dropped by 4 percentage points, then
fine-tunes the pruned network. There is no official code; defaults are the paper's (4 % drop)
plus the fine-tuning settings of :mod:`awm_jax.defenses.finetune`. ``max_prune_ratio`` (0.9)
is ours: it keeps a tenth of the layer whatever the accuracy says.

How this port finds and prunes the layer, for any registered model:

* "last conv layer" = the rank-4 ``kernel`` leaf of the params tree whose module is *called*
  last in a forward pass (module order is read from the forward pass with
  ``nn.intercept_methods``, because JAX pytrees sort dict keys and ``Conv_10`` < ``Conv_2``);
* its activation is that module's output, passed through the BatchNorm called right after it
  (eval mode), if there is one with the same width, and a ReLU; a channel's score is the mean
  over images and positions (the paper's post-ReLU mean activation);
* pruning zeroes the channel's output slice of the kernel through a 0/1 mask that also stays
  applied during fine-tuning. A BatchNorm after a pruned conv then outputs a constant (its
  bias minus the shifted mean), which carries no input information, as a removed channel;
* the defender's clean images are the validation data (the paper's held-out split); the
  search runs one forward pass over them per candidate count ``k`` in 0..C (C + 1 passes).
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from awm_jax.defenses.base import DEFENSES, Defense, DefenseResult, build_once
from awm_jax.defenses.checkpointing import open_checkpointer
from awm_jax.defenses.finetune import (
    ConfigDictMixin,
    check_fields,
    finetune,
    init_ft_state,
    validate_clean,
)
from awm_jax.models.base import apply_model
from awm_jax.types import Array, Batch, Metrics, PRNGKey, Variables


def forward_call_order(model: nn.Module, variables: Variables, image_shape) -> list[tuple]:
    """``[(path, module_type_name, output_shape), ...]`` of every module call in one eval forward.

    Traced with ``jax.eval_shape``, so nothing is computed; the top-level module is left out.
    """
    calls: list[tuple] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        if context.method_name == "__call__" and path:
            calls.append((path, type(context.module).__name__, tuple(getattr(out, "shape", ()))))
        return out

    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=False), dict(variables), images)
    # Calls are listed when they return, so a block follows its children; callers compare
    # leaf modules (Conv, BatchNorm) or siblings, whose order is the forward order.
    return calls


class LastConv(NamedTuple):
    """Where the pruned layer lives: its kernel's params path and the BatchNorm after it."""

    kernel_path: tuple
    bn_path: tuple | None
    channels: int


def find_last_conv(model: nn.Module, variables: Variables, image_shape) -> LastConv:
    """The last-called module with a rank-4 ``kernel`` (see the module docstring).

    Raises:
      ValueError: the model has no rank-4 kernel.
    """
    flat = flatten_dict(dict(variables["params"]))
    calls = forward_call_order(model, variables, image_shape)
    convs = [i for i, (path, _, _) in enumerate(calls)
             if getattr(flat.get((*path, "kernel")), "ndim", 0) == 4]
    if not convs:
        raise ValueError("fine-pruning needs a conv layer (a rank-4 'kernel' in params); "
                         f"found kernels {[p for p in flat if p[-1] == 'kernel']}.")
    index = convs[-1]
    path = calls[index][0]
    channels = int(flat[(*path, "kernel")].shape[-1])
    bn_path = None
    if index + 1 < len(calls) and calls[index + 1][1] == "BatchNorm":
        candidate = calls[index + 1][0]
        if int(flat[(*candidate, "scale")].shape[-1]) == channels:
            bn_path = candidate
    return LastConv((*path, "kernel"), bn_path, channels)


class FPHparams(NamedTuple):
    """Swept numbers of the pruning stage (float32 scalars)."""

    acc_drop: Array
    max_prune_ratio: Array


@dataclasses.dataclass(frozen=True)
class FPConfig(ConfigDictMixin):
    """Fine-pruning settings.

    Attributes:
      acc_drop: stop pruning before the defender's clean accuracy falls more than this below
        the unpruned model's (paper: 0.04).
      max_prune_ratio: never prune more than this fraction of the layer's channels (ours: 0.9).
      learning_rate, momentum, weight_decay, epochs, batch_size, crop_padding, flip, nesterov:
        the fine-tuning after pruning, as :class:`~awm_jax.defenses.finetune.FTConfig`;
        ``epochs=0`` prunes without fine-tuning (the paper's pruning-only baseline).
    """

    acc_drop: float = 0.04
    max_prune_ratio: float = 0.9
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 10
    batch_size: int = 64
    crop_padding: int = 0
    flip: bool = False
    nesterov: bool = False

    def __post_init__(self):
        if not 0.0 <= self.acc_drop <= 1.0:
            raise ValueError(f"acc_drop must be in [0, 1]; got {self.acc_drop}.")
        if not 0.0 <= self.max_prune_ratio < 1.0:
            raise ValueError(f"max_prune_ratio must be in [0, 1); got {self.max_prune_ratio}.")
        check_fields(self, allow_zero_epochs=True)

    def hparams(self) -> FPHparams:
        return FPHparams(jnp.asarray(self.acc_drop, jnp.float32),
                         jnp.asarray(self.max_prune_ratio, jnp.float32))


class PruneState(NamedTuple):
    """The backdoored weights and the pruning result.

    Attributes:
      variables: the model's ``{"params", "batch_stats"}`` (unchanged by pruning).
      keep: ``float32[C]`` 1 for kept channels of the last conv, 0 for pruned.
    """

    variables: Variables
    keep: Array


def channel_mask(params, layer: LastConv, keep: Array):
    """A 0/1 pytree like ``params``: ``keep`` on the last conv kernel's output axis, 1 elsewhere."""
    flat = flatten_dict(dict(params))
    masks = {path: (jnp.broadcast_to(keep, leaf.shape).astype(leaf.dtype)
                    if path == layer.kernel_path else jnp.ones_like(leaf))
             for path, leaf in flat.items()}
    return unflatten_dict(masks)


def make_prune_step(model: nn.Module, layer: LastConv):
    """Returns the pure ``prune_step(state, data, key, hparams) -> (state, metrics)``.

    ``data`` is the defender's whole clean set. The step scores the channels, evaluates the
    clean accuracy with the ``k`` least active channels pruned for every ``k`` in 0..C, and
    keeps the largest ``k <= max_prune_ratio * C`` whose accuracy is within ``acc_drop`` of
    ``k = 0`` (accuracy is not monotone in ``k``; like the paper we stop at the first ``k``
    whose drop exceeds the tolerance).
    """
    capture = {layer.kernel_path[:-1]} | ({layer.bn_path} if layer.bn_path else set())

    def activations(variables, images):
        _, state = model.apply(dict(variables), images, train=False, mutable=["intermediates"],
                               capture_intermediates=lambda m, name: name == "__call__"
                               and tuple(m.path) in capture)
        flat = flatten_dict(state["intermediates"])
        path = layer.bn_path or layer.kernel_path[:-1]
        return jax.nn.relu(flat[(*path, "__call__")][0])

    def prune_step(state: PruneState, data: Batch, key: PRNGKey,
                   hparams: FPHparams) -> tuple[PruneState, Metrics]:
        del key
        variables = state.variables
        score = activations(variables, data["image"]).mean(axis=(0, 1, 2))
        order = jnp.argsort(score)  # least active first
        ranks = jnp.argsort(order)  # channel -> position in the pruning order

        def accuracy(k):
            keep = (ranks >= k).astype(jnp.float32)
            params = jax.tree_util.tree_map(jnp.multiply, variables["params"],
                                            channel_mask(variables["params"], layer, keep))
            logits, _ = apply_model(model, params, variables["batch_stats"], data["image"])
            return jnp.mean(logits.argmax(-1) == data["label"])

        counts = jnp.arange(layer.channels + 1)
        accs = jax.lax.map(accuracy, counts)
        limit = jnp.floor(hparams.max_prune_ratio * layer.channels)
        ok = (accs >= accs[0] - hparams.acc_drop) & (counts <= limit)
        # The first k that fails stops the search (paper); all k before it are acceptable.
        first_bad = jnp.argmin(jnp.concatenate([ok, jnp.zeros((1,), bool)]))
        pruned = jnp.maximum(first_bad - 1, 0)
        keep = (ranks >= pruned).astype(jnp.float32)
        return state._replace(keep=keep), {
            "pruned": pruned.astype(jnp.float32), "clean_acc_before": accs[0],
            "clean_acc_pruned": accs[pruned], "accs": accs, "scores": score}

    return prune_step


def _jitted_prune_step(model, layer: LastConv):
    return jax.jit(make_prune_step(model, layer))


def _prune(model, variables, data, layer: LastConv, key, config: FPConfig):
    """The pruning decision: ``(keep float32[C], facts for the report)``."""
    prune_step = build_once(_jitted_prune_step, model, layer)
    state = PruneState(variables, jnp.ones((layer.channels,), jnp.float32))
    state, metrics = prune_step(state, data, key, config.hparams())
    return state.keep, {"pruned": int(metrics["pruned"]),
                        "clean_acc_before": float(metrics["clean_acc_before"]),
                        "clean_acc_pruned": float(metrics["clean_acc_pruned"])}


def _purify(model, variables, clean, key, config: FPConfig, *, num_classes=None, on_epoch=None,
            progress=True, workdir=None, checkpoint_every=1, max_to_keep=2,
            resume=False) -> DefenseResult:
    """Fine-pruning; with ``workdir`` the run is checkpointed: step 1 is the pruning decision
    (always saved), step ``1 + e`` the fine-tuning after epoch ``e``
    (:mod:`awm_jax.defenses.checkpointing`)."""
    start = time.perf_counter()
    data = validate_clean(clean, num_classes)
    layer = find_last_conv(model, variables, data["image"].shape[1:])
    prune_key, tune_key = jax.random.split(key)
    ones = jnp.ones((layer.channels,), jnp.float32)
    target = {"keep": ones, "ft": init_ft_state(
        variables, channel_mask(variables["params"], layer, ones))}
    with open_checkpointer(workdir, kind="fp", unit="steps (1: pruning, 1 + e: epoch e)",
                           config=config, key=key, data=data, variables=variables,
                           total_steps=1 + config.epochs, checkpoint_every=checkpoint_every,
                           max_to_keep=max_to_keep, resume=resume) as checkpointer:
        arrays, meta = checkpointer.restore(target)
        if arrays is None:
            keep, facts = _prune(model, variables, data, layer, prune_key, config)
            tune_state = init_ft_state(jax.tree_util.tree_map(jnp.array, variables),
                                       channel_mask(variables["params"], layer, keep))
            checkpointer.save(1, {"keep": keep, "ft": tune_state},
                              {"prune": facts, "history": []}, force=True)
            history, first = [], 0
        else:
            keep, tune_state, facts = arrays["keep"], arrays["ft"], meta["prune"]
            history, first = meta["history"], meta["step"] - 1
        prune_seconds = time.perf_counter() - start
        purified, history, seconds = finetune(
            model, variables, data, tune_key, config, on_epoch=on_epoch, progress=progress,
            desc="FP", state=tune_state, first_epoch=first, history=history,
            after_epoch=lambda done, s, h: checkpointer.save(
                1 + done, {"keep": keep, "ft": s}, {"prune": facts, "history": h}),
            checkpointer=checkpointer.run)
    details = {"layer": "/".join(layer.kernel_path), "batchnorm": "/".join(layer.bn_path or ()),
               "channels": layer.channels, **facts,
               "pruned_channels": np.flatnonzero(np.asarray(keep) == 0).tolist()}
    return DefenseResult(purified, history,
                         seconds + prune_seconds + checkpointer.seconds_before, details)


@DEFENSES.register("fp")
def fp() -> Defense:
    return Defense("fp", FPConfig, _purify)
