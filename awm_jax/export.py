"""Exporting a (purified) model: an orbax model directory, an ``.npz`` or a ``.safetensors`` file.

AWM's mask is already folded into the purified variables (``run_awm`` returns
``params * mask``), so an exported model is a plain model that any framework can load.

* ``"checkpoint"``: a model directory written by :func:`awm_jax.checkpoint.save_model`
  (orbax arrays + ``metadata.json``), loadable with :func:`awm_jax.checkpoint.load_model`.
* ``"npz"`` and ``"safetensors"``: one array per variable, named by its path, e.g.
  ``params/Conv_0/kernel`` (HWIO) or ``batch_stats/BatchNorm_0/mean``. The safetensors file also
  carries the model description (``metadata.json``'s ``model`` entry) as JSON under the
  ``awm_jax_model`` metadata key. :func:`load_npz` / :func:`load_safetensors` read them back
  into the variables of a given model, checking every name, shape and dtype.

Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.checkpoint import _RESERVED_KEYS, _abstract_variables, load_model, save_model
from awm_jax.serialization import write_atomic
from awm_jax.types import Variables

FORMATS = ("checkpoint", "npz", "safetensors")
MODEL_METADATA_KEY = "awm_jax_model"


def _name(path) -> str:
    return "/".join(str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path)


def flatten_variables(variables: Variables) -> dict[str, np.ndarray]:
    """``{"params/Conv_0/kernel": array, ...}``: every leaf as a host numpy array, by path."""
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return {_name(path): np.ascontiguousarray(np.asarray(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_variables(arrays: Mapping[str, np.ndarray], model: nn.Module,
                        image_shape: Sequence[int], source: str = "arrays") -> Variables:
    """Named arrays back into ``model``'s ``{"params", "batch_stats"}``.

    Args:
      arrays: ``{name: array}`` as :func:`flatten_variables` writes them.
      model: the module the arrays belong to.
      image_shape: ``(H, W, C)`` of its inputs (variable shapes may depend on it).
      source: what to call ``arrays`` in error messages (e.g. the file name).

    Raises:
      ValueError: a name the model expects is missing, a name is not one of the model's, or an
        array's shape or dtype differs from the model's.
    """
    target = _abstract_variables(model, image_shape)
    target = {"params": target["params"], "batch_stats": target.get("batch_stats", {})}
    expected = {_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = [f"{name}: missing" for name in sorted(set(expected) - set(arrays))]
    problems += [f"{name}: not a variable of the model" for name in
                 sorted(set(arrays) - set(expected))]
    problems += [f"{name}: shape/dtype {tuple(arrays[name].shape)} {arrays[name].dtype}, model "
                 f"expects {tuple(want.shape)} {np.dtype(want.dtype)}"
                 for name, want in sorted(expected.items()) if name in arrays and
                 (tuple(arrays[name].shape) != tuple(want.shape) or
                  np.dtype(arrays[name].dtype) != np.dtype(want.dtype))]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} in all)"
                                           if len(problems) > 6 else "")
        raise ValueError(f"{source} does not match the model's variables ({shown}).")
    return jax.tree_util.tree_map_with_path(lambda path, _: jnp.asarray(arrays[_name(path)]),
                                            target)


def save_npz(variables: Variables, path: str | os.PathLike) -> Path:
    """Writes every variable to an uncompressed ``.npz`` under its path name."""
    arrays = flatten_variables(variables)

    def write(tmp):
        with open(tmp, "wb") as handle:  # a file object: numpy adds no ".npz" to the name
            np.savez(handle, **arrays)

    return write_atomic(Path(path), write)


def save_safetensors(variables: Variables, path: str | os.PathLike,
                     model_spec: Mapping[str, Any] | None = None) -> Path:
    """Writes every variable to a ``.safetensors`` file under its path name.

    Args:
      model_spec: optional model description (``{"name", "kwargs", "num_classes",
        "image_shape"}``), stored as JSON in the file's metadata.
    """
    from safetensors.numpy import save_file

    arrays = flatten_variables(variables)
    metadata = None if model_spec is None else {MODEL_METADATA_KEY: json.dumps(model_spec)}
    return write_atomic(Path(path), lambda tmp: save_file(arrays, tmp, metadata=metadata))


def load_npz(path: str | os.PathLike, model: nn.Module,
             image_shape: Sequence[int]) -> Variables:
    """Reads an ``.npz`` written by :func:`save_npz` into ``model``'s variables.

    Raises:
      ValueError: the file is missing or unreadable, or its names/shapes/dtypes differ from the
        model's (see :func:`unflatten_variables`).
    """
    try:
        with np.load(os.fspath(path), allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the npz file {path}: {err}") from err
    return unflatten_variables(arrays, model, image_shape, source=f"the npz file {path}")


def load_safetensors(path: str | os.PathLike, model: nn.Module,
                     image_shape: Sequence[int]) -> Variables:
    """Reads a ``.safetensors`` file written by :func:`save_safetensors` into ``model``'s
    variables.

    Raises:
      ValueError: the file is missing or unreadable, or its names/shapes/dtypes differ from the
        model's (see :func:`unflatten_variables`).
    """
    from safetensors.numpy import load_file

    try:
        arrays = load_file(os.fspath(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files.
        raise ValueError(f"cannot read the safetensors file {path}: {err}") from err
    return unflatten_variables(arrays, model, image_shape,
                               source=f"the safetensors file {path}")


def export_model(out: str | os.PathLike, fmt: str, variables: Variables,
                 model_spec: Mapping[str, Any],
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Writes a model's variables (a purified model: mask already folded in) as ``fmt``.

    Args:
      out: the file (``"npz"``, ``"safetensors"``) or directory (``"checkpoint"``) to write.
      fmt: one of :data:`FORMATS`.
      variables: ``{"params", "batch_stats"}``.
      model_spec: ``{"name", "kwargs", "num_classes", "image_shape"}`` (``metadata.json``'s
        ``model`` entry): checked against ``variables`` for ``"checkpoint"``, stored in the
        safetensors metadata, unused for ``"npz"``.
      metadata: provenance for ``"checkpoint"`` (see :func:`awm_jax.checkpoint.save_model`).

    Returns:
      The path written.

    Raises:
      ValueError: an unknown format, or (``"checkpoint"``) variables that do not fit the model.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}; got {fmt!r}.")
    if fmt == "npz":
        return save_npz(variables, out)
    if fmt == "safetensors":
        return save_safetensors(variables, out, model_spec)
    return Path(save_model(out, model_spec["name"], model_spec["kwargs"],
                           model_spec["num_classes"], model_spec["image_shape"], variables,
                           metadata))


def export_checkpoint(checkpoint: str | os.PathLike, fmt: str,
                      out: str | os.PathLike) -> Path:
    """Exports a model directory (e.g. ``purify``'s ``purified/``) as ``fmt``.

    Args:
      checkpoint: a model directory written by :func:`awm_jax.checkpoint.save_model`.
      fmt: ``"npz"``, ``"safetensors"`` or ``"checkpoint"`` (a verified copy as a new model
        directory, keeping the provenance).
      out: the file (or, for ``"checkpoint"``, the directory) to write.

    Returns:
      The path written.

    Raises:
      ValueError: an unknown format, or an unloadable checkpoint.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}; got {fmt!r}.")
    _, variables, metadata = load_model(checkpoint)
    provenance = {k: v for k, v in metadata.items() if k not in _RESERVED_KEYS}
    provenance["exported_from"] = os.path.abspath(checkpoint)
    return export_model(out, fmt, variables, metadata["model"], provenance)
