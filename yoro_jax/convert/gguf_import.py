"""Read a llama.cpp GGUF file: config from its metadata, dequantized tensors under HF names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from yoro_jax.config import LlamaConfig
from yoro_jax.convert.mapping import ConversionError

# GGUF tensor name (after "blk.N.") -> HF suffix (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _reader(path: Path) -> Any:
    from gguf import GGUFReader

    if not Path(path).is_file():
        raise ConversionError(f"GGUF file not found: {path}")
    try:
        return GGUFReader(str(path))
    except Exception as err:  # gguf raises bare ValueErrors on bad magic etc.
        raise ConversionError(f"{path} is not a readable GGUF file: {err}") from err


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def undo_rope_permutation(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation (interleaved -> HF rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_has_tokenizer(path: Path) -> bool:
    return "tokenizer.ggml.model" in _reader(path).fields


def _config_from_reader(reader: Any) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(
            f"unsupported GGUF architecture {arch!r}: yoro-jax converts 'llama' models only"
        )
    names = {t.name for t in reader.tensors}
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    hf = {
        "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size", int(embed.shape[-1]))),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    scaling_type = _field(reader, "llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise ConversionError(f"GGUF rope scaling {scaling_type!r} is not supported")
    return LlamaConfig.from_hf_dict(hf)


def read_gguf(path: Path) -> tuple[LlamaConfig, Iterator[tuple[str, np.ndarray]], int]:
    """Config, a lazy iterator of (HF name, float32 HF-layout array), and the tensor count."""
    from gguf.quants import dequantize

    reader = _reader(path)
    cfg = _config_from_reader(reader)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        for tensor in reader.tensors:
            name = tensor.name
            if name in _TOP_NAMES:
                hf_name = _TOP_NAMES[name]
            elif name.startswith("blk.") and name.split(".", 2)[2] in _LAYER_NAMES:
                _, index, rest = name.split(".", 2)
                hf_name = f"model.layers.{index}.{_LAYER_NAMES[rest]}"
            else:
                raise ConversionError(f"unexpected GGUF tensor {name!r}")
            # numpy shape is GGUF's ne reversed = HF's [out, in] layout
            shape = tuple(int(n) for n in reversed(tensor.shape))
            array = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
            if hf_name.endswith("q_proj.weight"):
                array = undo_rope_permutation(array, cfg.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                array = undo_rope_permutation(array, cfg.num_key_value_heads)
            yield hf_name, array

    return cfg, tensors(), len(reader.tensors)


_SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


def gguf_tokenizer(path: Path) -> Any:
    """The GGUF's tokenizer, built by transformers' own GGUF tokenizer conversion.

    ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` reads GGUF metadata through a
    module that imports torch, which the main install does not have; here the metadata
    comes from the ``gguf`` package and only the (torch-free) conversion is transformers'.
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        GGUF_TOKENIZER_MAPPING,
        convert_gguf_tokenizer,
    )

    reader = _reader(path)
    if "tokenizer.ggml.model" not in reader.fields:
        raise ConversionError(f"{path} holds no tokenizer")

    def group(name: str) -> dict[str, Any]:  # as transformers' own reader groups the keys
        keys = {
            f"tokenizer.{key}": renamed for key, renamed in GGUF_TOKENIZER_MAPPING[name].items()
        }
        return {
            renamed: _field(reader, key) for key, renamed in keys.items() if key in reader.fields
        }

    tokenizer, config = group("tokenizer"), group("tokenizer_config")
    if tokenizer.get("tokenizer_type") == "llama":
        config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKEN_IDS.items():
        if key in reader.fields:
            config[name] = tokenizer["tokens"][int(_field(reader, key))]
    backend, extra = convert_gguf_tokenizer(_field(reader, "general.architecture"), tokenizer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **config, **extra)
