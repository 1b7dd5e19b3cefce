"""Distillation losses, computed over response positions in chunks.

The LM head turns [B, R, d] hidden states into [B, R, V] logits: the largest buffer in
training. We never materialise it: positions are processed ``chunk`` at a time under
``jax.checkpoint``, so forward and backward hold one [B, chunk, V] slice at once. With
``remat=False`` (``loss.remat_logits: false``) the chunks' softmax is kept for the backward
pass instead of recomputed: one head matmul less per step, for [B, R, V] floats of memory
(100 MB at B=8, R=64 on SmolLM2) — the head is the largest cost of a stored-feature step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


def sparse_kl(logits, top_ids, top_logprobs, temperature: float) -> jax.Array:
    """KL(p || q) per position on the teacher's top-k ids (docs/DESIGN.md §4).

    p_i ∝ exp(logp_i / T) over the top-k; q = student softmax over the full vocabulary.
    """
    log_p = jax.nn.log_softmax(top_logprobs / temperature, axis=-1)
    log_q = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), top_ids, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def dense_kl(logits, teacher_logits, temperature: float) -> jax.Array:
    """KL(teacher || student) per position over the full vocabulary, both at temperature T."""
    log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_q = jax.nn.log_softmax(logits / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def cross_entropy(logits, targets) -> jax.Array:
    log_q = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_q, targets[..., None], axis=-1)[..., 0]


def hidden_match(z, target, mask, kind: str) -> jax.Array:
    """Per-row sums [B] of the distance between the YORO path's coherence input z and the
    full model's own state there (docs/DESIGN.md §4), on the difference divided by the
    target's RMS per position: SmolLM2's stream has a few channels hundreds of times larger
    than the rest, which a raw MSE would be all about. ``kind``: mse | smoothl1 (Huber,
    delta 1, as EAGLE's feature loss)."""
    target = target.astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.mean(target * target, axis=-1, keepdims=True) + 1e-6)
    diff = (z.astype(jnp.float32) - target) * scale
    per = jnp.mean(diff * diff if kind == "mse" else optax.huber_loss(diff), axis=-1)
    return jnp.sum(per * mask.astype(jnp.float32), axis=-1)


def chunked_sums(
    head: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,  # [B, R, d] student hidden states at predicting positions
    batch: dict[str, jax.Array],
    *,
    temperature: float,
    ce_weight: float,
    chunk: int,
    teacher_hidden: jax.Array | None = None,  # [B, R, d]: online mode
    remat: bool = True,
) -> dict[str, jax.Array]:
    """Per-row sums [B] over valid positions: kl, ce, top-1 agreement, position count;
    and ``agree_positions`` [B, R], the masked top-1 agreement at each response position.

    Per row, so that a per-sequence reward (REINFORCE router) can be formed from them.
    """
    b, r, _ = hidden.shape
    chunk = min(chunk, r)
    if r % chunk:
        raise ValueError(f"response length {r} is not a multiple of logits_chunk {chunk}")

    def split(x):  # [B, R, ...] -> [R/chunk, B, chunk, ...]
        return jnp.moveaxis(x.reshape(b, r // chunk, chunk, *x.shape[2:]), 1, 0)

    xs = {
        "hidden": split(hidden),
        "mask": split(batch["target_mask"]),
        "targets": split(batch["targets"]),
        "top_ids": split(batch["top_ids"]),
        "top_logprobs": split(batch["top_logprobs"]),
    }
    if teacher_hidden is not None:
        xs["teacher_hidden"] = split(teacher_hidden)

    def one_chunk(x):
        logits = head(x["hidden"])
        mask = x["mask"].astype(jnp.float32)
        if "teacher_hidden" in x:
            teacher_logits = jax.lax.stop_gradient(head(x["teacher_hidden"]))
            kl = dense_kl(logits, teacher_logits, temperature)
            teacher_top1 = jnp.argmax(teacher_logits, axis=-1)
        else:
            kl = sparse_kl(logits, x["top_ids"], x["top_logprobs"], temperature)
            teacher_top1 = x["top_ids"][..., 0]
        ce = cross_entropy(logits, x["targets"]) if ce_weight else jnp.zeros_like(kl)
        agree = (jnp.argmax(logits, axis=-1) == teacher_top1).astype(jnp.float32)
        sums = {
            "kl": jnp.sum(kl * mask, axis=-1),
            "ce": jnp.sum(ce * mask, axis=-1),
            "top1": jnp.sum(agree * mask, axis=-1),
            "count": jnp.sum(mask, axis=-1),
        }
        return sums, agree * mask

    chunk_fn = jax.checkpoint(one_chunk) if remat else one_chunk

    def body(total, x):
        sums, agree = chunk_fn(x)
        return jax.tree.map(jnp.add, total, sums), agree

    zero = {k: jnp.zeros((b,), jnp.float32) for k in ("kl", "ce", "top1", "count")}
    totals, agree = jax.lax.scan(body, zero, xs)  # agree: [R/chunk, B, chunk]
    return totals | {"agree_positions": jnp.moveaxis(agree, 0, 1).reshape(b, r)}
