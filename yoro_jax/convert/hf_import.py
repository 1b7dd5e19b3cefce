"""Read a Hugging Face Llama checkpoint (directory or hub id; safetensors or PyTorch bin)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from yoro_jax.config import ConfigError, LlamaConfig
from yoro_jax.convert.mapping import ConversionError

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin", "tokenizer*", "*.model", "*.txt"]


def resolve_source(source: str) -> Path:
    """A local directory as is; otherwise download ``source`` as a hub repo id."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{source} is a file; expected a checkpoint directory or a .gguf")
    if source.count("/") != 1 or source.startswith((".", "/")):
        raise ConversionError(
            f"{source!r} is neither an existing directory, a .gguf file, nor a hub id "
            "like 'TinyLlama/TinyLlama-1.1B-Chat-v1.0'"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=_HUB_PATTERNS))
    except Exception as err:
        raise ConversionError(
            f"could not download {source!r} from the Hugging Face hub: {err}"
        ) from err


def hf_config(model_dir: Path) -> LlamaConfig:
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"no config.json in {model_dir}")
    try:
        return LlamaConfig.from_hf_dict(json.loads(config_path.read_text()))
    except (ConfigError, KeyError) as err:
        raise ConversionError(f"{config_path}: {err}") from err


def weight_files(model_dir: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", files), following a sharded checkpoint's index if present."""
    for kind, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (model_dir / index).is_file():
            shards = sorted(set(json.loads((model_dir / index).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (model_dir / s).is_file()]
            if missing:
                raise ConversionError(f"{index} lists shard(s) not in {model_dir}: {missing}")
            return kind, [model_dir / s for s in shards]
        if (model_dir / single).is_file():
            return kind, [model_dir / single]
    raise ConversionError(
        f"no weights in {model_dir}: expected model.safetensors, a sharded "
        "model-*.safetensors with its index, or pytorch_model*.bin"
    )


def read_hf(model_dir: Path) -> tuple[LlamaConfig, Iterator[tuple[str, np.ndarray]], int]:
    """Config, a lazy iterator of (HF name, float32 array) read tensor by tensor, and a count."""
    cfg = hf_config(model_dir)
    kind, files = weight_files(model_dir)
    if kind == "safetensors":
        from safetensors import safe_open

        names = []
        for file in files:
            with safe_open(file, framework="flax") as f:
                names += [(file, key) for key in f.keys()]  # noqa: SIM118 (safe_open has no iter)

        def tensors() -> Iterator[tuple[str, np.ndarray]]:
            for file in files:
                with safe_open(file, framework="flax") as f:
                    for key in f.keys():  # noqa: SIM118
                        yield key, np.asarray(f.get_tensor(key), dtype=np.float32)

        return cfg, tensors(), len(names)

    try:
        import torch
    except ImportError as err:
        raise ConversionError(
            "this checkpoint is PyTorch .bin; install torch (CPU is enough) to convert it, "
            "or convert it to safetensors first"
        ) from err
    state = {}
    for file in files:
        state.update(torch.load(file, map_location="cpu", weights_only=True))

    def bin_tensors() -> Iterator[tuple[str, np.ndarray]]:
        for key, value in state.items():
            yield key, value.float().numpy()

    return cfg, bin_tensors(), len(state)
