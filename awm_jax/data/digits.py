"""scikit-learn's handwritten digits, the offline default that ships inside an installed package.

1,797 greyscale 8x8 images of the digits 0-9 (UCI optical recognition test set), pixel values
0-16. We rescale them to [0, 1] and upsample to ``size x size`` with bilinear interpolation so that
patch triggers and crops have room, then split them with a fixed permutation into 1,347 train
and 450 test images (the 3:1 split is part of the dataset definition, not of the experiment seed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.data.dataset import ImageDataset, make_split

DIGITS_TEST_SIZE = 450
_SPLIT_SEED = 20221128  # fixes the train/test partition for every user.


def load_digits(size: int = 16) -> ImageDataset:
    """Loads the digits as ``float32[N, size, size, 1]`` in [0, 1].

    Raises:
      ValueError: ``size`` < 8.
    """
    if size < 8:
        raise ValueError(f"digits size must be >= 8 (the native resolution); got {size}.")
    from sklearn.datasets import load_digits as sklearn_load_digits

    raw = sklearn_load_digits()
    images = np.asarray(raw.images, np.float32)[..., None] / 16.0
    if size != 8:
        images = np.asarray(jax.image.resize(jnp.asarray(images), (len(images), size, size, 1),
                                             method="linear"))
    images = np.clip(images, 0.0, 1.0)
    labels = np.asarray(raw.target, np.int32)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    test_idx, train_idx = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return ImageDataset(
        # The name is a source string that load_dataset accepts, so checkpoints can reload it.
        name="digits" if size == 16 else f"digits{size}",
        train=make_split(images[train_idx], labels[train_idx], 10, "digits train"),
        test=make_split(images[test_idx], labels[test_idx], 10, "digits test"),
        class_names=tuple(str(d) for d in range(10)),
    )
