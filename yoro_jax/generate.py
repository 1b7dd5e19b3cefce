"""KV-cached batched generation, shared by the full model and YORO.

A :class:`Decoder` knows how to *prefill* a left-padded prompt batch into its caches and
how to *step* one token. Everything else — sampling, EOS / stop strings / max tokens,
bucketed static shapes, the on-device ``lax.while_loop`` over steps with donated state —
lives here once.

Slot layout: prompts are left-padded to a bucketed length P, generated tokens go to slots
P, P+1, ...; ``kv_valid[b, s]`` marks real tokens, and positions count from each row's
first real token, so every row is computed exactly as if it were alone.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from yoro_jax import speculative
from yoro_jax.batch import left_pad
from yoro_jax.config import LlamaConfig

# the decoders, importable from here too (the engine's public API)
from yoro_jax.decoders import Decoder, LlamaDecoder, RecordingDecoder, step, take_rows  # noqa: E402, F401
from yoro_jax.sampling import SamplingConfig, sample_tokens
from yoro_jax.sharding import shard_batch, to_host

MIN_BUCKET = 16
GREEDY = SamplingConfig()


# ------------------------------------------------------------------ on-device generation
def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """Next power of two >= n (at least ``minimum``): a handful of compiled shapes."""
    return max(minimum, 1 << max(0, (n - 1)).bit_length())


def _pick(logits, key, sampling, record_top_k):
    """Next tokens [B], and (when recording) the top-k ids/log-probs [B, k] of the logits."""
    tokens = sample_tokens(logits, key, sampling)
    if not record_top_k:
        return tokens, None
    logprobs, ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), record_top_k)
    return tokens, (ids.astype(jnp.int32), logprobs)


@functools.partial(
    jax.jit,
    static_argnames=("decoder", "out_len", "sampling", "eos_ids", "pad_id", "record_top_k"),
)
def start(
    decoder: Decoder,
    params: Any,
    tokens: jax.Array,  # [B, P]
    valid: jax.Array,  # [B, P]
    key: jax.Array,
    limit: jax.Array,  # scalar: max new tokens
    *,
    out_len: int,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
    pad_id: int,
    record_top_k: int = 0,
) -> dict[str, Any]:
    """Prefill and pick the first new token; returns the decode state."""
    batch, prompt_len = tokens.shape
    kv_valid = jnp.zeros((batch, prompt_len + out_len), bool).at[:, :prompt_len].set(valid)
    logits, caches = decoder.prefill(params, tokens, valid, kv_valid)
    first, top = _pick(logits, jax.random.fold_in(key, 0), sampling, record_top_k)
    out = jnp.full((batch, out_len), pad_id, jnp.int32).at[:, 0].set(first)
    recorded = {}
    if record_top_k:
        shape = (batch, out_len, record_top_k)
        recorded = {
            "top_ids": jnp.zeros(shape, jnp.int32).at[:, 0].set(top[0]),
            "top_logprobs": jnp.zeros(shape, jnp.float32).at[:, 0].set(top[1]),
        }
    return recorded | {
        "caches": caches,
        "kv_valid": kv_valid,
        "token": first,
        "position": valid.sum(axis=-1).astype(jnp.int32),
        "slot": jnp.int32(prompt_len),
        "done": jnp.isin(first, jnp.asarray(eos_ids, jnp.int32)),
        "out": out,
        "n_out": jnp.int32(1),
        "limit": jnp.asarray(limit, jnp.int32),
        "key": key,
    }


@functools.partial(
    jax.jit,
    static_argnames=("decoder", "n_steps", "sampling", "eos_ids", "pad_id", "record_top_k"),
    donate_argnames=("state",),
)
def advance(
    decoder: Decoder,
    params: Any,
    state: dict[str, Any],
    *,
    n_steps: int,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
    pad_id: int,
    record_top_k: int = 0,
) -> dict[str, Any]:
    """Decode up to ``n_steps`` tokens on device (stops early when every row is done)."""
    eos = jnp.asarray(eos_ids, jnp.int32)

    def cond(carry):
        i, s = carry
        return (i < n_steps) & (s["n_out"] < s["limit"]) & ~jnp.all(s["done"])

    def body(carry):
        i, s = carry
        kv_valid = s["kv_valid"].at[:, s["slot"]].set(True)
        logits, caches = step(
            decoder,
            params,
            s["caches"],
            s["token"][:, None],
            s["position"][:, None],
            kv_valid,
            s["slot"],
        )
        key = jax.random.fold_in(s["key"], s["n_out"])
        new, top = _pick(logits, key, sampling, record_top_k)
        new = jnp.where(s["done"], pad_id, new)
        if record_top_k:
            s = dict(
                s,
                top_ids=s["top_ids"].at[:, s["n_out"]].set(top[0]),
                top_logprobs=s["top_logprobs"].at[:, s["n_out"]].set(top[1]),
            )
        s = dict(
            s,
            caches=caches,
            kv_valid=kv_valid,
            token=new,
            position=s["position"] + 1,
            slot=s["slot"] + 1,
            done=s["done"] | jnp.isin(new, eos),
            out=s["out"].at[:, s["n_out"]].set(new),
            n_out=s["n_out"] + 1,
        )
        return i + 1, s

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


# ---------------------------------------------------------------------- host-side driver
@dataclasses.dataclass
class Completion:
    tokens: list[int]  # generated tokens, including the EOS token if one ended the row
    text: str | None  # decoded text without special tokens, cut before any stop string
    finish_reason: str  # "eos" | "stop" | "length"
    # with record_top_k: the model's top-k ids / log-probs at each generated position
    top_ids: np.ndarray | None = None  # [len(tokens), k] int32
    top_logprobs: np.ndarray | None = None  # [len(tokens), k] float32
    # YORO: reasoning layers this prompt needed in the one reasoning pass (router-gated)
    reasoning_layers: int | None = None
    # RecordingDecoder: its states [len(depths), n, d] at the prompt's and at the generated
    # tokens' slots (the last generated token is never fed back: its row is zero)
    prompt_states: np.ndarray | None = None
    response_states: np.ndarray | None = None


def _find_stop(text: str, stop: Sequence[str]) -> int:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else -1


def generate_tokens(
    decoder: Decoder,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    sampling: SamplingConfig = GREEDY,
    seed: int = 0,
    tokenizer: Any = None,
    stop: Sequence[str] = (),
    on_update: Callable[[list[list[int]]], None] | None = None,
    chunk: int | None = None,
    record_top_k: int = 0,
    mesh: Any = None,
    stats: dict[str, Any] | None = None,
) -> list[Completion]:
    """Generate for a batch of token prompts of any lengths.

    ``stop`` strings need ``tokenizer``. ``on_update`` receives every row's tokens so far
    after each chunk of ``chunk`` steps (streaming); without it and without stop strings
    the whole generation is one device call. ``record_top_k > 0`` also returns the model's
    top-k token ids and log-probs at every generated position (teacher data). With a
    ``mesh`` (:mod:`yoro_jax.sharding`) the batch is split over its devices; shard
    ``params`` with :func:`~yoro_jax.sharding.shard_params` first.

    A :class:`~yoro_jax.speculative.SpeculativeDecoder` runs its own on-device loop under
    the same driver; ``stats`` (a dict) then receives its per-call numbers (verify passes,
    tokens kept per pass, acceptance rate).
    """
    engine_start, engine_advance = (
        (speculative.start, speculative.advance)
        if isinstance(decoder, speculative.SpeculativeDecoder)
        else (start, advance)
    )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    eos = tuple(sorted(set(int(e) for e in eos_ids)))
    n_prompts = len(prompts)
    if mesh is not None and len(prompts) % mesh.size:  # rows must split over the devices
        prompts = list(prompts) + [prompts[0]] * (mesh.size - len(prompts) % mesh.size)
    tokens, valid = left_pad(prompts, bucket(max(map(len, prompts))), pad_id)
    tokens, valid = shard_batch((tokens, valid), mesh)
    out_len = bucket(max_new_tokens)
    statics = {"sampling": sampling, "eos_ids": eos, "pad_id": pad_id, "record_top_k": record_top_k}
    state = engine_start(
        decoder,
        params,
        tokens,
        valid,
        jax.random.key(seed),
        max_new_tokens,
        out_len=out_len,
        **statics,
    )
    if chunk is None:
        chunk = 8 if (on_update or stop) else max_new_tokens
    batch = len(prompts)
    stopped_at: dict[int, tuple[int, str]] = {}  # row -> (n tokens, text)
    while True:
        # a speculative cycle can pass max_new_tokens: the rest is cut here
        n_out, done = min(int(to_host(state["n_out"])), max_new_tokens), to_host(state["done"])
        out = to_host(state["out"])[:, :n_out]
        if stop:
            for row in range(batch):
                if row not in stopped_at:
                    hit = _stop_hit(tokenizer, out[row], stop)
                    if hit is not None:
                        stopped_at[row] = hit
            if stopped_at:
                mask = np.zeros(batch, bool)
                mask[list(stopped_at)] = True
                state["done"] = jnp.asarray(done | mask)
        if on_update is not None:
            on_update([_trim(out[row], eos, stopped_at.get(row)) for row in range(n_prompts)])
        finished = done | np.isin(np.arange(batch), list(stopped_at))
        if n_out >= max_new_tokens or finished.all():
            break
        state = engine_advance(decoder, params, state, n_steps=chunk, **statics)
    completions = [
        _completion(out[row], eos, stopped_at.get(row), tokenizer) for row in range(batch)
    ]
    if stats is not None and "stats" in state:
        stats.update(speculative.summarise(state["stats"], decoder.k))
    layers = decoder.reasoning_layers(state["caches"])
    if layers is not None:
        for completion, count in zip(completions, to_host(layers).tolist(), strict=True):
            completion.reasoning_layers = int(count)
    if isinstance(decoder, RecordingDecoder):
        states, width = to_host(decoder.recorded(state["caches"])), tokens.shape[1]
        for row, completion in enumerate(completions[:n_prompts]):
            n, p = len(completion.tokens), len(prompts[row])
            completion.prompt_states = states[row, :, width - p : width]
            completion.response_states = states[row, :, width : width + n].copy()
            completion.response_states[:, n - 1] = 0  # not fed back (or fed after the end)
    if record_top_k:
        top_ids, top_logprobs = to_host(state["top_ids"]), to_host(state["top_logprobs"])
        for row, completion in enumerate(completions):
            n = len(completion.tokens)
            completion.top_ids, completion.top_logprobs = top_ids[row, :n], top_logprobs[row, :n]
    return completions[:n_prompts]


def _stop_hit(
    tokenizer: Any, row_tokens: np.ndarray, stop: Sequence[str]
) -> tuple[int, str] | None:
    """(tokens needed to complete the first stop string, text before it) or None."""
    text = tokenizer.decode(row_tokens, skip_special_tokens=True)
    if _find_stop(text, stop) < 0:
        return None
    for n in range(1, len(row_tokens) + 1):
        prefix = tokenizer.decode(row_tokens[:n], skip_special_tokens=True)
        cut = _find_stop(prefix, stop)
        if cut >= 0:
            return n, prefix[:cut]
    return None  # unreachable: the full text contains a stop string


def _trim(
    row_tokens: np.ndarray, eos: tuple[int, ...], stopped: tuple[int, str] | None
) -> list[int]:
    tokens = row_tokens.tolist()
    if stopped is not None:
        tokens = tokens[: stopped[0]]
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def _completion(row_tokens, eos, stopped, tokenizer) -> Completion:
    tokens = _trim(row_tokens, eos, stopped)
    if stopped is not None and (not tokens or tokens[-1] not in eos):
        return Completion(tokens, stopped[1], "stop")
    reason = "eos" if tokens and tokens[-1] in eos else "length"
    text = tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None
    return Completion(tokens, text, reason)


# ----------------------------------------------------------------------- text interface
def encode_prompt(tokenizer: Any, text: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids for a prompt, through the tokenizer's chat template when ``chat``."""
    if not chat:
        return list(tokenizer(text)["input_ids"])
    if tokenizer.chat_template is None:
        raise ValueError("this model's tokenizer has no chat template; run without --chat")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def special_ids(cfg: LlamaConfig, tokenizer: Any) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id) from the model config and tokenizer."""
    eos = set(cfg.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    pad = cfg.pad_token_id
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(eos) if eos else 0
    return tuple(sorted(eos)), int(pad)


if __name__ == "__main__":  # python -m yoro_jax.generate: the command line
    from yoro_jax.generate_cli import main

    sys.exit(main())
