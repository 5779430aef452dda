"""``python -m dhel_jax.sweep``: ``dhel-sweep`` without the console scripts installed."""

import sys

from dhel_jax.sweep.cli import main

sys.exit(main())
