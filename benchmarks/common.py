"""Helpers shared by the benchmark scripts: model fetching, timing, bandwidth, tables."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from yoro_jax.models import model_dir
from yoro_jax.report import (
    markdown_table,  # noqa: F401  (re-exported for the scripts)
    timed_in_turn,
)

# Chat prompts the decode benchmarks answer (row i of a batch gets prompt i).
PROMPTS = [
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "What are three uses of a paperclip?",
    "Summarise the plot of Romeo and Juliet.",
    "How do vaccines work?",
    "Give me a recipe for pancakes.",
    "What is the difference between weather and climate?",
    "Describe a cat to someone who has never seen one.",
]


def default_model_dir() -> Path:
    """SmolLM2 converted into the yoro-jax cache (converted on first use)."""
    return model_dir("smollm2")


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    """Minimum wall time of ``fn()`` over ``repeats`` runs (after one warm-up run)."""
    return timed_in_turn({"fn": fn}, repeats)[0]["fn"]


def read_bandwidth_gbs(megabytes: int = 512, repeats: int = 5) -> float:
    """Sustained memory read bandwidth (GB/s) as XLA sees it: a sum over a large array."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = best_of(lambda: total(x).block_until_ready(), repeats)
    return x.nbytes / seconds / 1e9


def tree_bytes(tree: Any) -> int:
    """Bytes of a pytree of arrays or abstract ``ShapeDtypeStruct``s."""
    return sum(
        int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
    )
