"""The defender's clean data: a seeded draw from a held-out split, and the one-shot recipe.

Following the official code, the defender's images come from the test split and the rest of it
is the evaluation set, so the two never overlap (the code's one-shot branch leaks its images
into evaluation; we do not).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from awm_jax.data.augment import random_resized_crop
from awm_jax.data.dataset import Split
from awm_jax.types import PRNGKey


@dataclasses.dataclass(frozen=True)
class CleanDataConfig:
    """How the defender's clean images are chosen and augmented.

    Attributes:
      n_clean: number of images drawn uniformly from the pool (ignored if ``per_class`` is set).
      per_class: draw exactly this many images of every class instead.
      augment_views: extra random-resized-crop views made of each drawn image, once, before
        the defense (official one-shot recipe: 9, giving 10 + 90 = 100 images on CIFAR-10).
      crop_scale: area range of those crops (official: torchvision's default 0.08-1.0).
      crop_ratio: aspect-ratio range of those crops.
      flip: flip views horizontally at random (official: yes; wrong for digits and signs).
    """

    n_clean: int | None = 500
    per_class: int | None = None
    augment_views: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip: bool = True

    def __post_init__(self):
        if self.per_class is None and self.n_clean is None:
            raise ValueError("set n_clean or per_class.")
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"per_class must be >= 1; got {self.per_class}.")
        if self.per_class is None and self.n_clean < 1:
            raise ValueError(f"n_clean must be >= 1; got {self.n_clean}.")
        if self.augment_views < 0:
            raise ValueError(f"augment_views must be >= 0; got {self.augment_views}.")

    @classmethod
    def one_shot(cls, **overrides) -> "CleanDataConfig":
        """One image per class plus 9 augmented views each (the official one-shot recipe)."""
        return dataclasses.replace(cls(n_clean=None, per_class=1, augment_views=9), **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def clean_data_config(n_clean: int | None = 500, per_class: int | None = None,
                      one_shot: bool = False, augment_views: int | None = None,
                      crop_scale: tuple[float, float] = (0.08, 1.0),
                      flip: bool = True) -> CleanDataConfig:
    """The :class:`CleanDataConfig` that the CLI's clean-data flags describe.

    ``one_shot`` wins over ``per_class``, which wins over ``n_clean`` (``--one-shot``,
    ``--per-class``, ``--n-clean``); ``augment_views`` None keeps each form's default (one-shot
    9, else 0).

    Raises:
      ValueError: invalid sizes (see :class:`CleanDataConfig`).
    """
    settings = {"crop_scale": tuple(crop_scale), "flip": flip}
    if augment_views is not None:
        settings["augment_views"] = augment_views
    if one_shot:
        return CleanDataConfig.one_shot(**settings)
    if per_class is not None:
        return CleanDataConfig(n_clean=None, per_class=per_class, **settings)
    return CleanDataConfig(n_clean=n_clean, **settings)


def draw_clean_subset(pool: Split, num_classes: int, key: PRNGKey, config: CleanDataConfig
                      ) -> tuple[Split, Split]:
    """Draws the defender's clean images from ``pool``.

    Args:
      pool: a held-out clean split (the test split, as in the official code).
      num_classes: number of classes.
      key: PRNG key for the draw and the augmentation.
      config: how many images and which augmentation.

    Returns:
      ``(clean, rest)``: the defender's images (after augmentation, if any) and the pool's
      remaining images, which are disjoint from them and serve as the evaluation set.

    Raises:
      ValueError: the pool is empty or has fewer images than asked, or a class has fewer than
        ``per_class`` images.
    """
    if len(pool) == 0:
        raise ValueError("the pool of clean images is empty; the defender's images are drawn "
                         "from the test split, which must hold at least one image per class.")
    draw_key, augment_key = jax.random.split(key)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(draw_key)).ravel())
    if config.per_class is not None:
        chosen = []
        for label in range(num_classes):
            members = np.flatnonzero(pool.labels == label)
            if members.size < config.per_class:
                raise ValueError(
                    f"class {label} has {members.size} image(s) in the pool but per_class="
                    f"{config.per_class} were asked; lower per_class, draw n_clean images "
                    "instead, or use a pool that holds every class.")
            chosen.append(rng.choice(members, config.per_class, replace=False))
        indices = np.sort(np.concatenate(chosen))
    else:
        if config.n_clean > len(pool):
            raise ValueError(
                f"n_clean={config.n_clean} is larger than the pool of {len(pool)} images; "
                f"use n_clean <= {len(pool)} or a larger pool.")
        indices = np.sort(rng.choice(len(pool), config.n_clean, replace=False))
    rest = np.setdiff1d(np.arange(len(pool)), indices)
    clean = pool.subset(indices)
    if config.augment_views:
        clean = augment_views(clean, augment_key, config)
    return clean, pool.subset(rest)


def augment_views(clean: Split, key: PRNGKey, config: CleanDataConfig) -> Split:
    """The originals followed by ``config.augment_views`` random-resized-crop views of each."""
    images = jnp.asarray(clean.images)
    views = [np.asarray(random_resized_crop(images, jax.random.fold_in(key, view),
                                            config.crop_scale, config.crop_ratio, config.flip))
             for view in range(config.augment_views)]
    all_images = np.concatenate([clean.images, *views]).astype(np.float32)
    all_labels = np.tile(clean.labels, config.augment_views + 1)
    return Split(all_images, all_labels)
