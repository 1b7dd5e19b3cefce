"""``python -m convert SOURCE --out DIR``: see :mod:`yoro_jax.convert.cli`."""

import sys

from yoro_jax.convert.cli import main

sys.exit(main())
