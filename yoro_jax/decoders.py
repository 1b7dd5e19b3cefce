"""Decoders: what generation and scoring need from a model (:class:`Decoder`), for the
full model (:class:`LlamaDecoder`, and :class:`RecordingDecoder`, which also keeps the
states teacher data stores) and for YORO (:class:`YoroDecoder`: reason once in prefill).
The engine that drives them is :mod:`yoro_jax.generate`."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from yoro_jax import llama
from yoro_jax import router as router_lib
from yoro_jax.config import LlamaConfig
from yoro_jax.llama import Params
from yoro_jax.yoro import Yoro


class Decoder(Protocol):
    """What generation and scoring need from a model. Implementations are hashable (jit-static)."""

    def prefill(
        self, params: Any, tokens: jax.Array, valid: jax.Array, kv_valid: jax.Array
    ) -> tuple[jax.Array, Any]:
        """Prompt [B, P] -> (logits [B, V] at slot P-1, caches as long as kv_valid)."""
        ...

    def extend(
        self,
        params: Any,
        caches: Any,
        tokens: jax.Array,  # [B, T]
        positions: jax.Array,  # [B, T]
        kv_valid: jax.Array,  # [B, S], the new slots already marked valid
        slot: jax.Array | int,
    ) -> tuple[jax.Array, Any]:
        """T tokens per row at slots [slot, slot+T) -> (hidden [B, T, d] before the final
        norm, updated caches). T = 1 is a decode step; T > 1 scores a continuation."""
        ...

    def head(self, params: Any, hidden: jax.Array) -> jax.Array:
        """Final norm + LM head: float32 logits [..., V]."""
        ...

    def reasoning_layers(self, caches: Any) -> jax.Array | None:
        """[B] reasoning layers each prompt's prefill needed (None: no reasoning block)."""
        ...


def step(decoder: Decoder, params, caches, tokens, positions, kv_valid, slot):
    """One token per row ([B, 1]) at ``slot`` -> (logits [B, V], updated caches)."""
    hidden, caches = decoder.extend(params, caches, tokens, positions, kv_valid, slot)
    return decoder.head(params, hidden[:, -1]), caches


@dataclasses.dataclass(frozen=True)
class LlamaDecoder:
    """The unmodified base model: all N layers on every token."""

    cfg: LlamaConfig
    dtype: Any = jnp.float32

    def init_caches(self, params: Params, batch: int, length: int) -> Any:
        """Empty caches in the layout of ``params["layers"]`` (stacked or unscanned)."""
        return llama.init_cache_like(self.cfg, params["layers"], batch, length, self.dtype)

    def run(self, params: Params, x, rope, mask, caches, slot):
        """All N layers over x at slots [slot, slot+T) -> (hidden, caches)."""
        return llama.run_layers(self.cfg, params["layers"], x, rope, mask, caches, slot)

    def prefill(self, params: Params, tokens, valid, kv_valid):
        cfg, (batch, prompt_len) = self.cfg, tokens.shape
        caches = self.init_caches(params, batch, kv_valid.shape[1])
        x = llama.embed_tokens(params, tokens, self.dtype)
        rope = llama.rope_tables(cfg, llama.positions_from_valid(valid))
        mask = llama.attention_mask(kv_valid, 0, prompt_len)
        x, caches = self.run(params, x, rope, mask, caches, 0)
        return self.head(params, x[:, -1]), caches

    def extend(self, params: Params, caches, tokens, positions, kv_valid, slot):
        x = llama.embed_tokens(params, tokens, self.dtype)
        rope = llama.rope_tables(self.cfg, positions)
        mask = llama.attention_mask(kv_valid, slot, tokens.shape[1])
        return self.run(params, x, rope, mask, caches, slot)

    def head(self, params: Params, hidden):
        return llama.head(self.cfg, params, hidden)

    def reasoning_layers(self, caches) -> None:
        return None


@dataclasses.dataclass(frozen=True)
class RecordingDecoder(LlamaDecoder):
    """The full model, also keeping its hidden states at the inputs of the base layers
    ``depths`` (``num_hidden_layers``: the last layer's output) for every slot it computes.

    Teacher data reads YORO's frozen features from them: the states the teacher computed
    anyway while answering, so no second pass over prompt + answer is needed. Caches are
    ``{"layers": [...], "states": [B, len(depths), S, d]}``.
    """

    depths: tuple[int, ...] = ()

    def init_caches(self, params: Params, batch: int, length: int) -> Any:
        states = jnp.zeros((batch, len(self.depths), length, self.cfg.hidden_size), self.dtype)
        return {"layers": super().init_caches(params, batch, length), "states": states}

    def run(self, params: Params, x, rope, mask, caches, slot):
        h, layers, inputs = llama.run_layers(
            self.cfg, params["layers"], x, rope, mask, caches["layers"], slot, collect=True
        )
        states = caches["states"]
        if self.depths:
            every = jnp.concatenate([inputs, h[None]], axis=0)  # [N+1, B, T, d] by depth
            picked = jnp.moveaxis(every[jnp.asarray(self.depths)], 0, 1).astype(states.dtype)
            states = jax.lax.dynamic_update_slice(states, picked, (0, 0, slot, 0))
        return h, {"layers": layers, "states": states}

    def recorded(self, caches) -> jax.Array:
        """[B, len(depths), S, d] recorded states (zeros at slots never computed)."""
        return caches["states"]


def take_rows(caches: Any, rows: jax.Array) -> Any:
    """Rows ``rows`` [N] of a decoder's caches: stacked K/V (the only rank-5 leaves,
    ``[L, B, S, KVH, Dh]``) along axis 1, per-row leaves ``[B, ...]`` (unscanned K/V
    included) along axis 0."""
    return jax.tree.map(lambda a: jnp.take(a, rows, axis=1 if a.ndim == 5 else 0), caches)


# ------------------------------------------------------------- "reason once" generation
@dataclasses.dataclass(frozen=True)
class YoroDecoder:
    """:class:`~yoro_jax.generate.Decoder` for YORO; params are ``(frozen, trainable)``.

    Prefill runs the reasoning block once and fills the embedding, compensation and
    coherence caches; each step runs E + Lc + C layers and the two small MLPs. With a
    router (or fixed ``keep_layers``, one 0/1 per reasoning layer) the reasoning pass runs
    only the layers some prompt of the batch needs; ``caches["reasoning_layers"]`` [B]
    counts the layers each prompt needed.
    """

    model: Yoro
    keep_layers: tuple[int, ...] | None = None  # static gates for every prompt (baselines)

    def gates(self, trainable, e, valid) -> jax.Array | None:
        if self.keep_layers is not None:
            keep = jnp.asarray(self.keep_layers, jnp.float32)
            return jnp.broadcast_to(keep, (e.shape[0], keep.shape[0]))
        routing = self.model.route(trainable, e, valid)
        return None if routing is None else routing.gates

    def init_caches(self, params, batch: int, length: int) -> dict[str, llama.Caches]:
        """Empty embedding / compensation / coherence caches, in the params' layouts."""
        frozen, trainable = params
        m, cfg = self.model, self.model.base
        unscanned = llama.is_unscanned(frozen["layers"])
        return {
            "embedding": llama.init_cache(
                cfg, m.ycfg.embedding_layers, batch, length, m.dtype, unscanned
            ),
            "compensation": llama.init_cache_like(
                cfg, trainable["compensation"], batch, length, m.dtype
            ),
            "coherence": llama.init_cache(
                cfg, m.ycfg.coherence_layers, batch, length, m.dtype, unscanned
            ),
        }

    def prefill(self, params, tokens, valid, kv_valid):
        frozen, trainable = params
        m, cfg = self.model, self.model.base
        (batch, prompt_len), length = tokens.shape, kv_valid.shape[1]
        rope = llama.rope_tables(cfg, llama.positions_from_valid(valid))
        cached_mask = llama.attention_mask(kv_valid, 0, prompt_len)
        prompt_mask = llama.attention_mask(valid, 0, prompt_len)

        x = llama.embed_tokens(frozen, tokens, m.dtype)
        empty = self.init_caches(params, batch, length)
        e, embedding_cache = llama.run_layers(
            cfg,
            frozen["layers"],
            x,
            rope,
            cached_mask,
            empty["embedding"],
            0,
            span=m.embedding_span,
        )
        gates = self.gates(trainable, e, valid)
        r, h_reason, states = m.prompt_pass(frozen, e, rope, prompt_mask, gates, skip=True)
        if m.ycfg.exact:
            caches = m.exact_caches(frozen, trainable, states, rope, length)
        else:
            _, _, caches = m.yoro_path(frozen, trainable, e, r, rope, cached_mask, empty, 0)
        caches["embedding"] = embedding_cache
        caches["reasoning_layers"] = (
            jnp.full((batch,), m.ycfg.num_reasoning_layers(cfg), jnp.int32)
            if gates is None
            else router_lib.layers_needed(gates)
        )
        return m.logits(frozen, h_reason[:, -1]), caches

    def extend(self, params, caches, tokens, positions, kv_valid, slot):
        """Tokens after the prompt: embedding + YORO path, no reasoning."""
        frozen, trainable = params
        m, cfg = self.model, self.model.base
        rope = llama.rope_tables(cfg, positions)
        mask = llama.attention_mask(kv_valid, slot, tokens.shape[1])
        caches = dict(caches)
        x = llama.embed_tokens(frozen, tokens, m.dtype)
        e, caches["embedding"] = llama.run_layers(
            cfg, frozen["layers"], x, rope, mask, caches["embedding"], slot, span=m.embedding_span
        )
        h, _, path_caches = m.yoro_path(frozen, trainable, e, None, rope, mask, caches, slot)
        return h, caches | path_caches

    def head(self, params, hidden):
        return self.model.logits(params[0], hidden)

    def reasoning_layers(self, caches) -> jax.Array:
        """[B] reasoning layers each prompt's prefill needed."""
        return caches["reasoning_layers"]


def unscanned(params: Any) -> Any:
    """A decoder's params with every layer stack unscanned (:func:`llama.unscan`): full-model
    params, or YORO's ``(frozen, trainable)``. Made once, outside jit, for generation: on
    CPU it decodes ~10% (full model) to ~35% (YORO) faster than the stack (docs/DESIGN.md
    §8), at the cost of compiling one body per layer. Pass the result to every decoder
    that shares it (the weights are copied)."""
    if isinstance(params, tuple):
        frozen, trainable = params
        return llama.unscan_params(frozen), trainable | {
            "compensation": llama.unscan(trainable["compensation"])
        }
    return llama.unscan_params(params)
