"""The jitted train step: optimizer, per-row loss terms over the YORO teacher-forcing pass,
gradients into the trainable pytree only (docs/DESIGN.md §4)."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from train.config import LossSection, RunConfig
from train.loss import chunked_sums, hidden_match
from train.routing import router_objective
from yoro_jax.llama import Params
from yoro_jax.yoro import Yoro


# ------------------------------------------------------------------------ optimizer
def lr_schedule(cfg: RunConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup (if any) then cosine decay to 0 over ``total_steps`` optimizer steps."""
    o = cfg.optim
    decay_steps = max(total_steps, o.warmup_steps + 1)
    if o.warmup_steps == 0:
        return optax.cosine_decay_schedule(o.lr, decay_steps)
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, decay_steps, 0.0)


def make_optimizer(cfg: RunConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW on :func:`lr_schedule` with global-norm clipping; optional accumulation.

    Stage 2 (``router_train.train_nets: false``): only the router is updated; the YORO
    nets get zero updates and no optimizer state.
    """
    o = cfg.optim
    tx = optax.chain(
        optax.clip_by_global_norm(o.clip_norm) if o.clip_norm > 0 else optax.identity(),
        optax.adamw(lr_schedule(cfg, total_steps), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
    )
    if not cfg.router_train.train_nets:
        tx = optax.multi_transform({"train": tx, "keep": optax.set_to_zero()}, _router_labels)
    if o.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum)
    return tx


def _router_labels(trainable: Params) -> Params:
    return {
        name: jax.tree.map(lambda _, n=name: "train" if n == "router" else "keep", tree)
        for name, tree in trainable.items()
    }


# ------------------------------------------------------------------------- the step
def row_sums(
    model: Yoro,
    frozen: Params,
    trainable: Params,
    batch: dict[str, jax.Array],
    prompt_len: int,
    *,
    online: bool,
    temperature: float,
    ce_weight: float,
    chunk: int,
    hidden_weight: float = 0.0,
    hidden_loss: str = "mse",
    remat_logits: bool = True,
    **routing_args: Any,
) -> tuple[dict[str, jax.Array], Any]:
    """Per-row sums [B] of the loss terms over valid response positions, and the routing
    (``routing_args``: fixed ``gates``, or ``key``/``router_temperature`` to sample).

    A batch with stored frozen features (``e_response`` ...) runs only the trainable path
    and the coherence block after the prompt; otherwise the frozen blocks are recomputed.
    """
    tokens, valid = batch["tokens"], batch["valid"]
    resp_len = batch["targets"].shape[1]
    if "e_response" in batch and model.router is None:
        h_yoro, z = model.yoro_from_stored(frozen, trainable, batch, valid)
        h_first, routing = batch["h_first"][:, None].astype(h_yoro.dtype), None
    else:
        out = model.hidden_states(frozen, trainable, tokens, valid, prompt_len, **routing_args)
        h_yoro, z, routing, h_first = out.h_yoro, out.z_yoro, out.routing, out.h_reason[:, -1:]
    # Position P-1+j predicts response token j; the last input token predicts nothing.
    hidden = jnp.concatenate([h_first, h_yoro], axis=1)[:, :resp_len]
    teacher_hidden = teacher_z = None
    if online or (hidden_weight and "teacher_hidden" not in batch):
        _, coherence_input, final, _ = model.full_pass(frozen, tokens, valid)
        window = slice(prompt_len - 1, prompt_len - 1 + resp_len)
        teacher_hidden = jax.lax.stop_gradient(final[:, window])
        teacher_z = jax.lax.stop_gradient(coherence_input[:, prompt_len:])
    sums = chunked_sums(
        lambda h: model.logits(frozen, h),
        hidden,
        batch,
        temperature=temperature,
        ce_weight=ce_weight,
        chunk=chunk,
        teacher_hidden=teacher_hidden if online else None,
        remat=remat_logits,
    )
    if hidden_weight:
        target = batch.get("teacher_hidden", teacher_z)
        # z at position P+i predicts response token i+1: mask of targets 1..R-1
        sums["hidden"] = hidden_match(
            z[:, : resp_len - 1],
            target[:, : resp_len - 1],
            batch["target_mask"][:, 1:],
            hidden_loss,
        )
    return sums, routing


def loss_options(loss: LossSection) -> tuple[tuple[str, Any], ...]:
    """The train step's static loss options (hashable) from the config's loss section."""
    return (
        ("online", loss.mode == "online"),
        ("temperature", loss.soft_temperature),
        ("ce_weight", loss.ce_weight),
        ("chunk", loss.logits_chunk),
        ("hidden_weight", loss.hidden_weight),
        ("hidden_loss", loss.hidden_loss),
        ("remat_logits", loss.remat_logits),
    )


def loss_sums(model, frozen, trainable, batch, prompt_len, **opts) -> dict[str, jax.Array]:
    """Sums of the loss terms over the batch's valid response positions."""
    sums, _ = row_sums(model, frozen, trainable, batch, prompt_len, **opts)
    return {key: jnp.sum(value) for key, value in sums.items()}


@partial(
    jax.jit,
    static_argnames=("model", "tx", "prompt_len", "loss_opts", "router_opts"),
    donate_argnums=(2,),
)
def train_step(
    model: Yoro,
    frozen: Params,
    state: dict[str, Any],
    batch: dict[str, jax.Array],
    *,
    tx: optax.GradientTransformation,
    prompt_len: int,
    loss_opts: tuple[tuple[str, Any], ...],
    router_opts: Any = None,  # RouterTrainSection (hashable view), with a router
    temperature: jax.Array | float = 1.0,  # the router's Gumbel temperature this step
) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """One micro-batch: gradients of the trainable pytree only (frozen is a plain input).

    With a router, its gates are sampled from ``fold_in(rng, step)`` (so a resumed run
    draws the same gates) and its loss terms (:mod:`train.routing`) are added.
    """
    opts = dict(loss_opts)
    ce_weight, hidden_weight = opts["ce_weight"], opts["hidden_weight"]
    routed = model.router is not None
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

    def loss_fn(trainable):
        if routed and not router_opts.train_nets:  # stage 2: no gradients into the nets
            trainable = {
                k: v if k == "router" else jax.lax.stop_gradient(v) for k, v in trainable.items()
            }
        routing_args = {"key": key, "router_temperature": temperature} if routed else {}
        rows, routing = row_sums(
            model, frozen, trainable, batch, prompt_len, **opts, **routing_args
        )
        sums = {k: jnp.sum(v) for k, v in rows.items()}
        count = jnp.maximum(sums["count"], 1.0)
        hidden = sums.get("hidden", 0.0)
        loss = (sums["kl"] + ce_weight * sums["ce"] + hidden_weight * hidden) / count
        if not routed:
            return loss, (sums, {})
        row_hidden = hidden_weight * rows["hidden"] if hidden_weight else 0.0
        row_loss = (rows["kl"] + ce_weight * rows["ce"] + row_hidden) / jnp.maximum(
            rows["count"], 1.0
        )
        extra, router_metrics = router_objective(
            routing,
            row_loss,
            batch["valid"][:, :prompt_len],
            router_opts,
            state["step"],
            state["baseline"],
        )
        return loss + extra, (sums, router_metrics | {"distill": loss})

    (loss, (sums, router_metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["trainable"]
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    new_state = {
        "trainable": optax.apply_updates(state["trainable"], updates),
        "opt_state": opt_state,
        "step": state["step"] + 1,
        "rng": state["rng"],
        # response positions trained on so far (the x-axis of agreement vs data)
        "tokens_seen": state["tokens_seen"] + jnp.sum(batch["target_mask"], dtype=jnp.int32),
    }
    if routed:
        new_state["baseline"] = router_metrics["baseline"]
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **sums, **router_metrics}
    return new_state, metrics
