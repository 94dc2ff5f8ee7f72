"""Flax models sharing one apply contract (see :mod:`awm_jax.models.base`)."""

from awm_jax.models import cnn  # noqa: F401  (registers small_cnn)
from awm_jax.models import preact_resnet  # noqa: F401  (registers preact_resnet18)
from awm_jax.models import resnet  # noqa: F401  (registers resnet18)
from awm_jax.models import vgg  # noqa: F401  (registers small_vgg)
from awm_jax.models.base import (MODELS, Normalize, apply_model, check_images_fit, create_model,
                                 init_variables)

__all__ = ["MODELS", "Normalize", "apply_model", "check_images_fit", "create_model",
           "init_variables"]
