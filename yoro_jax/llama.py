"""Llama in Flax: the one decoder-layer implementation every block of yoro-jax is built from.

Parameters are plain pytrees::

    params = {
        "embed":      [V, d],
        "layers":     layers,   # the N decoder layers, stacked: every leaf [N, ...]
        "final_norm": [d],
        "lm_head":    [d, V],   # absent when tied to "embed"
    }
    layers = {
        "attn_norm": {"weight": [N, d]},
        "attn": {"wq": [N, d, H, Dh], "wk": [N, d, KVH, Dh], "wv": [N, d, KVH, Dh],
                 "wo": [N, H, Dh, d]},
        "mlp_norm":  {"weight": [N, d]},
        "mlp":  {"w_gate": [N, d, F], "w_up": [N, d, F], "w_down": [N, F, d]},
    }

A block of layers is a slice of the stack along the leading axis, and runs as one
``lax.scan`` over it: a program traces one layer body per block, whatever its depth
(docs/DESIGN.md §8). Caches are stacked the same way, ``{"k", "v"}: [L, B, S, KVH, Dh]``.

For decoding, the same layers can be held *unscanned* (:func:`unscan`): a tuple of per-layer
pytrees, run as a Python loop, with a tuple of per-layer caches. XLA:CPU copies a layer's
slice of a stack before its matmuls, which costs a decode step more than the layer's own
work; separate buffers are read in place (and each cache is updated in place). Every
function here takes either layout; caches follow the layout of the layers.

Layers run on a *slot* layout: a batch is ``[B, S]`` slots, ``kv_valid[b, s]`` says which
slots hold real tokens (left padding and not-yet-generated slots are invalid), and each
row has its own rotary positions counted from its first real token. With a KV cache the
new tokens are written at slots ``[slot, slot + T)`` (one ``slot`` for the batch, or one
per row: speculative decoding, where rows advance by different counts); without one the
layer attends over the ``T`` tokens it is given. The cache is kept at KV-head size (no GQA
repeat).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from yoro_jax.config import LlamaConfig

Params = dict[str, Any]
# Decoder layers stacked along a leading axis (every leaf [L, ...]), or unscanned: a tuple
# of L per-layer pytrees (:func:`unscan`).
Layers = Params | tuple[Params, ...]
LayerCache = dict[str, jax.Array]  # one layer's {"k": [B, S, KVH, Dh], "v": [B, S, KVH, Dh]}
# A block's caches: stacked {"k": [L, B, S, KVH, Dh], "v"}, or a tuple of L LayerCaches
# (unscanned layers).
Caches = dict[str, jax.Array] | tuple[LayerCache, ...]
Rope = tuple[jax.Array, jax.Array]  # (cos, sin), each [B, T, Dh] float32

# HF Llama initialises every linear layer with N(0, initializer_range=0.02).
_weight_init = nn.initializers.normal(stddev=0.02)


# ------------------------------------------------------------------------ rotary embeddings
def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [Dh/2], float32, with the rope_scaling variant applied (as HF)."""
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    inv_freq = (1.0 / (cfg.rope_theta**exponents)).astype(np.float32)
    scaling = cfg.rope_scaling_dict
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif cfg.rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(cfg: LlamaConfig, positions: jax.Array) -> Rope:
    """cos/sin tables [B, T, Dh] for integer positions [B, T] (rotate-half layout, as HF)."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rope: Rope) -> jax.Array:
    """Rotate x [B, T, heads, Dh] by the tables of ``rope``."""
    cos, sin = (t[:, :, None, :].astype(x.dtype) for t in rope)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def positions_from_valid(valid: jax.Array) -> jax.Array:
    """Per-row positions [B, T] counted from each row's first real token (0 on padding)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask(kv_valid: jax.Array, q_start: jax.Array | int, q_len: int) -> jax.Array:
    """[B, T, S] bool: query at slot q_start+t may see key slot s iff s is valid and s <= it.
    ``q_start``: one slot for the batch, or one per row [B] (speculative decoding)."""
    key_slots = jnp.arange(kv_valid.shape[-1])
    query_slots = jnp.asarray(q_start)[..., None] + jnp.arange(q_len)  # [T] or [B, T]
    causal = key_slots <= query_slots[..., None]  # [T, S] or [B, T, S]
    return kv_valid[:, None, :] & causal


def write_slots(cache: jax.Array, new: jax.Array, slot: jax.Array | int) -> jax.Array:
    """``cache`` [B, S, ...] with slots ``[slot, slot+T)`` set to ``new`` [B, T, ...]; one
    ``slot`` for the batch, or one per row [B]."""
    new = new.astype(cache.dtype)
    if jnp.ndim(slot) == 0:
        return jax.lax.dynamic_update_slice_in_dim(cache, new, slot, axis=1)
    return jax.vmap(lambda c, n, s: jax.lax.dynamic_update_slice_in_dim(c, n, s, axis=0))(
        cache, new, slot
    )


# ------------------------------------------------------------------------------ modules
class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return weight.astype(x.dtype) * normed.astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention; K/V cached at KV-head size."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,  # [B, T, d]
        rope: Rope,
        mask: jax.Array,  # [B, T, S]
        cache: LayerCache | None = None,
        slot: jax.Array | int = 0,
    ) -> tuple[jax.Array, LayerCache | None]:
        cfg = self.cfg
        d, heads, kv_heads, dh = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        dtype = x.dtype
        wq = self.param("wq", _weight_init, (d, heads, dh), jnp.float32).astype(dtype)
        wk = self.param("wk", _weight_init, (d, kv_heads, dh), jnp.float32).astype(dtype)
        wv = self.param("wv", _weight_init, (d, kv_heads, dh), jnp.float32).astype(dtype)
        wo = self.param("wo", _weight_init, (heads, dh, d), jnp.float32).astype(dtype)

        q = apply_rope(jnp.einsum("btd,dhk->bthk", x, wq), rope)  # [B, T, H, Dh]
        k = apply_rope(jnp.einsum("btd,dhk->bthk", x, wk), rope)  # [B, T, KVH, Dh]
        v = jnp.einsum("btd,dhk->bthk", x, wv)
        if cache is not None:
            k, v = write_slots(cache["k"], k, slot), write_slots(cache["v"], v, slot)
            cache = {"k": k, "v": v}
            k, v = k.astype(dtype), v.astype(dtype)

        batch, q_len = x.shape[:2]
        q = q.reshape(batch, q_len, kv_heads, cfg.num_query_groups, dh)  # [B, T, KVH, G, Dh]
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * dh**-0.5
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, q_len, heads, dh)
        return jnp.einsum("bthk,hkd->btd", out, wo), cache


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f, dtype = self.cfg.hidden_size, self.cfg.intermediate_size, x.dtype
        w_gate = self.param("w_gate", _weight_init, (d, f), jnp.float32).astype(dtype)
        w_up = self.param("w_up", _weight_init, (d, f), jnp.float32).astype(dtype)
        w_down = self.param("w_down", _weight_init, (f, d), jnp.float32).astype(dtype)
        return (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_down


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: x + attn(norm(x)), then + mlp(norm(.))."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        rope: Rope,
        mask: jax.Array,
        cache: LayerCache | None = None,
        slot: jax.Array | int = 0,
    ) -> tuple[jax.Array, LayerCache | None]:
        eps = self.cfg.rms_norm_eps
        attn_out, cache = Attention(self.cfg, name="attn")(
            RMSNorm(eps, name="attn_norm")(x), rope, mask, cache, slot
        )
        h = x + attn_out
        return h + MLP(self.cfg, name="mlp")(RMSNorm(eps, name="mlp_norm")(h)), cache


# ----------------------------------------------------------------- stacked layer helpers
def is_unscanned(layers: Layers) -> bool:
    """Whether ``layers`` is a tuple of per-layer pytrees rather than a stack."""
    return isinstance(layers, (tuple, list))


def num_layers(layers: Layers) -> int:
    """How many layers a block holds (a stack's leading axis, or the tuple's length)."""
    if is_unscanned(layers):
        return len(layers)
    leaves = jax.tree.leaves(layers)
    return int(leaves[0].shape[0]) if leaves else 0


def slice_layers(layers: Layers, start: int, stop: int) -> Layers:
    """Layers ``[start, stop)`` of a block (a block of the base model), in its layout."""
    if is_unscanned(layers):
        return tuple(layers[start:stop])
    return jax.tree.map(lambda a: a[start:stop], layers)


def unscan(layers: Layers) -> tuple[Params, ...]:
    """A stack -> a tuple of per-layer pytrees, each leaf its own buffer (a copy, made once,
    outside jit): the layout decoding runs fastest in on CPU (module docstring)."""
    if is_unscanned(layers):
        return tuple(layers)
    return tuple(unstack_layers(layers))


def unscan_params(params: Params) -> Params:
    """``params`` with its ``"layers"`` stack unscanned (:func:`unscan`); the rest shared."""
    return params | {"layers": unscan(params["layers"])}


def stack_layers(layers: Sequence[Params]) -> Layers:
    """A list of per-layer pytrees -> one stacked pytree (the format of version 1 dirs)."""
    return jax.tree.map(lambda *a: jnp.stack(a), *layers)


def unstack_layers(layers: Layers) -> list[Params]:
    """A stack -> a list of per-layer pytrees (outside jit, each slice is its own buffer)."""
    return [jax.tree.map(lambda a, i=i: a[i], layers) for i in range(num_layers(layers))]


def init_layers(cfg: LlamaConfig, key: jax.Array, count: int, dtype: Any = jnp.float32) -> Layers:
    """``count`` freshly initialised decoder layers, stacked (HF's init: N(0, 0.02)
    weights, unit norms)."""
    dummy_x = jnp.zeros((1, 1, cfg.hidden_size), jnp.float32)
    dummy_rope = rope_tables(cfg, jnp.zeros((1, 1), jnp.int32))
    dummy_mask = jnp.ones((1, 1, 1), bool)
    init = functools.partial(DecoderLayer(cfg).init, x=dummy_x, rope=dummy_rope, mask=dummy_mask)
    stacked = jax.vmap(lambda k: init(k)["params"])(jax.random.split(key, count))
    return jax.tree.map(lambda a: a.astype(dtype), stacked)


def init_params(cfg: LlamaConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """A randomly initialised full model (tests, and shapes for checkpoint restore)."""
    k_embed, k_layers, k_head = jax.random.split(key, 3)
    params: Params = {
        "embed": _weight_init(k_embed, (cfg.vocab_size, cfg.hidden_size), dtype),
        "layers": init_layers(cfg, k_layers, cfg.num_hidden_layers, dtype),
        "final_norm": jnp.ones((cfg.hidden_size,), dtype),
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = _weight_init(k_head, (cfg.hidden_size, cfg.vocab_size), dtype)
    return params


def apply_layer(
    cfg: LlamaConfig,
    layer: Params,  # one layer (no leading axis)
    x: jax.Array,  # [B, T, d]
    rope: Rope,
    mask: jax.Array,  # [B, T, S]
    cache: LayerCache | None = None,
    slot: jax.Array | int = 0,
) -> tuple[jax.Array, LayerCache | None]:
    """One decoder layer: the body every layer scan runs."""
    return DecoderLayer(cfg).apply({"params": layer}, x, rope, mask, cache, slot)


# Blocks of at most this many layers are unrolled inside their scan (traced once all the
# same): a loop of two layers costs a few milliseconds per decode step on CPU and saves
# no compile time worth having (docs/DESIGN.md §8).
UNROLL_UP_TO = 4


def scan_unroll(length: int) -> int | bool:
    """``lax.scan``'s ``unroll`` for a block of ``length`` layers."""
    return True if length <= UNROLL_UP_TO else 1


def layer_at(layers: Layers, index: jax.Array | int) -> Params:
    """Layer ``index`` of a block (a dynamic index inside a scan: no copy of the stack; a
    Python int for unscanned layers)."""
    if is_unscanned(layers):
        return layers[index]
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), layers)


def run_layers(
    cfg: LlamaConfig,
    layers: Layers,
    x: jax.Array,  # [B, T, d]
    rope: Rope,
    mask: jax.Array,  # [B, T, S]
    caches: Caches | None = None,
    slot: jax.Array | int = 0,
    remat: bool = False,
    collect: bool = False,
    span: tuple[int, int] | None = None,
) -> tuple[jax.Array, Caches | None] | tuple[jax.Array, Caches | None, jax.Array]:
    """Run a block of stacked layers as one ``lax.scan``; returns ``(hidden, new caches)``,
    and with ``collect`` also every layer's input states ``[L, B, T, d]``.

    ``span=(start, stop)`` runs layers ``[start, stop)`` of the stack by indexing it inside
    the scan (a block of the base model: slicing the stack first would copy the block's
    weights on every call). ``remat``: keep only each layer's input for the backward pass
    and recompute the rest (activation memory of one layer instead of all of them, for ~1
    extra forward).
    """

    def body(h, layer_and_cache):
        layer, cache = layer_and_cache
        if span is not None:
            layer = layer_at(layers, layer)  # ``layer`` is the index
        out, cache = apply_layer(cfg, layer, h, rope, mask, cache, slot)
        return out, (cache, h if collect else None)

    if is_unscanned(layers):
        return _run_unscanned(cfg, layers, x, rope, mask, caches, slot, remat, collect, span)
    if remat:
        body = jax.checkpoint(body)
    xs = layers if span is None else jnp.arange(*span)
    length = num_layers(layers) if span is None else span[1] - span[0]
    h, (new_caches, inputs) = jax.lax.scan(body, x, (xs, caches), unroll=scan_unroll(length))
    return (h, new_caches, inputs) if collect else (h, new_caches)


def _run_unscanned(cfg, layers, x, rope, mask, caches, slot, remat, collect, span):
    """:func:`run_layers` over a tuple of layers: a Python loop, caches a tuple too."""
    block = layers if span is None else layers[span[0] : span[1]]
    layer_fn = functools.partial(apply_layer, cfg)
    if remat:
        layer_fn = jax.checkpoint(layer_fn)
    h, new_caches, inputs = x, [], []
    for i, layer in enumerate(block):
        inputs.append(h)
        h, cache = layer_fn(layer, h, rope, mask, None if caches is None else caches[i], slot)
        new_caches.append(cache)
    out_caches = None if caches is None else tuple(new_caches)
    if not collect:
        return h, out_caches
    states = jnp.stack(inputs) if inputs else jnp.zeros((0, *x.shape), x.dtype)
    return h, out_caches, states


def layer_kv(cfg: LlamaConfig, layer: Params, x: jax.Array, rope: Rope) -> LayerCache:
    """The K/V (at KV-head size, rotated) that a decoder layer computes from its input
    states x [B, T, d] — what it would write to its cache for those tokens."""
    h = RMSNorm(cfg.rms_norm_eps).apply({"params": layer["attn_norm"]}, x)
    k = jnp.einsum("btd,dhk->bthk", h, layer["attn"]["wk"].astype(x.dtype))
    v = jnp.einsum("btd,dhk->bthk", h, layer["attn"]["wv"].astype(x.dtype))
    return {"k": apply_rope(k, rope), "v": v}


def block_kv(cfg: LlamaConfig, layers: Layers, states: jax.Array, rope: Rope) -> Caches:
    """Stacked K/V ``{"k": [L, B, T, KVH, Dh], "v"}`` that layer l of a block (either
    layout) computes from its input states ``states[l]`` [B, T, d]."""
    if is_unscanned(layers):
        kvs = [layer_kv(cfg, layer, x, rope) for layer, x in zip(layers, states, strict=True)]
        return {name: jnp.stack([kv[name] for kv in kvs]) for name in ("k", "v")}
    return jax.vmap(layer_kv, in_axes=(None, 0, 0, None))(cfg, layers, states, rope)


def embed_tokens(params: Params, tokens: jax.Array, dtype: Any | None = None) -> jax.Array:
    table = params["embed"]
    return jnp.take(table, tokens, axis=0).astype(dtype or table.dtype)


def final_norm(cfg: LlamaConfig, params: Params, x: jax.Array) -> jax.Array:
    return RMSNorm(cfg.rms_norm_eps).apply({"params": {"weight": params["final_norm"]}}, x)


def lm_head(cfg: LlamaConfig, params: Params, x: jax.Array) -> jax.Array:
    """Logits [..., V] in float32 from final-normed hidden states [..., d]."""
    if cfg.tie_word_embeddings:
        w = params["embed"].astype(x.dtype)
        return jnp.einsum("...d,vd->...v", x, w).astype(jnp.float32)
    return (x @ params["lm_head"].astype(x.dtype)).astype(jnp.float32)


def head(cfg: LlamaConfig, params: Params, x: jax.Array) -> jax.Array:
    """Final RMSNorm + LM head."""
    return lm_head(cfg, params, final_norm(cfg, params, x))


def init_cache(
    cfg: LlamaConfig,
    count: int,
    batch: int,
    length: int,
    dtype: Any = jnp.float32,
    unscanned: bool = False,
) -> Caches:
    """Empty caches of ``length`` slots for a block of ``count`` layers (stacked, or a tuple
    of per-layer caches for unscanned layers)."""
    shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
    if unscanned:
        return tuple(
            {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(count)
        )
    return {"k": jnp.zeros((count, *shape), dtype), "v": jnp.zeros((count, *shape), dtype)}


def init_cache_like(
    cfg: LlamaConfig, layers: Layers, batch: int, length: int, dtype: Any = jnp.float32
) -> Caches:
    """Empty caches for the block ``layers``, in its layout."""
    return init_cache(cfg, num_layers(layers), batch, length, dtype, is_unscanned(layers))


def hidden_states(
    cfg: LlamaConfig, params: Params, tokens: jax.Array, valid: jax.Array, dtype: Any = None
) -> jax.Array:
    """Last-layer hidden states [B, T, d] (before the final norm) for a padded batch."""
    x = embed_tokens(params, tokens, dtype)
    rope = rope_tables(cfg, positions_from_valid(valid))
    mask = attention_mask(valid, 0, tokens.shape[1])
    return run_layers(cfg, params["layers"], x, rope, mask)[0]


def forward(
    cfg: LlamaConfig,
    params: Params,
    tokens: jax.Array,  # [B, T] int
    valid: jax.Array,  # [B, T] bool
    dtype: Any | None = None,
) -> jax.Array:
    """Full-model logits [B, T, V] (float32) for a padded batch, no cache."""
    return head(cfg, params, hidden_states(cfg, params, tokens, valid, dtype))
