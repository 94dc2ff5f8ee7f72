"""The device mesh of a sweep: axes ``("sweep", "data")``, members sharded over ``"sweep"``.

Sweep members are independent, so sharding the member axis over devices splits the work with no
communication; the frozen weights are replicated. The defender's clean set can optionally be
split over ``"data"`` (its batch draws become gathers across that axis, which XLA handles).

The axes are ``AxisType.Auto``: ``jax.jit`` propagates the input shardings (GSPMD) and the
step functions stay sharding-agnostic. A member count that the ``"sweep"`` axis does not divide
is an error here; :func:`awm_jax.sweep.runner.run_sweep` avoids it by padding its chunks with
copies of the last member, whose results it drops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
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
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec("sweep")))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Copies ``tree`` onto every device of ``mesh``."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


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
    return jax.device_put(data, NamedSharding(mesh, PartitionSpec("data")))
