"""Saving and loading trained models: an orbax checkpoint of the variables plus ``metadata.json``.

A model directory holds

* ``variables/``: an orbax checkpoint of ``{"params", "batch_stats"}`` (orbax writes it to a
  temporary directory and renames it when complete);
* ``metadata.json``: how to rebuild the model (registry name, keyword arguments, number of
  classes, image shape) plus the caller's provenance (dataset, attack, seed, training config,
  metrics), library versions, the machine (:mod:`awm_jax.machine`) and the creation time.

``metadata.json`` is written last, through a temporary file and ``os.replace``, so it doubles as
the commit marker: a directory without it is an unfinished save and does not load.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from awm_jax.machine import describe_machine
from awm_jax.models import create_model, init_variables
from awm_jax.serialization import as_tuples, json_default, library_versions, write_json_atomic
from awm_jax.types import Variables

METADATA_FILE = "metadata.json"
VARIABLES_DIR = "variables"
FORMAT_VERSION = 1
_RESERVED_KEYS = ("format_version", "model", "variables_sha256", "versions", "machine",
                  "created")


def variables_digest(variables: Variables) -> str:
    """SHA-256 over every array's path, dtype, shape and bytes, in sorted path order.

    Orbax does not checksum array data (zeroing bytes of a stored array restores silently), so
    the digest in metadata.json is what detects a corrupted checkpoint.
    """
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _abstract_variables(model: nn.Module, image_shape: Sequence[int]) -> Variables:
    """The ``jax.ShapeDtypeStruct`` tree of ``model``'s variables, placed on the first device."""
    shapes = jax.eval_shape(lambda key: init_variables(model, key, tuple(image_shape)),
                            jax.random.key(0))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        shapes)


def _describe_mismatch(expected: Any, actual: Any) -> list[str]:
    """Differences in paths, shapes and dtypes between two trees of array-likes."""

    def table(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): (tuple(leaf.shape), np.dtype(leaf.dtype))
                for path, leaf in leaves}

    want, have = table(expected), table(actual)
    problems = [f"{p}: missing" for p in sorted(set(want) - set(have))]
    problems += [f"{p}: unexpected" for p in sorted(set(have) - set(want))]
    problems += [f"{p}: shape/dtype {have[p][0]} {have[p][1]}, model expects {want[p][0]} "
                 f"{want[p][1]}" for p in sorted(set(want) & set(have)) if want[p] != have[p]]
    return problems


def _mismatch_error(what: str, problems: list[str]) -> ValueError:
    shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5
                                       else "")
    return ValueError(f"{what} do not match the model built from its config ({shown}). Was the "
                      "model name, model_kwargs, num_classes or image_shape changed?")


def _metadata_record(model_name: str, model_kwargs: Mapping[str, Any], num_classes: int,
                     image_shape: Sequence[int],
                     metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The metadata.json content, passed through JSON so it is exactly what a load reads back."""
    metadata = dict(metadata or {})
    reserved = sorted(set(metadata) & set(_RESERVED_KEYS))
    if reserved:
        raise ValueError(f"metadata must not use the reserved keys {reserved}; save_model "
                         "fills them in.")
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C); got {tuple(image_shape)}.")
    record = {
        **metadata,
        "format_version": FORMAT_VERSION,
        "model": {"name": model_name, "kwargs": dict(model_kwargs),
                  "num_classes": int(num_classes), "image_shape": [int(s) for s in image_shape]},
        "versions": library_versions(),
        "machine": describe_machine(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        return json.loads(json.dumps(record, default=json_default))
    except (TypeError, ValueError) as err:
        raise ValueError(f"model_kwargs and metadata must be JSON-serialisable: {err}.") from err


def _brief(err: Exception, limit: int = 300) -> str:
    """The first line of an orbax/TensorStore error (their full text dumps the whole spec)."""
    text = (str(err).strip().splitlines() or [""])[0]
    text = text.split(" See full TensorStore details")[0]
    return f"{type(err).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _build_model(spec: Mapping[str, Any], directory: str) -> nn.Module:
    try:
        return create_model(spec["name"], int(spec["num_classes"]), **as_tuples(spec["kwargs"]))
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot build the model {spec} for {directory}: {err}") from err


def save_model(directory: str | os.PathLike, model_name: str, model_kwargs: Mapping[str, Any],
               num_classes: int, image_shape: Sequence[int], variables: Variables,
               metadata: Mapping[str, Any] | None = None, *, overwrite: bool = False) -> str:
    """Writes ``variables`` and ``metadata.json`` to ``directory``.

    Args:
      directory: the model directory (created if missing).
      model_name: registered model name; with ``model_kwargs`` and ``num_classes`` it must build
        a model whose variables have exactly the shapes of ``variables``.
      model_kwargs: JSON-serialisable keyword arguments of the model.
      num_classes: number of output classes.
      image_shape: ``(H, W, C)`` of the inputs.
      variables: ``{"params", "batch_stats"}`` arrays.
      metadata: provenance to store alongside (dataset, attack, seed, train config, metrics...);
        must be JSON-serialisable and must not use the keys ``format_version``, ``model``,
        ``variables_sha256``, ``versions``, ``machine`` or ``created``, which this function
        fills in.
      overwrite: replace a model already saved in ``directory``.

    Returns:
      The absolute path of ``directory``.

    Raises:
      ValueError: a model already exists there and ``overwrite`` is False; ``variables`` do not
        match the model; ``model_kwargs`` or ``metadata`` are not JSON-serialisable or use a
        reserved key; or orbax failed to write.
    """
    directory = os.path.abspath(os.fspath(directory))
    record = _metadata_record(model_name, model_kwargs, num_classes, image_shape, metadata)
    # Refuse to write a checkpoint that load_model could not rebuild.
    model = _build_model(record["model"], directory)
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a mapping {'params': ..., 'batch_stats': ...}; got "
                         f"{type(variables).__name__} with keys {list(variables)[:5]}.")
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    problems = _describe_mismatch(_abstract_variables(model, image_shape), variables)
    if problems:
        raise _mismatch_error(f"variables passed to save_model for {directory}", problems)
    record["variables_sha256"] = variables_digest(variables)

    metadata_path = os.path.join(directory, METADATA_FILE)
    variables_path = os.path.join(directory, VARIABLES_DIR)
    if not overwrite and (os.path.exists(metadata_path) or os.path.exists(variables_path)):
        raise ValueError(f"{directory} already holds a model; pass overwrite=True to replace it "
                         "or choose another directory.")
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(metadata_path):
        # Un-commit first: a crash mid-overwrite must not pair old metadata with new weights.
        os.remove(metadata_path)
    try:
        # The synchronous Checkpointer: the save is complete (and renamed into place) on return.
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            checkpointer.save(variables_path, args=ocp.args.StandardSave(variables),
                              force=overwrite)
    except Exception as err:  # orbax/tensorstore raise many types; report them in one place.
        raise ValueError(f"could not write the checkpoint in {directory}: {err}") from err
    write_json_atomic(metadata_path, record, sort_keys=True)
    return directory


def load_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks ``metadata.json`` of a model directory.

    Raises:
      ValueError: the directory or its metadata.json is missing, the JSON is corrupt, or it
        lacks the model description.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise ValueError(f"model directory {directory} does not exist; pass a directory "
                         "written by save_model (awm-jax train-backdoor --out DIR).")
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory} has no {METADATA_FILE}: it is not a model directory, or "
                         "its save did not finish.")
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt.") from err
    model = metadata.get("model") if isinstance(metadata, dict) else None
    needed = ("name", "kwargs", "num_classes", "image_shape")
    if not isinstance(model, dict) or any(k not in model for k in needed):
        raise ValueError(f"{path} lacks the model description: expected a 'model' entry with "
                         f"keys {list(needed)}.")
    return metadata


def load_model(directory: str | os.PathLike) -> tuple[nn.Module, Variables, dict[str, Any]]:
    """Rebuilds the model described by ``metadata.json`` and restores its variables.

    The variables are restored into the ``jax.eval_shape`` of the rebuilt model's variables, so
    a checkpoint whose arrays do not fit the described model is rejected before any data is read.

    Returns:
      ``(model, variables, metadata)`` with ``variables = {"params", "batch_stats"}`` as arrays on
      the first device.

    Raises:
      ValueError: missing directory, missing or corrupt metadata.json, an unbuildable model
        description, a missing, truncated or corrupt checkpoint, or arrays whose paths, shapes or
        dtypes differ from the model's.
    """
    directory = os.path.abspath(os.fspath(directory))
    metadata = load_metadata(directory)
    model = _build_model(metadata["model"], directory)
    target = _abstract_variables(model, metadata["model"]["image_shape"])
    path = os.path.join(directory, VARIABLES_DIR)
    if not os.path.isdir(path):
        raise ValueError(f"{directory} has {METADATA_FILE} but no {VARIABLES_DIR}/ checkpoint; "
                         "the directory is incomplete: save the model again.")
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        try:
            stored = checkpointer.metadata(path).item_metadata
        except Exception as err:  # orbax/tensorstore raise many types; report them in one place.
            raise ValueError(f"the checkpoint in {path} is unreadable or corrupt; save the "
                             f"model again or restore it from a copy: {_brief(err)}") from err
        if stored is None:  # orbax logs a warning and returns no tree when its files are bad.
            raise ValueError(f"the checkpoint in {path} is truncated or corrupt: orbax could not "
                             "read its array metadata. Save the model again or restore it from "
                             "a copy.")
        stored = stored.tree
        problems = _describe_mismatch(target, stored)
        if problems:
            raise _mismatch_error(f"the arrays stored in {path}", problems)
        try:
            variables = checkpointer.restore(path, args=ocp.args.StandardRestore(target))
        except Exception as err:
            raise ValueError(f"the checkpoint in {path} is truncated or corrupt; save the "
                             f"model again or restore it from a copy: {_brief(err)}") from err
    expected = metadata.get("variables_sha256")
    if expected is not None and variables_digest(variables) != expected:
        raise ValueError(f"the checkpoint in {path} is corrupt: its arrays do not match the "
                         f"SHA-256 recorded in {METADATA_FILE}. Restore it from a copy or save "
                         "the model again.")
    return model, variables, metadata
