"""Soft weight masks: a pytree mirroring the params, ``None`` where a leaf is not masked.

AWM multiplies selected weights elementwise by a mask ``m`` in ``[0, 1]`` (awm-paper.md 1.1).
The official code masks every convolution kernel (stem, 3x3 and 1x1 shortcut convs) and leaves
the final linear layer, BatchNorm and biases alone; that is our default (``scope="conv"``).
``scope="conv_dense"`` also masks dense kernels.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.types import Array, Mask, Params

PathPredicate = Callable[[tuple[str, ...], Array], bool]


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path)


def is_conv_kernel(path: tuple[str, ...], leaf: Array) -> bool:
    """True for convolution kernels (``kernel`` leaves of rank 4, HWIO)."""
    return path[-1] == "kernel" and leaf.ndim == 4


def is_conv_or_dense_kernel(path: tuple[str, ...], leaf: Array) -> bool:
    """True for convolution kernels and dense kernels (``kernel`` leaves of rank 2)."""
    return path[-1] == "kernel" and leaf.ndim in (2, 4)


MASK_SCOPES: dict[str, PathPredicate] = {
    "conv": is_conv_kernel,
    "conv_dense": is_conv_or_dense_kernel,
}


def _is_none(x) -> bool:
    return x is None


def create_mask(params: Params, scope: str | PathPredicate = "conv") -> Mask:
    """A mask of ones for every leaf selected by ``scope``, ``None`` elsewhere.

    Args:
      params: the model's parameter pytree.
      scope: ``"conv"`` (official default), ``"conv_dense"``, or a predicate
        ``(path_names, leaf) -> bool``.

    Raises:
      ValueError: unknown scope name, or the scope selects no leaf.
    """
    if isinstance(scope, str):
        if scope not in MASK_SCOPES:
            raise ValueError(f"unknown mask scope {scope!r}; known: {', '.join(MASK_SCOPES)}.")
        predicate = MASK_SCOPES[scope]
    else:
        predicate = scope
    mask = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.ones_like(leaf) if predicate(_path_names(path), leaf) else None,
        params)
    if not jax.tree_util.tree_leaves(mask):
        raise ValueError(f"mask scope {scope!r} selects no parameter of this model.")
    return mask


def apply_mask(params: Params, mask: Mask) -> Params:
    """``params * clip(mask, 0, 1)`` on masked leaves; other leaves pass through unchanged."""
    return jax.tree_util.tree_map(
        lambda m, p: p if m is None else p * jnp.clip(m, 0.0, 1.0).astype(p.dtype),
        mask, params, is_leaf=_is_none)


def clip_mask(mask: Mask) -> Mask:
    """Projects every mask entry onto [0, 1]."""
    return jax.tree_util.tree_map(lambda m: jnp.clip(m, 0.0, 1.0), mask)


def mask_l1(mask: Mask) -> Array:
    """``sum |m|`` over all entries of all masked leaves (the official code's unnormalised L1)."""
    return sum(jnp.sum(jnp.abs(m)) for m in jax.tree_util.tree_leaves(mask))


def mask_size(mask: Mask) -> int:
    """Number of masked weights."""
    return int(sum(np.prod(m.shape) for m in jax.tree_util.tree_leaves(mask)))


def mask_statistics(mask: Mask, thresholds=(0.01, 0.5, 0.99)) -> dict[str, float]:
    """Summary of a mask: size, mean, L1, and the fraction of entries below each threshold."""
    leaves = [np.asarray(m).ravel() for m in jax.tree_util.tree_leaves(mask)]
    flat = np.concatenate(leaves) if leaves else np.zeros(0)
    stats = {"size": float(flat.size), "mean": float(flat.mean()) if flat.size else float("nan"),
             "l1": float(np.abs(flat).sum())}
    for threshold in thresholds:
        stats[f"frac_below_{threshold:g}"] = float(np.mean(flat < threshold)) if flat.size else 0.0
    return stats


def fold_mask(params: Params, mask: Mask) -> Params:
    """Plain params with the (clipped) mask multiplied in, for export or evaluation."""
    return apply_mask(params, mask)
