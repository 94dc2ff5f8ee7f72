"""``python -m awm_jax ARGS`` runs the CLI, for environments without the ``awm-jax`` script."""

import sys

from awm_jax.cli import main

sys.exit(main())
