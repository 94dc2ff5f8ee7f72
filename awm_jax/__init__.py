"""awm-jax: Adversarial Weight Masking (Chai & Chen, NeurIPS 2022) in JAX/Flax.

Subpackages: ``data`` (sources, clean draws), ``attacks``, ``models``, ``training``,
``defenses`` (``defenses.awm`` is the method), ``eval`` (metrics, reports); ``pipeline`` and
``cli`` tie them together.
"""

__version__ = "0.1.0"
