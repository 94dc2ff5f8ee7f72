"""The device mesh of a sweep: axes ``("sweep", "data")``, members sharded over ``"sweep"``.

Sweep members are independent, so sharding the member axis over devices splits the work with no
communication; the frozen weights are replicated. The defender's clean set can optionally be
split over ``"data"`` (its batch draws become gathers across that axis, which XLA handles).

The axes are ``AxisType.Auto``: ``jax.jit`` propagates the input shardings (GSPMD) and the
step functions stay sharding-agnostic. A member count that the ``"sweep"`` axis does not divide
is an error here; :func:`awm_jax.sweep.runner.run_sweep` avoids it by padding its chunks with
copies of the last member, whose results it drops.

The mesh may span processes (:mod:`awm_jax.sweep.distributed`): ``jax.devices()`` then lists
every process's devices, ordered by process, so the ``"sweep"`` axis runs across hosts. Every
process holds the same host copy of the inputs and :func:`put` builds the global arrays with
``jax.make_array_from_callback``, each process handing over only the slices of its own devices;
:func:`to_host` gathers results back (``process_allgather``) so every process sees them whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("sweep", "data")


def make_sweep_mesh(sweep: int | None = None, data: int = 1,
                    devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(sweep, data)`` mesh over the devices present.

    Args:
      sweep: size of the member axis (default: all devices divided by ``data``).
      data: size of the clean-data axis (default 1: data replicated).
      devices: devices to use (default: ``jax.devices()``).

    Raises:
      ValueError: the sizes are not positive or need more devices than there are.
    """
    devices = list(devices if devices is not None else jax.devices())
    if data < 1:
        raise ValueError(f"data axis size must be >= 1; got {data}.")
    if sweep is None:
        sweep = max(1, len(devices) // data)
    if sweep < 1 or sweep * data > len(devices):
        raise ValueError(f"a ({sweep} sweep x {data} data) mesh needs {sweep * data} devices; "
                         f"{len(devices)} present.")
    return jax.make_mesh((sweep, data), AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices[:sweep * data])


def sweep_size(mesh: Mesh | None) -> int:
    """Devices along ``"sweep"`` (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.shape["sweep"])


def check_divisible(count: int, size: int, what: str, axis: str) -> None:
    if count % size:
        raise ValueError(f"{what} ({count}) must be divisible by the {axis!r} mesh axis size "
                         f"({size}); pad it or choose another mesh.")


def shard_members(tree: Any, mesh: Mesh | None) -> Any:
    """Places every leaf's leading (member) axis over ``"sweep"``.

    Raises:
      ValueError: the member count is not divisible by the ``"sweep"`` axis size.
    """
    if mesh is None:
        return tree
    for leaf in jax.tree_util.tree_leaves(tree):
        check_divisible(leaf.shape[0], sweep_size(mesh), "the number of sweep members", "sweep")
    return put(tree, NamedSharding(mesh, PartitionSpec("sweep")))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Copies ``tree`` onto every device of ``mesh``."""
    if mesh is None:
        return tree
    return put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_data(data: dict, mesh: Mesh | None) -> dict:
    """Splits the clean set's leading (image) axis over ``"data"`` (replicated if size 1).

    Raises:
      ValueError: the image count is not divisible by the ``"data"`` axis size.
    """
    if mesh is None:
        return data
    size = int(mesh.shape["data"])
    if size == 1:
        return replicate(data, mesh)
    check_divisible(int(data["label"].shape[0]), size, "the number of clean images", "data")
    return put(data, NamedSharding(mesh, PartitionSpec("data")))


def put(tree: Any, sharding: NamedSharding) -> Any:
    """``jax.device_put(tree, sharding)``, also when ``sharding`` spans other processes' devices.

    Every process must pass the same values (each builds the same inputs from the same seeds);
    a process then supplies only the slices that its own devices hold. PRNG key arrays travel
    as their raw key data.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(lambda leaf: _put_global(leaf, sharding), tree)


def _put_global(leaf, sharding: NamedSharding) -> jax.Array:
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
        data = _put_global(jax.random.key_data(leaf), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(tree: Any) -> Any:
    """Every leaf as a numpy array, gathered from all processes where it spans several."""
    def gather(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)
    return jax.tree_util.tree_map(gather, tree)
