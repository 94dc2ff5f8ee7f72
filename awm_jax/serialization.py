"""JSON helpers shared by checkpoints, configs and reports: atomic writes, tuples, versions."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries whose behaviour a saved result depends on."""
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def json_default(value: Any) -> Any:
    """Lets numpy/JAX scalars and arrays, tuples and sets into JSON."""
    if isinstance(value, np.generic) or hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def as_tuples(value: Any) -> Any:
    """JSON lists back to tuples, recursively: frozen configs and linen attributes use tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(as_tuples(v) for v in value)
    if isinstance(value, Mapping):
        return {str(k): as_tuples(v) for k, v in value.items()}
    return value


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Calls ``write(tmp_path)`` on a temporary file beside ``path``, then renames it onto
    ``path``, so a crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any],
                      sort_keys: bool = False) -> Path:
    """Writes ``data`` as indented JSON atomically (see :func:`write_atomic`), fsynced."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=sort_keys, default=json_default)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())

    return write_atomic(path, write)
