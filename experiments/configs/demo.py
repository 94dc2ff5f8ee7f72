"""The offline demo's settings (digits, BadNets, small CNN, one-shot AWM).

Launch: ``.venv/bin/awm-jax demo --seed 0`` (or ``python experiments/demo_seeds.py`` for seeds 0-4).
Expected (experiments/results/demo_seeds/summary.md): ASR 0.997 -> 0.010, ACC 0.991 -> 0.927
on seed 0; median ASR after 0.010 and median ACC drop 0.041 over seeds 0-4.
"""

import dataclasses

from awm_jax.demo import DemoConfig


def get_config(arg: str | None = None) -> DemoConfig:
    """The demo config; ``arg="smoke"`` shrinks training and AWM for quick checks."""
    config = DemoConfig()
    if arg == "smoke":
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, epochs=3),
            awm=dataclasses.replace(config.awm, outer_epochs=2))
    return config
