"""Routers: which reasoning layers the one reasoning pass runs (docs/DESIGN.md §5).

A router reads the embedding block's output ``e [B, P, d]`` over the prompt and gives a
gate per reasoning layer -- per sequence (``[B, R]``, pooled over real prompt tokens) or
per token (``[B, P, R]``). The reasoning block applies ``h <- g*Layer(h) + (1-g)*h``.

Every router implements :class:`Router`; YORO only calls that protocol, so a new variant
is a class here plus :func:`register_router`, with no change to the model code::

    init(key, hidden_size, num_layers) -> params            (float32)
    sample(params, e, valid, key=, temperature=) -> RouterOutput   training: stochastic
    decide(params, e, valid) -> gates                        inference: deterministic 0/1

Both built-in variants share the reference's gating MLP (d -> d/2 -> d/4 -> R, GELU) and
its deterministic rule (keep a layer where p(keep) > threshold):

* ``gumbel``: two-class Gumbel-softmax, hard 0/1 in the forward pass with straight-through
  gradients, float32, temperature annealed by the trainer.
* ``reinforce``: Bernoulli(sigmoid(logits)) gates; the trainer turns the returned
  log-probabilities into a policy gradient with a baseline.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from yoro_jax.config import ConfigError

Params = Any
GRANULARITIES = ("sequence", "token")
BASELINES = ("ema", "learned")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """What a router is (saved with the nets); how it is trained lives in the train config."""

    kind: str = "none"  # none | gumbel | reinforce | any registered variant
    granularity: str = "sequence"  # sequence: one gate per prompt; token: per prompt token
    threshold: float = 0.5  # inference: run a layer where p(keep) > threshold
    init_bias: float = 2.0  # initial keep logit (sigmoid(2) = 0.88): start near full depth
    baseline: str = "ema"  # reinforce: moving-average or learned (value head) baseline

    def validate(self) -> RouterConfig:
        if self.kind != "none" and self.kind not in ROUTERS:
            raise ConfigError(
                f"router.kind: {self.kind!r} is not one of none, {', '.join(sorted(ROUTERS))}"
            )
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"router.granularity: {self.granularity!r} is not one of {', '.join(GRANULARITIES)}"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"router.threshold must be in (0, 1), got {self.threshold}")
        if self.baseline not in BASELINES:
            raise ConfigError(
                f"router.baseline: {self.baseline!r} is not one of {', '.join(BASELINES)}"
            )
        return self


class RouterOutput(NamedTuple):
    """Gates and what the losses need. Shapes: [B, R] (sequence) or [B, P, R] (token)."""

    gates: jax.Array  # 0/1 in the forward pass (Gumbel: straight-through gradients)
    probs: jax.Array  # p(keep), differentiable: regularisers and entropy use it
    log_prob: jax.Array | None = None  # [B] log-prob of the sampled gates (REINFORCE)
    value: jax.Array | None = None  # [B] learned baseline's reward prediction


class Router(Protocol):
    cfg: RouterConfig

    def init(self, key: jax.Array, hidden_size: int, num_layers: int) -> Params: ...

    def sample(
        self,
        params: Params,
        e: jax.Array,
        valid: jax.Array,
        *,
        key: jax.Array,
        temperature: jax.Array | float,
    ) -> RouterOutput: ...

    def decide(self, params: Params, e: jax.Array, valid: jax.Array) -> jax.Array: ...


ROUTERS: dict[str, type] = {}


def register_router(name: str):
    """Class decorator: make a router selectable as ``router.kind: name``."""

    def wrap(cls: type) -> type:
        ROUTERS[name] = cls
        return cls

    return wrap


def make_router(cfg: RouterConfig | None) -> Router | None:
    if cfg is None or cfg.kind == "none":
        return None
    return ROUTERS[cfg.validate().kind](cfg)


# ----------------------------------------------------------------------------- the net
class GateMLP(nn.Module):
    """The reference gating net: d -> d/2 -> d/4 -> R (GELU), float32 logits, on the
    RMS-normalised input."""

    num_layers: int
    init_bias: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        # parameter-free RMS norm: LLM residual streams carry outlier dimensions hundreds of
        # times larger than the rest, which would saturate the gates at the first update
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
        for i, width in enumerate((max(d // 2, 1), max(d // 4, 1))):
            x = jax.nn.gelu(nn.Dense(width, dtype=jnp.float32, name=f"hidden_{i}")(x))
        out = nn.Dense(
            self.num_layers,
            dtype=jnp.float32,
            bias_init=nn.initializers.constant(self.init_bias),
            kernel_init=nn.initializers.zeros,
            name="gates",
        )
        return out(x)


def pool(e: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of ``e [B, P, d]`` over real prompt tokens -> [B, d] (float32)."""
    weights = valid.astype(jnp.float32)[..., None]
    return jnp.sum(e.astype(jnp.float32) * weights, axis=1) / jnp.maximum(
        jnp.sum(weights, axis=1), 1.0
    )


@dataclasses.dataclass(frozen=True)
class MLPRouter:
    """Shared part of the built-in routers: gating MLP on pooled or per-token input."""

    cfg: RouterConfig

    @property
    def per_token(self) -> bool:
        return self.cfg.granularity == "token"

    def init(self, key: jax.Array, hidden_size: int, num_layers: int) -> Params:
        net = GateMLP(num_layers, self.cfg.init_bias)
        return {"net": net.init(key, jnp.zeros((1, hidden_size), jnp.float32))["params"]}

    def logits(self, params: Params, e: jax.Array, valid: jax.Array) -> jax.Array:
        """[B, R] (sequence) or [B, P, R] (token) keep-logits."""
        x = e.astype(jnp.float32) if self.per_token else pool(e, valid)
        num_layers = params["net"]["gates"]["bias"].shape[0]
        return GateMLP(num_layers, self.cfg.init_bias).apply({"params": params["net"]}, x)

    def value(self, params: Params, e: jax.Array, valid: jax.Array) -> jax.Array | None:
        if "value" not in params:
            return None
        return nn.Dense(1).apply({"params": params["value"]}, pool(e, valid))[:, 0]

    def token_mask(self, gates: jax.Array, valid: jax.Array) -> jax.Array:
        """Padding tokens never ask for a layer (token level); sequence gates unchanged."""
        return gates * valid[..., None].astype(gates.dtype) if self.per_token else gates

    def decide(self, params: Params, e: jax.Array, valid: jax.Array) -> jax.Array:
        probs = jax.nn.sigmoid(self.logits(params, e, valid))
        return self.token_mask((probs > self.cfg.threshold).astype(jnp.float32), valid)

    def sum_over_tokens(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        """[B, R] or [B, P, R] -> [B]: sums over layers (and real prompt tokens)."""
        if self.per_token:
            x = x * valid[..., None].astype(x.dtype)
        return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


@register_router("gumbel")
@dataclasses.dataclass(frozen=True)
class GumbelRouter(MLPRouter):
    """Straight-through two-class Gumbel-softmax (keep vs skip), float32."""

    def sample(self, params, e, valid, *, key, temperature) -> RouterOutput:
        logits = self.logits(params, e, valid)
        two = jnp.stack([logits, jnp.zeros_like(logits)], axis=-1)  # [..., (keep, skip)]
        noisy = (two + jax.random.gumbel(key, two.shape, jnp.float32)) / temperature
        soft = jax.nn.softmax(noisy, axis=-1)[..., 0]
        hard = (noisy[..., 0] > noisy[..., 1]).astype(jnp.float32)
        gates = hard + (soft - jax.lax.stop_gradient(soft))  # forward: exactly hard; grad: soft
        return RouterOutput(self.token_mask(gates, valid), jax.nn.sigmoid(logits))


@register_router("reinforce")
@dataclasses.dataclass(frozen=True)
class ReinforceRouter(MLPRouter):
    """Bernoulli gates; returns the sampled gates' log-probability for a policy gradient."""

    def init(self, key: jax.Array, hidden_size: int, num_layers: int) -> Params:
        params = super().init(key, hidden_size, num_layers)
        if self.cfg.baseline == "learned":  # a linear value head on the pooled input
            value = nn.Dense(1, kernel_init=nn.initializers.zeros)
            params["value"] = value.init(key, jnp.zeros((1, hidden_size)))["params"]
        return params

    def sample(self, params, e, valid, *, key, temperature=1.0) -> RouterOutput:
        del temperature  # not used: the policy samples at its own probabilities
        logits = self.logits(params, e, valid)
        gates = jax.random.bernoulli(key, jax.nn.sigmoid(logits)).astype(jnp.float32)
        gates = self.token_mask(gates, valid)
        log_prob = gates * jax.nn.log_sigmoid(logits) + (1 - gates) * jax.nn.log_sigmoid(-logits)
        return RouterOutput(
            gates,
            jax.nn.sigmoid(logits),
            log_prob=self.sum_over_tokens(log_prob, valid),
            value=self.value(params, e, valid),
        )


# ------------------------------------------------------------------------ accounting
def layer_weights(num_layers: int, depth_scale: float = 0.0) -> jax.Array:
    """Per-layer compute cost, mean 1: flat, or rising linearly with depth by ``depth_scale``
    (the deepest layer costs ``1 + depth_scale`` times the first, before normalising)."""
    w = 1.0 + depth_scale * jnp.linspace(0.0, 1.0, num_layers)
    return w / jnp.mean(w)


def compute_fraction(gates: jax.Array, valid: jax.Array, depth_scale: float = 0.0) -> jax.Array:
    """[B] (weighted) fraction of reasoning layers run; token level: mean over real tokens."""
    weighted = gates * layer_weights(gates.shape[-1], depth_scale)
    per_token = jnp.mean(weighted, axis=-1)  # [B] or [B, P]
    if per_token.ndim == 1:
        return per_token
    mask = valid.astype(per_token.dtype)
    return jnp.sum(per_token * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def layers_on(gates: jax.Array) -> jax.Array:
    """[B, R] the gate of each reasoning layer per sequence (token level: any of its tokens)."""
    return gates if gates.ndim == 2 else jnp.max(gates, axis=1)


def layers_needed(gates: jax.Array) -> jax.Array:
    """[B] reasoning layers each sequence needs run."""
    return jnp.sum(layers_on(gates) > 0, axis=-1).astype(jnp.int32)


def bernoulli_entropy(probs: jax.Array) -> jax.Array:
    p = jnp.clip(probs, 1e-6, 1 - 1e-6)
    return -(p * jnp.log(p) + (1 - p) * jnp.log1p(-p))
