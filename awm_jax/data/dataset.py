"""In-memory image datasets that satisfy the batch contract of :mod:`awm_jax.types`."""

from __future__ import annotations

import dataclasses

import numpy as np

from awm_jax.types import validate_images, validate_labels


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes:
      images: ``float32[N, H, W, C]`` in ``[0, 1]``.
      labels: ``int32[N]``.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> "Split":
        indices = np.asarray(indices)
        return Split(self.images[indices], self.labels[indices])

    def as_batch(self) -> dict[str, np.ndarray]:
        return {"image": self.images, "label": self.labels}


def make_split(images, labels, num_classes: int, name: str = "split") -> Split:
    """Validates ``images``/``labels`` against the batch contract and wraps them in a Split.

    Raises:
      ValueError: see :func:`awm_jax.types.validate_images` and ``validate_labels``.
    """
    images = validate_images(images, f"{name} images")
    labels = validate_labels(labels, num_classes, count=images.shape[0], name=f"{name} labels")
    return Split(images, labels)


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """A classification dataset with a train and a test split.

    Attributes:
      name: where it came from (a TFDS name, a path, or an embedded name).
      train: the training split (what an attacker poisons).
      test: the test split (the defender's clean images are drawn from it, the rest evaluates).
      class_names: one name per class, in label order.
    """

    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def class_counts(self, split: str = "train") -> np.ndarray:
        """``int64[num_classes]`` number of images per class in ``split``."""
        labels = getattr(self, split).labels
        return np.bincount(labels, minlength=self.num_classes)
