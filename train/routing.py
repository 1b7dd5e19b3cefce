"""Router training terms (docs/DESIGN.md §5): compute penalty, skip-rate target, entropy bonus,
and the policy gradient for routers that sample (REINFORCE).

The objective is chosen by what the router returns, not by its name: a router that
returns log-probabilities of its sampled gates is trained by policy gradient on
``reward = -distillation loss - lambda * compute``; otherwise the gates carry
straight-through gradients and the compute penalty is differentiated directly.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from train.config import RouterTrainSection
from yoro_jax.router import RouterOutput, bernoulli_entropy, compute_fraction


def temperature_at(rt: RouterTrainSection, step: int, steps_per_epoch: float) -> float:
    """Gumbel temperature for optimizer step ``step`` (1-based): ×decay per finished epoch."""
    epoch = math.floor((step - 1) / max(steps_per_epoch, 1e-9)) if step > 0 else 0
    return max(rt.min_temperature, rt.temperature * rt.temperature_decay**epoch)


def _masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over rows (and real prompt tokens for token-level [B, P, R] arrays)."""
    if x.ndim == 2:
        return jnp.mean(x)
    weights = valid.astype(jnp.float32)[..., None]
    return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights) * x.shape[-1], 1.0)


def _per_layer_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """[R] mean per reasoning layer over rows (and real prompt tokens)."""
    if x.ndim == 2:
        return jnp.mean(x, axis=0)
    weights = valid.astype(jnp.float32)[..., None]
    return jnp.sum(x * weights, axis=(0, 1)) / jnp.maximum(jnp.sum(weights), 1.0)


def router_objective(
    routing: RouterOutput,
    row_distill: jax.Array,  # [B] each sequence's mean distillation loss
    prompt_valid: jax.Array,  # [B, P]
    rt: RouterTrainSection,
    step: jax.Array,
    ema_baseline: jax.Array,  # scalar: moving average of the reward
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Router loss terms and metrics (``baseline`` in the metrics is the updated average)."""
    compute = compute_fraction(routing.gates, prompt_valid, rt.depth_scale)  # [B]
    skip_soft = 1.0 - _masked_mean(routing.probs, prompt_valid)
    entropy = _masked_mean(bernoulli_entropy(routing.probs), prompt_valid)
    loss = -rt.entropy_weight * entropy
    if rt.target_skip_rate is not None:
        loss += rt.target_weight * (skip_soft - rt.target_skip_rate) ** 2

    metrics: dict[str, Any] = {}
    if routing.log_prob is not None:  # policy gradient
        reward = jax.lax.stop_gradient(-(row_distill + rt.compute_penalty * compute))
        mean_reward = jnp.mean(reward)
        if routing.value is not None:  # learned baseline: a value head, regressed on reward
            baseline = routing.value
            loss += jnp.mean((reward - routing.value) ** 2)
        else:  # moving average over steps; the first step starts it at its own mean
            baseline = jnp.where(step == 0, mean_reward, ema_baseline)
        advantage = jax.lax.stop_gradient(reward - baseline)
        loss += -jnp.mean(advantage * routing.log_prob)
        m = rt.baseline_momentum
        metrics |= {
            "reward": mean_reward,
            "baseline": jnp.where(step == 0, mean_reward, m * ema_baseline + (1 - m) * mean_reward),
        }
    else:  # straight-through gates: the compute penalty is differentiable
        loss += rt.compute_penalty * jnp.mean(compute)
        metrics["baseline"] = ema_baseline

    gates = jax.lax.stop_gradient(routing.gates)
    layer_on = _per_layer_mean(gates, prompt_valid)  # [R]
    metrics |= {
        "active_layers": jnp.sum(layer_on),
        "skip_rate": 1.0 - jnp.mean(layer_on),
        "gate_entropy": entropy,
    }
    return loss, metrics
