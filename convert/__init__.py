"""``python -m convert``: the command line of :mod:`yoro_jax.convert` (kept at the top level
so the command stays short). The conversion code itself is part of the library."""
