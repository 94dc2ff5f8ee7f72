"""One entry point, :func:`load_dataset`, from a source string to an :class:`ImageDataset`."""

from __future__ import annotations

from awm_jax.data.dataset import ImageDataset
from awm_jax.data.digits import load_digits

EMBEDDED_DATASETS = {"digits": load_digits}


def load_dataset(source: str, **kwargs) -> ImageDataset:
    """Loads a dataset by name.

    Args:
      source: ``"digits"`` (embedded, offline).
      **kwargs: passed to the loader (e.g. ``size`` for digits).

    Raises:
      ValueError: the source is not known.
    """
    if source in EMBEDDED_DATASETS:
        return EMBEDDED_DATASETS[source](**kwargs)
    raise ValueError(
        f"unknown dataset source {source!r}; known embedded datasets: "
        f"{', '.join(sorted(EMBEDDED_DATASETS))}.")
