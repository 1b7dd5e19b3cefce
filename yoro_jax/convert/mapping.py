"""Map Hugging Face Llama tensor names and layouts onto yoro-jax's params pytree.

Every importer (safetensors, PyTorch bin, GGUF) produces tensors under their HF names
in HF layout ([out, in] linear weights); this one table turns them into our layout and
fails loudly on unknown, duplicate, missing or wrongly shaped tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from yoro_jax.config import LlamaConfig
from yoro_jax.llama import Params


class ConversionError(RuntimeError):
    """A checkpoint that cannot be converted (unsupported, incomplete or inconsistent)."""


# HF names that carry no weights we need (rotary tables are recomputed).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _layer_rules(cfg: LlamaConfig) -> list[tuple[str, tuple[str, str], Callable, tuple]]:
    d, h, kv, dh, f = (
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )

    def identity(w: np.ndarray) -> np.ndarray:
        return w

    def transpose(w: np.ndarray) -> np.ndarray:
        return w.T

    def heads_in(n: int) -> Callable:  # [n*dh, d] -> [d, n, dh]
        return lambda w: w.T.reshape(d, n, dh)

    def heads_out(w: np.ndarray) -> np.ndarray:  # [d, h*dh] -> [h, dh, d]
        return w.T.reshape(h, dh, d)

    # (HF suffix, (group, name), transform, HF shape)
    return [
        ("input_layernorm.weight", ("attn_norm", "weight"), identity, (d,)),
        ("post_attention_layernorm.weight", ("mlp_norm", "weight"), identity, (d,)),
        ("self_attn.q_proj.weight", ("attn", "wq"), heads_in(h), (h * dh, d)),
        ("self_attn.k_proj.weight", ("attn", "wk"), heads_in(kv), (kv * dh, d)),
        ("self_attn.v_proj.weight", ("attn", "wv"), heads_in(kv), (kv * dh, d)),
        ("self_attn.o_proj.weight", ("attn", "wo"), heads_out, (d, h * dh)),
        ("mlp.gate_proj.weight", ("mlp", "w_gate"), transpose, (f, d)),
        ("mlp.up_proj.weight", ("mlp", "w_up"), transpose, (f, d)),
        ("mlp.down_proj.weight", ("mlp", "w_down"), transpose, (d, f)),
    ]


def hf_to_params(
    cfg: LlamaConfig, tensors: Iterable[tuple[str, np.ndarray]], dtype: Any = np.float32
) -> Params:
    """Assemble our params pytree from (HF name, HF-layout array) pairs."""
    d, v = cfg.hidden_size, cfg.vocab_size
    layer_rules = {suffix: rest for suffix, *rest in _layer_rules(cfg)}
    top_rules = {
        "model.embed_tokens.weight": ("embed", lambda w: w, (v, d)),
        "model.norm.weight": ("final_norm", lambda w: w, (d,)),
        "lm_head.weight": ("lm_head", lambda w: w.T, (v, d)),
    }
    layer_pattern = re.compile(r"model\.layers\.(\d+)\.(.+)$")
    layers: list[dict[str, dict[str, np.ndarray]]] = [{} for _ in range(cfg.num_hidden_layers)]
    params: Params = {}
    seen: set[str] = set()

    def check(name: str, array: np.ndarray, shape: tuple) -> None:
        if name in seen:
            raise ConversionError(f"duplicate tensor {name!r} in checkpoint")
        seen.add(name)
        if tuple(array.shape) != shape:
            raise ConversionError(
                f"shape mismatch for {name!r}: checkpoint has {tuple(array.shape)}, "
                f"config.json implies {shape}"
            )

    for name, array in tensors:
        if _IGNORED.match(name):
            continue
        if name in top_rules:
            key, transform, shape = top_rules[name]
            check(name, array, shape)
            if key == "lm_head" and cfg.tie_word_embeddings:
                continue  # tied: the head is the embedding
            params[key] = np.asarray(transform(array), dtype=dtype)
            continue
        match = layer_pattern.match(name)
        if match is None or match.group(2) not in layer_rules:
            raise ConversionError(f"unexpected tensor {name!r}: not part of a Llama checkpoint")
        index = int(match.group(1))
        if index >= cfg.num_hidden_layers:
            raise ConversionError(
                f"tensor {name!r} is for layer {index}, but num_hidden_layers is "
                f"{cfg.num_hidden_layers}"
            )
        (group, key), transform, shape = layer_rules[match.group(2)]
        check(name, array, shape)
        layers[index].setdefault(group, {})[key] = np.asarray(transform(array), dtype=dtype)

    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not cfg.tie_word_embeddings:
        expected.add("lm_head.weight")
    expected |= {
        f"model.layers.{i}.{suffix}" for i in range(cfg.num_hidden_layers) for suffix in layer_rules
    }
    missing = sorted(expected - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise ConversionError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
    params["layers"] = jax.tree.map(lambda *a: np.stack(a), *layers)  # [N, ...] leaves
    return params
