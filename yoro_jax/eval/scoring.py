"""Batched continuation scoring (docs/DESIGN.md §6), the same code for the full model and YORO.

A request is ``(context tokens, continuation tokens)``. Scoring runs a model's
:class:`~yoro_jax.generate.Decoder` exactly as generation would, teacher-forced:

* ``prefill`` the context once (YORO: the one reasoning pass) — its last logits score the
  first continuation token;
* ``extend`` the caches by the whole continuation in one call — its hidden states score
  the remaining tokens.

So a YORO log-likelihood is literally what YORO assigns while generating the continuation,
and requests that share a context (the choices of a multiple-choice question) share its
prefill: every continuation of a context is scored against the same caches.

Static shapes: a batch holds a power-of-two number of distinct contexts (left-padded to a
bucketed width P: multiples of 16, 4 buckets per power of two) and of continuations
(right-padded to a power-of-two width R), so XLA compiles one program per bucket, not one
per batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from yoro_jax.batch import left_pad
from yoro_jax.generate import Decoder, bucket, take_rows
from yoro_jax.sharding import shard_batch

HEAD_CHUNK = 128  # positions per LM-head call: [B, chunk, V] logits at a time
ROWS_PER_CONTEXT = 4  # continuation rows per context row in a batch (multiple choice)


def length_bucket(n: int, step: int) -> int:
    """Round up to a multiple of ``step``, coarsening to 4 buckets per power of two:
    at most ~25% padding and a handful of compiled shapes."""
    step = max(step, 1 << max(0, (n - 1).bit_length() - 3))
    return max(step, -(-n // step) * step)


@functools.partial(jax.jit, static_argnames=("decoder",))
def score_continuations(
    decoder: Decoder,
    params: Any,
    ctx_tokens: jax.Array,  # [C, P] left-padded contexts
    ctx_valid: jax.Array,  # [C, P]
    owner: jax.Array,  # [N] which context each continuation row continues
    conts: jax.Array,  # [N, R] right-padded continuations
    cont_valid: jax.Array,  # [N, R]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of log p(continuation) [N] float32, every token greedy [N] bool, reasoning
    layers the row's context needed [N] int32; -1 for a model without a reasoning block)."""
    prompt_len = ctx_tokens.shape[1]
    rows, width = conts.shape
    kv_valid = jnp.zeros((ctx_tokens.shape[0], prompt_len + width), bool)
    kv_valid = kv_valid.at[:, :prompt_len].set(ctx_valid)
    first_logits, caches = decoder.prefill(params, ctx_tokens, ctx_valid, kv_valid)

    def per_row(x):  # [C, ...] -> [N, ...]: each row reads its own context's copy
        return jnp.take(x, owner, axis=0)

    layers = decoder.reasoning_layers(caches)
    layers = jnp.full((rows,), -1, jnp.int32) if layers is None else per_row(layers)

    positions = per_row(ctx_valid.sum(-1).astype(jnp.int32))[:, None] + jnp.arange(width)[None]
    hidden, _ = decoder.extend(
        params,
        take_rows(caches, owner),
        conts,
        positions,
        per_row(kv_valid).at[:, prompt_len:].set(cont_valid),
        prompt_len,
    )  # hidden [N, R, d]; slot j predicts continuation token j+1

    first_logprobs = jax.nn.log_softmax(per_row(first_logits), axis=-1)  # [N, V]
    total = jnp.take_along_axis(first_logprobs, conts[:, :1], axis=-1)[:, 0]
    greedy = jnp.argmax(first_logprobs, axis=-1) == conts[:, 0]
    targets = jnp.concatenate([conts[:, 1:], conts[:, :1]], axis=1)
    target_valid = jnp.concatenate([cont_valid[:, 1:], jnp.zeros_like(cont_valid[:, :1])], 1)
    chunk = math.gcd(width, HEAD_CHUNK)

    def split(x):  # [N, R, ...] -> [R/chunk, N, chunk, ...]
        return jnp.moveaxis(x.reshape(rows, width // chunk, chunk, *x.shape[2:]), 1, 0)

    def body(carry, xs):
        h, tgt, mask = xs
        logprobs = jax.nn.log_softmax(decoder.head(params, h), axis=-1)  # [N, chunk, V]
        picked = jnp.take_along_axis(logprobs, tgt[..., None], axis=-1)[..., 0]
        hit = jnp.argmax(logprobs, axis=-1) == tgt
        total, greedy = carry
        return (
            total + jnp.sum(jnp.where(mask, picked, 0.0), -1),
            greedy & jnp.all(hit | ~mask, -1),
        ), None

    xs = (split(hidden), split(targets), split(target_valid))
    return *jax.lax.scan(body, (total, greedy), xs)[0], layers


@dataclasses.dataclass(frozen=True)
class Batch:
    """Up to ``batch_size`` requests, their distinct contexts, and the bucketed shapes."""

    requests: list[int]
    contexts: list[tuple[int, ...]]
    prompt_len: int  # P
    width: int  # R


def continuation_bucket(n: int) -> int:
    """Continuation widths round up to a power of two (at least 4): continuations are short,
    so padding them costs little, and fewer widths mean fewer compiled programs."""
    return max(4, 1 << max(0, (n - 1).bit_length()))


def plan_batches(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int
) -> Iterator[Batch]:
    """Batches of up to ``batch_size`` contexts and ``ROWS_PER_CONTEXT * batch_size``
    continuations with similar bucketed shapes, longest first.

    Requests are grouped by context first, so every continuation of a context (the
    choices of a question) lands in the same batch and shares its one prefill; groups
    are then ordered by (context bucket, widest continuation bucket), so a task compiles
    a handful of programs, not one per batch. Longest first surfaces out-of-memory errors
    at once.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    max_rows = ROWS_PER_CONTEXT * batch_size

    def key(item: tuple[tuple[int, ...], list[int]]) -> tuple:
        ctx, members = item
        width = max(continuation_bucket(len(pairs[i][1])) for i in members)
        return length_bucket(len(ctx), 16), width, ctx

    def batch(requests: list[int], contexts: list[tuple[int, ...]]) -> Batch:
        return Batch(
            requests,
            contexts,
            max(length_bucket(len(c), 16) for c in contexts),
            max(continuation_bucket(len(pairs[i][1])) for i in requests),
        )

    current: list[int] = []
    contexts: list[tuple[int, ...]] = []
    for ctx, members in sorted(groups.items(), key=key, reverse=True):
        for start in range(0, len(members), max_rows):  # a context with very many continuations
            chunk = members[start : start + max_rows]
            if current and (len(contexts) == batch_size or len(current) + len(chunk) > max_rows):
                yield batch(current, contexts)
                current, contexts = [], []
            current += chunk
            contexts.append(ctx)
    if current:
        yield batch(current, contexts)


def score_pairs(
    decoder: Decoder,
    params: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    pad_id: int,
    progress: Any = None,
    mesh: Any = None,
    reasoning_layers: list[int] | None = None,
) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of every (context, continuation) token pair.

    ``reasoning_layers``: a list to append, per pair, the reasoning layers its context
    needed (YORO; -1 for the full model).

    ``batch_size`` counts contexts per forward pass. Context and continuation rows are
    padded to powers of two (repeating real ones), so compiled shapes depend only on
    buckets. With a ``mesh`` (params already sharded) rows are split over its devices.
    """
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("every request needs a non-empty context and continuation")
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    needed = [-1] * len(pairs)
    for plan in plan_batches(pairs, batch_size):
        n_ctx, n_rows = bucket(len(plan.contexts), 1), bucket(len(plan.requests), 1)
        if mesh is not None:  # rows must split evenly over the devices
            n_ctx, n_rows = (-(-n // mesh.size) * mesh.size for n in (n_ctx, n_rows))
        contexts = plan.contexts + [plan.contexts[0]] * (n_ctx - len(plan.contexts))
        ctx_tokens, ctx_valid = left_pad(contexts, plan.prompt_len, pad_id)
        index = {ctx: c for c, ctx in enumerate(plan.contexts)}
        owner = np.zeros(n_rows, np.int32)
        conts = np.full((n_rows, plan.width), pad_id, np.int32)
        cont_valid = np.zeros(conts.shape, bool)
        cont_valid[:, 0] = True  # padding rows: one dummy token, result ignored
        for row, i in enumerate(plan.requests):
            ctx, cont = pairs[i]
            owner[row] = index[tuple(ctx)]
            conts[row, : len(cont)] = cont
            cont_valid[row, : len(cont)] = True
        ctx_arrays = shard_batch((ctx_tokens, ctx_valid), mesh)
        cont_arrays = shard_batch((owner, conts, cont_valid), mesh)
        total, greedy, layers = score_continuations(decoder, params, *ctx_arrays, *cont_arrays)
        total, greedy, layers = np.asarray(total), np.asarray(greedy), np.asarray(layers)
        for row, i in enumerate(plan.requests):
            results[i] = (float(total[row]), bool(greedy[row]))
            needed[i] = int(layers[row])
        if progress is not None:
            progress.update(len(plan.requests))
    if reasoning_layers is not None:
        reasoning_layers.extend(needed)
    return results  # type: ignore[return-value]
