"""Load PyTorch ``state_dict``s of the reference CIFAR networks into our Flax variables.

Supported layouts (each model module's docstring tabulates its names):

* ``resnet18``: kuangliu's CIFAR ResNet-18, which the official AWM code uses
  (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``layer2.0.shortcut.0/1``, ``linear``);
* ``preact_resnet18``: BackdoorBench's ``PreActResNet18`` (``shortcut.0`` is a bare conv);
* ``small_vgg``: the official code's small VGG (``features.<i>``, ``classifier``).

Conversions: conv weights OIHW -> HWIO; Linear ``[out, in]`` -> ``[in, out]`` (for the VGG also
from PyTorch's (C, H, W) flatten order to our (H, W, C) order); BatchNorm ``weight``/``bias``/
``running_mean``/``running_var`` -> ``scale``/``bias`` (params) and ``mean``/``var``
(batch_stats); ``num_batches_tracked`` has no counterpart and is skipped.

PyTorch is optional (``pip install 'awm-jax[torch]'``): it is imported only to read a
``.pth``/``.pt`` file. A mapping of names to numpy arrays (or to tensors), or an ``.npz`` of them,
needs no PyTorch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from awm_jax.models import create_model, init_variables
from awm_jax.types import Variables

SUPPORTED_MODELS = ("preact_resnet18", "resnet18", "small_vgg")
# Checkpoint files often wrap the state_dict: {"net": ...} (kuangliu), {"model": ...}
# (BackdoorBench), {"state_dict": ...} (Lightning and many scripts).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_SKIPPED_SUFFIX = "num_batches_tracked"
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "bias"): "bias",
               ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}
_RESNET_BLOCK_PARTS = {"conv1": "conv1", "bn1": "bn1", "conv2": "conv2", "bn2": "bn2",
                       "shortcut_conv": "shortcut.0", "shortcut_bn": "shortcut.1"}
_RESNET_TOP = {"stem_conv": "conv1", "stem_bn": "bn1", "linear": "linear"}
_STEM = {"resnet18": "conv1", "preact_resnet18": "conv1", "small_vgg": "features.0"}
_HEAD = {"resnet18": "linear", "preact_resnet18": "linear", "small_vgg": "classifier"}
TORCH_HINT = ("pip install 'awm-jax[torch]' (the CPU wheel: pip install torch --index-url "
              "https://download.pytorch.org/whl/cpu), or, where PyTorch is installed, save the "
              "state_dict as numpy arrays once: np.savez('weights.npz', **{k: v.numpy() for k, v "
              "in state_dict.items()}) and pass the .npz")


def _resnet_module(path: Sequence[str]) -> str:
    if len(path) == 1 and path[0] in _RESNET_TOP:
        return _RESNET_TOP[path[0]]
    match = re.fullmatch(r"layer(\d)_block(\d)", path[0])
    if match and len(path) == 2 and path[1] in _RESNET_BLOCK_PARTS:
        return f"layer{match[1]}.{match[2]}.{_RESNET_BLOCK_PARTS[path[1]]}"
    raise KeyError("/".join(path))


def _vgg_module(path: Sequence[str]) -> str:
    if tuple(path) == ("linear",):
        return "classifier"
    match = re.fullmatch(r"stage(\d)_(conv|bn)(\d)", path[0])
    if not match or len(path) != 1:
        raise KeyError("/".join(path))
    # features is [conv, BN, ELU] x2 + [max-pool, dropout] per stage: conv k sits at 3k + 2(k//2).
    conv = 2 * (int(match[1]) - 1) + int(match[3]) - 1
    return f"features.{3 * conv + 2 * (conv // 2) + (match[2] == 'bn')}"


_MODULE_NAMES = {"resnet18": _resnet_module, "preact_resnet18": _resnet_module,
                 "small_vgg": _vgg_module}


def torch_name(model_name: str, collection: str, path: Sequence[str]) -> str:
    """The PyTorch ``state_dict`` key of our variable ``collection/path``.

    Example: ``torch_name("resnet18", "batch_stats", ("stem_bn", "mean")) == "bn1.running_mean"``.

    Raises:
      ValueError: ``model_name`` has no PyTorch layout here.
      KeyError: the path is not a variable of that model.
    """
    _check_supported(model_name)
    module = _MODULE_NAMES[model_name](tuple(path[:-1]))
    return f"{module}.{_LEAF_NAMES[(collection, path[-1])]}"


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Reads a state_dict into ``{name: numpy array}``.

    Args:
      source: a ``.pth``/``.pt`` file (needs PyTorch), an ``.npz`` of arrays, or a mapping of
        names to tensors or arrays. A wrapper such as ``{"net": state_dict, "acc": ...}`` is
        unwrapped and a ``module.`` prefix (``DataParallel``) is removed.

    Raises:
      FileNotFoundError: the file does not exist.
      ImportError: a PyTorch file but PyTorch is not installed (the message says how to get it).
      ValueError: the file is not a readable state_dict, or a value is not an array.
    """
    if isinstance(source, Mapping):
        raw = source
    else:
        raw = _load_file(Path(source).expanduser())
    for key in _WRAPPER_KEYS:
        if isinstance(raw.get(key), Mapping):
            raw = raw[key]
            break
    names = list(raw)
    if names and all(str(name).startswith("module.") for name in names):
        raw = {str(name)[len("module."):]: value for name, value in raw.items()}
    return {str(name): _to_numpy(str(name), value) for name, value in raw.items()}


def _load_file(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"PyTorch state_dict file {path} does not exist.")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"reading {path} needs PyTorch ({err}): {TORCH_HINT}.") from err
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors have no common type.
        raise ValueError(f"{path} is not a readable PyTorch state_dict "
                         f"({type(err).__name__}: {err}).") from err
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state_dict; save "
                         "model.state_dict() rather than the model.")
    return loaded


def _to_numpy(name: str, value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, read without importing torch here.
        value = value.detach().cpu()
        if not value.dtype.is_floating_point or value.element_size() >= 4:
            return value.numpy()
        return value.float().numpy()  # bfloat16/half have no (or a lossy) numpy view.
    array = np.asarray(value)
    if array.dtype == object:
        raise ValueError(f"state_dict entry {name!r} is a {type(value).__name__}, not an array.")
    return array


def import_state_dict(source: str | os.PathLike | Mapping[str, Any], model_name: str, *,
                      num_classes: int | None = None, image_shape: Sequence[int] | None = None,
                      **model_kwargs) -> tuple[nn.Module, Variables]:
    """Builds ``model_name`` and fills its variables from a PyTorch state_dict.

    Args:
      source: see :func:`read_state_dict`.
      model_name: one of :data:`SUPPORTED_MODELS`.
      num_classes: defaults to the rows of the head's weight.
      image_shape: ``(H, W, C)`` the model will see; defaults to 32x32 with the stem conv's
        input channels. The VGG's head depends on H and W.
      **model_kwargs: more model arguments (``mean``/``std``, ...); ``width`` defaults to the
        stem conv's output channels.

    Returns:
      ``(model, {"params", "batch_stats"})`` with float32 numpy leaves, ready for
      :func:`awm_jax.models.apply_model` or :func:`awm_jax.checkpoint.save_model`.

    Raises:
      ValueError: unsupported model; missing, unexpected or wrongly shaped keys (all listed, in
        PyTorch names and layouts).
      FileNotFoundError, ImportError: see :func:`read_state_dict`.
    """
    model, variables, _ = _import(source, model_name, num_classes, image_shape, model_kwargs)
    return model, variables


def save_imported(source: str | os.PathLike | Mapping[str, Any], model_name: str,
                  directory: str | os.PathLike, *, num_classes: int | None = None,
                  image_shape: Sequence[int] | None = None, overwrite: bool = False,
                  **model_kwargs) -> str:
    """:func:`import_state_dict`, then :func:`awm_jax.checkpoint.save_model` into ``directory``.

    The model directory records the source file under ``metadata["source"]``; it has no dataset
    or attack entry, so ``awm-jax purify`` needs ``--dataset`` for it.

    Returns:
      The absolute path of ``directory``.
    """
    from awm_jax.checkpoint import save_model

    model, variables, image_shape = _import(source, model_name, num_classes, image_shape,
                                            model_kwargs)
    origin = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<mapping>"
    return save_model(directory, model_name, model_kwargs, model.num_classes, image_shape,
                      variables, {"source": {"state_dict": origin, "format": "pytorch"}},
                      overwrite=overwrite)


def _import(source, model_name: str, num_classes: int | None, image_shape, model_kwargs: dict):
    """Shared by the public entry points; fills in ``model_kwargs["width"]`` when inferred."""
    _check_supported(model_name)
    state = read_state_dict(source)
    stem, head = state.get(f"{_STEM[model_name]}.weight"), state.get(f"{_HEAD[model_name]}.weight")
    if num_classes is None and head is not None and head.ndim == 2:
        num_classes = int(head.shape[0])
    if stem is not None and stem.ndim == 4:
        model_kwargs.setdefault("width", int(stem.shape[0]))
        image_shape = image_shape or (32, 32, int(stem.shape[1]))
    if num_classes is None:
        raise ValueError(f"the state_dict has no {_HEAD[model_name]}.weight to read the number "
                         "of classes from; pass num_classes=.")
    image_shape = tuple(image_shape or (32, 32, 3))
    model = create_model(model_name, num_classes, **model_kwargs)
    target = jax.eval_shape(lambda key: init_variables(model, key, image_shape),
                            jax.random.key(0))
    used: set[str] = set()
    missing: list[str] = []
    reshaped: list[str] = []

    def fill(path, leaf):
        keys = [entry.key for entry in path]
        name = torch_name(model_name, keys[0], keys[1:])
        used.add(name)
        if name not in state:
            missing.append(f"missing {name}")
            return None
        convert, torch_shape = _conversion(model_name, keys[-1], leaf.shape, image_shape)
        if tuple(state[name].shape) != torch_shape:
            reshaped.append(f"{name} has shape {tuple(state[name].shape)}, expected {torch_shape}")
            return None
        return np.ascontiguousarray(convert(state[name]), dtype=leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(fill, target)
    unexpected = [f"unexpected {name}" for name in sorted(set(state) - used)
                  if not name.endswith(_SKIPPED_SUFFIX)]
    if missing or unexpected or reshaped:
        problems = sorted(missing) + unexpected + sorted(reshaped)
        shown = "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else "")
        settings = ", ".join(f"{k}={v}" for k, v in sorted(model_kwargs.items()))
        raise ValueError(
            f"the state_dict does not fit {model_name}(num_classes={num_classes}, {settings}) "
            f"on {image_shape} images ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(reshaped)} wrongly shaped keys): {shown}. Check the model name (supported: "
            f"{', '.join(SUPPORTED_MODELS)}), width, num_classes and image_shape.")
    return model, {"params": variables["params"],
                   "batch_stats": variables["batch_stats"]}, image_shape


def _conversion(model_name: str, leaf: str, shape: tuple[int, ...], image_shape):
    """``(torch array -> our array, the PyTorch shape expected)`` for one leaf of ``shape``."""
    if leaf == "kernel" and len(shape) == 4:  # HWIO <- OIHW
        height, width, inputs, outputs = shape
        return (lambda w: w.transpose(2, 3, 1, 0)), (outputs, inputs, height, width)
    if leaf == "kernel" and len(shape) == 2:
        inputs, outputs = shape
        if model_name != "small_vgg":
            return (lambda w: w.T), (outputs, inputs)
        # The VGG flattens [H', W', C] maps; PyTorch flattened the same maps as [C, H', W'].
        rows, cols = image_shape[0] // 8, image_shape[1] // 8
        channels = inputs // (rows * cols)
        return (lambda w: w.reshape(outputs, channels, rows, cols).transpose(2, 3, 1, 0)
                .reshape(inputs, outputs)), (outputs, inputs)
    return (lambda w: w), tuple(shape)


def _check_supported(model_name: str) -> None:
    if model_name not in SUPPORTED_MODELS:
        raise ValueError(f"no PyTorch layout for model {model_name!r}; supported: "
                         f"{', '.join(SUPPORTED_MODELS)}.")
