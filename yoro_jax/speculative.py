"""Lossless self-speculative decoding: YORO drafts, the full model verifies (docs/DESIGN.md §7).

Each *cycle* the YORO path proposes ``k`` tokens (E + Lc + C layers each), the full model
scores the last verified token and the ``k`` proposals in one multi-token pass, and the
longest agreeing prefix is kept plus one token of the full model's own. Greedy: the output
is the full model's greedy output, token for token. Sampling (temperature / top-k / top-p):
a proposal d with draft probability q(d) is accepted with probability min(1, p(d)/q(d)),
else the token is resampled from normalise(max(0, p - q)): the full model's distribution,
exactly (Leviathan et al., 2023; Chen et al., 2023).

Batches: rows accept different numbers of proposals, so every row has its own cache slot,
position and output count (``slot``, ``position``, ``row_n_out`` [B]); K/V writes and
causal masks take a slot per row (:func:`yoro_jax.llama.write_slots`). Shapes stay static:
a cycle computes k + 1 slots for every row and each row keeps its own prefix. A row that is
done (EOS, stop string) or has its tokens stops advancing while the others go on.

Caches are shared by layer where the two paths compute the same thing. With the exact
prompt context (``prompt_context: exact``, no router) the draft's embedding and coherence
layers *are* base layers, and after each verify pass the full model's K/V of the verified
tokens at those layers are copied into the draft's caches, and the compensation layers' K/V
are recomputed from the full model's states at the depths they stand for: the draft always
attends over exact states of everything verified, as in training. The prompt's draft
caches come from the full prefill the same way (no second prompt pass). Other variants keep
their own draft caches, filled by their own prefill.

Rejected positions need no copy to undo: their slots are marked invalid in ``kv_valid``
and overwritten by the next cycle. The whole loop runs on device (``lax.while_loop``),
like :func:`yoro_jax.generate.advance`; the host driver is the same
(:func:`yoro_jax.generate.generate_tokens`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from yoro_jax import llama
from yoro_jax.decoders import LlamaDecoder, YoroDecoder, step
from yoro_jax.sampling import SamplingConfig, filtered_logits, sample_tokens

# Drafts per verify pass. The acceptance-vs-k measurement on SmolLM2 with the main job's
# nets (docs/RESULTS.md, issue 16): alpha ~0.2 per token, where k = 1 is fastest; larger k
# pays only at alpha >= ~0.9 on CPU (a verify pass of k + 1 tokens costs more than a step).
DEFAULT_K = 1


@dataclasses.dataclass(frozen=True)
class SpeculativeDecoder:
    """The full model's output, drafted ``k`` tokens at a time by ``draft``; params are
    YORO's ``(frozen, trainable)`` (the full model is ``frozen``)."""

    draft: YoroDecoder
    k: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"speculative k must be an integer >= 1, got {self.k!r}")

    @property
    def full(self) -> LlamaDecoder:
        return LlamaDecoder(self.draft.model.base, self.draft.model.dtype)

    @property
    def shares_caches(self) -> bool:
        """Whether the draft's caches are refreshed from the verifier's (module docstring)."""
        m = self.draft.model
        return m.ycfg.exact and m.router is None and self.draft.keep_layers is None

    @property
    def tail_start(self) -> int:
        """The first base layer whose input states the draft's caches are rebuilt from."""
        return self.draft.model.ycfg.compensation_depths(self.draft.model.base).start

    def reasoning_layers(self, caches: Any) -> None:
        return None  # the verifier runs every layer


# ------------------------------------------------------------------ caches by window
def _slice_slots(a: jax.Array, slot, width: int, axis: int) -> jax.Array:
    """Slots ``[slot, slot+width)`` along ``axis`` (the batch axis is the one before it);
    ``slot`` one for the batch or one per row [B]."""
    if jnp.ndim(slot) == 0:
        return jax.lax.dynamic_slice_in_dim(a, slot, width, axis=axis)
    return jax.vmap(
        lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, width, axis=axis - 1),
        in_axes=(axis - 1, 0),
        out_axes=axis - 1,
    )(a, slot)


def _window(caches: llama.Caches, start: int, count: int, slot, width: int) -> llama.Caches:
    """K/V of layers ``[start, start+count)`` at each row's slots ``[slot, slot+width)``,
    stacked ``{"k": [count, B, width, KVH, Dh], ...}``, from a block's caches of either
    layout."""
    if llama.is_unscanned(caches):
        layers = caches[start : start + count]
        return {
            name: jnp.stack([_slice_slots(c[name], slot, width, axis=1) for c in layers])
            for name in ("k", "v")
        }
    return {
        name: _slice_slots(a[start : start + count], slot, width, axis=2)
        for name, a in caches.items()
    }


def _write(caches: llama.Caches, kv: llama.Caches, slot) -> llama.Caches:
    """``caches`` with each row's slots ``[slot, slot+T)`` of every layer set to ``kv``
    [L, B, T, ...]."""
    if llama.is_unscanned(caches):
        return tuple(
            {name: llama.write_slots(c[name], kv[name][i], slot) for name in ("k", "v")}
            for i, c in enumerate(caches)
        )
    return {
        name: jax.vmap(llama.write_slots, in_axes=(0, 0, None))(a, kv[name], slot)
        for name, a in caches.items()
    }


def _refresh_draft(spec, params, draft_caches, full_caches, tail_states, rope, slot, width):
    """Draft caches at slots ``[slot, slot+width)`` rebuilt from the full model's: its K/V
    for the embedding and coherence layers, the compensation layers' K/V of its states at
    their depths (``tail_states`` [Lc + C, B, width, d], inputs of base layers from
    :attr:`SpeculativeDecoder.tail_start`)."""
    frozen, trainable = params
    m = spec.draft.model
    cfg, ycfg = m.base, m.ycfg
    caches = dict(draft_caches)
    caches["embedding"] = _write(
        caches["embedding"], _window(full_caches, 0, ycfg.embedding_layers, slot, width), slot
    )
    start = cfg.num_hidden_layers - ycfg.coherence_layers
    caches["coherence"] = _write(
        caches["coherence"],
        _window(full_caches, start, ycfg.coherence_layers, slot, width),
        slot,
    )
    comp = m.cast(trainable)["compensation"]
    if llama.num_layers(comp):
        states = tail_states[: ycfg.compensation_layers].astype(m.dtype)
        kv = llama.block_kv(cfg, comp, states, rope)
        caches["compensation"] = _write(caches["compensation"], kv, slot)
    return caches


def _verify(spec, params, full_caches, tokens, positions, kv_valid, slot):
    """The full model over ``tokens`` [B, T] at slots ``[slot, slot+T)``: (hidden [B, T, d]
    before the final norm, caches, input states [Lc + C, B, T, d] of the layers the draft's
    caches come from, the tokens' rotary tables)."""
    frozen, _ = params
    cfg, dtype = spec.full.cfg, spec.full.dtype
    x = llama.embed_tokens(frozen, tokens, dtype)
    rope = llama.rope_tables(cfg, positions)
    mask = llama.attention_mask(kv_valid, slot, tokens.shape[1])
    h, caches, inputs = llama.run_layers(
        cfg, frozen["layers"], x, rope, mask, full_caches, slot, collect=True
    )
    return h, caches, inputs[spec.tail_start :], rope


# ------------------------------------------------------------------------ on device
@functools.partial(
    jax.jit,
    static_argnames=("decoder", "out_len", "sampling", "eos_ids", "pad_id", "record_top_k"),
)
def start(
    decoder: SpeculativeDecoder,
    params: Any,
    tokens: jax.Array,  # [B, P]
    valid: jax.Array,
    key: jax.Array,
    limit: jax.Array,
    *,
    out_len: int,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
    pad_id: int,
    record_top_k: int = 0,
) -> dict[str, Any]:
    """Prefill both paths and pick the first token (the full model's); the decode state."""
    if record_top_k:
        raise ValueError("speculative decoding does not record top-k log-probs")
    spec, (frozen, _) = decoder, params
    batch, prompt_len = tokens.shape
    # room for a whole cycle past the last kept token
    length = prompt_len + out_len + spec.k + 1
    kv_valid = jnp.zeros((batch, length), bool).at[:, :prompt_len].set(valid)
    positions = llama.positions_from_valid(valid)
    full_caches = spec.full.init_caches(frozen, batch, length)
    if spec.shares_caches:
        hidden, full_caches, tail, rope = _verify(
            spec, params, full_caches, tokens, positions, kv_valid, 0
        )
        logits = spec.full.head(frozen, hidden[:, -1])
        m, cfg = spec.draft.model, spec.draft.model.base
        empty = spec.draft.init_caches(params, batch, length)
        draft_caches = _refresh_draft(spec, params, empty, full_caches, tail, rope, 0, prompt_len)
        draft_caches["reasoning_layers"] = jnp.full(
            (batch,), m.ycfg.num_reasoning_layers(cfg), jnp.int32
        )
    else:
        logits, full_caches = spec.full.prefill(frozen, tokens, valid, kv_valid)
        _, draft_caches = spec.draft.prefill(params, tokens, valid, kv_valid)
    first = sample_tokens(logits, jax.random.fold_in(key, 0), sampling)
    zero = jnp.int32(0)
    return {
        "caches": {"full": full_caches, "draft": draft_caches},
        "kv_valid": kv_valid,
        "token": first,
        "position": valid.sum(axis=-1).astype(jnp.int32),
        "slot": jnp.full((batch,), prompt_len, jnp.int32),
        "done": jnp.isin(first, jnp.asarray(eos_ids, jnp.int32)),
        "out": jnp.full((batch, out_len + spec.k + 1), pad_id, jnp.int32).at[:, 0].set(first),
        "row_n_out": jnp.ones((batch,), jnp.int32),
        "n_out": jnp.int32(1),  # the fewest tokens out of any unfinished row (the driver's)
        "limit": jnp.asarray(limit, jnp.int32),
        "key": key,
        # per call: verify passes, proposals kept and row-passes (summed over active rows)
        "stats": {"cycles": zero, "accepted": zero, "row_cycles": zero},
    }


def _probs(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    return jax.nn.softmax(filtered_logits(logits, sampling), axis=-1)


def _accept(key, drafts, draft_probs, logits, sampling):
    """Per row and position i in [0, k]: whether proposal i survives, and the token to emit
    if the batch stops at i (the full model's own where the proposal is rejected or at i = k).

    drafts [B, k], draft_probs [B, k, V] (sampling) | None, logits [B, k+1, V]."""
    batch, k = drafts.shape
    if sampling.greedy:
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, k+1]
        return drafts == target[:, :k], target
    p = _probs(logits, sampling)  # [B, k+1, V]
    k_accept, k_resample, k_last = jax.random.split(key, 3)
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
    accepted = jax.random.uniform(k_accept, (batch, k)) * q_d < p_d  # u < p/q
    residual = jnp.maximum(p[:, :k] - draft_probs, 0.0)
    # where p == q exactly the residual is empty; acceptance is then certain (u*q < p)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p[:, :k])
    resampled = jax.random.categorical(k_resample, jnp.log(residual), axis=-1).astype(jnp.int32)
    last = jax.random.categorical(k_last, jnp.log(p[:, k]), axis=-1).astype(jnp.int32)
    emit = jnp.concatenate([jnp.where(accepted, drafts, resampled), last[:, None]], axis=1)
    return accepted, emit


@functools.partial(
    jax.jit,
    static_argnames=("decoder", "n_steps", "sampling", "eos_ids", "pad_id", "record_top_k"),
    donate_argnames=("state",),
)
def advance(
    decoder: SpeculativeDecoder,
    params: Any,
    state: dict[str, Any],
    *,
    n_steps: int,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
    pad_id: int,
    record_top_k: int = 0,
) -> dict[str, Any]:
    """Run cycles on device until at least ``n_steps`` more tokens are out (or all done)."""
    spec, k = decoder, decoder.k
    eos = jnp.asarray(eos_ids, jnp.int32)
    target_out = state["n_out"] + n_steps
    offsets = jnp.arange(k + 1, dtype=jnp.int32)

    def active(s):  # rows still generating
        return ~s["done"] & (s["row_n_out"] < s["limit"])

    def cond(s):
        return (s["n_out"] < jnp.minimum(target_out, s["limit"])) & jnp.any(active(s))

    def body(s):
        slot, position, kv_valid = s["slot"], s["position"], s["kv_valid"]
        slots = jnp.arange(kv_valid.shape[1])
        rel = slots[None] - slot[:, None]  # [B, S]: slot offsets from each row's token
        key = jax.random.fold_in(s["key"], s["stats"]["cycles"] + 1)  # 0: the first token
        draft_keys = jax.random.split(jax.random.fold_in(key, 1), k)
        caches = s["caches"]
        draft_caches, token = caches["draft"], s["token"]
        drafts, draft_probs = [], []
        for j in range(k):  # k draft steps, unrolled (k is small and static)
            step_valid = kv_valid | ((rel >= 0) & (rel <= j))
            logits, draft_caches = step(
                spec.draft,
                params,
                draft_caches,
                token[:, None],
                (position + j)[:, None],
                step_valid,
                slot + j,
            )
            token = sample_tokens(logits, draft_keys[j], sampling)
            drafts.append(token)
            if not sampling.greedy:
                draft_probs.append(_probs(logits, sampling))
        drafts = jnp.stack(drafts, axis=1)  # [B, k]
        proposals = jnp.concatenate([s["token"][:, None], drafts], axis=1)  # [B, k+1]
        verify_valid = kv_valid | ((rel >= 0) & (rel <= k))
        hidden, full_caches, tail, rope = _verify(
            spec, params, caches["full"], proposals, position[:, None] + offsets, verify_valid, slot
        )
        logits = spec.full.head(params[0], hidden)  # [B, k+1, V]
        accepted, emit = _accept(
            jax.random.fold_in(key, 2),
            drafts,
            jnp.stack(draft_probs, axis=1) if draft_probs else None,
            logits,
            sampling,
        )
        live = active(s)
        kept = jnp.sum(jnp.cumprod(accepted, axis=1), axis=1)  # [B] proposals each row keeps
        bonus = jnp.take_along_axis(emit, kept[:, None], axis=1)[:, 0]  # the full model's
        # this cycle's tokens per row: proposals 1..kept, then the full model's at kept
        tokens_out = jnp.where(offsets < kept[:, None], jnp.pad(drafts, ((0, 0), (0, 1))), 0)
        tokens_out = jnp.where(offsets == kept[:, None], bonus[:, None], tokens_out)
        in_cycle = offsets <= kept[:, None]
        is_eos = jnp.isin(tokens_out, eos) & in_cycle
        after_eos = jnp.cumsum(is_eos, axis=1) - is_eos > 0  # strictly after a row's EOS
        tokens_out = jnp.where(~live[:, None] | after_eos | ~in_cycle, pad_id, tokens_out)
        out = jax.vmap(lambda o, t, n: jax.lax.dynamic_update_slice_in_dim(o, t, n, axis=0))(
            s["out"], tokens_out, s["row_n_out"]
        )

        n_kept = jnp.where(live, kept + 1, 0)  # inactive rows stay where they are
        new_valid = kv_valid | ((rel >= 0) & (rel < n_kept[:, None]))  # the rest rolls back
        if spec.shares_caches:
            draft_caches = _refresh_draft(
                spec, params, draft_caches, full_caches, tail, rope, slot, k + 1
            )
        else:  # rows that kept all k: the last proposal is not in the draft's caches yet

            def feed_last(c):
                return spec.draft.extend(
                    params,
                    c,
                    drafts[:, -1:],
                    (position + k)[:, None],
                    new_valid | (rel == k),
                    slot + k,
                )[1]

            draft_caches = jax.lax.cond(jnp.any(kept == k), feed_last, lambda c: c, draft_caches)
        row_n_out = s["row_n_out"] + n_kept
        done = s["done"] | jnp.any(is_eos & live[:, None], axis=1)
        unfinished = ~done & (row_n_out < s["limit"])
        n_out = jnp.min(jnp.where(unfinished, row_n_out, jnp.max(row_n_out)))
        stats = s["stats"]
        stats = {
            "cycles": stats["cycles"] + 1,
            "accepted": stats["accepted"] + jnp.sum(jnp.where(live, kept, 0)),
            "row_cycles": stats["row_cycles"] + jnp.sum(live),
        }
        return dict(
            s,
            caches={"full": full_caches, "draft": draft_caches},
            kv_valid=new_valid,
            token=jnp.where(live, bonus, s["token"]),
            position=position + n_kept,
            slot=slot + n_kept,
            done=done,
            out=out,
            row_n_out=row_n_out,
            n_out=n_out,
            stats=stats,
        )

    return jax.lax.while_loop(cond, body, state)


def summarise(stats: dict[str, Any], k: int) -> dict[str, float]:
    """Per-call numbers from a state's ``stats``: verify passes, tokens kept per pass and
    row (proposals kept + the full model's own), and the acceptance rate of proposals."""
    row_cycles = max(int(stats["row_cycles"]), 1)
    return {
        "verify_passes": int(stats["cycles"]),
        "row_passes": int(stats["row_cycles"]),  # verify passes summed over active rows
        "proposals_kept": int(stats["accepted"]),
        "tokens_per_verify": 1 + int(stats["accepted"]) / row_cycles,
        "acceptance_rate": int(stats["accepted"]) / (k * row_cycles),
    }
