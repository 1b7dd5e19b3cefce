"""Evaluation through lm-eval: the ``yoro-jax`` backend, offline tasks and the CLI.

Importing :mod:`yoro_jax.eval.lm` registers the backend with lm-eval's model registry.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def enable_compilation_cache() -> None:
    """Keep XLA programs on disk between evaluations (``$YORO_JAX_CACHE/xla``): a second
    run of the same tasks starts without recompiling. ``JAX_COMPILATION_CACHE_DIR`` wins."""
    import os

    import jax

    from yoro_jax.convert.pypi import cache_dir

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
