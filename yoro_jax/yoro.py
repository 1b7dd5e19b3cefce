"""YORO: reason once on the prompt, then decode with embedding + compensation + coherence.

Given a base Llama with N layers and a :class:`YoroConfig` (E, C, Lc, La, Lk)::

    embedding block   token embedding + base layers [0, E)          frozen
    reasoning block   base layers [E, N-C)  -- run once, prompt only frozen
    coherence block   base layers [N-C, N) + final norm + LM head    frozen
    compensation      Lc decoder layers                              trainable
    adaptation        La-layer MLP                                   trainable
    concatenation     Lk-layer MLP                                   trainable
    router            optional: gates the reasoning layers           trainable

``frozen`` is the base model's params pytree itself (blocks are slices of its layer
stack, so the teacher shares it); ``trainable`` is a separate pytree
``{"compensation": stacked layers, "adaptation": {...}, "concatenation": {...}
[, "router": {...}]}``. Every block runs as one ``lax.scan`` over its layers.

Teacher forcing (docs/DESIGN.md §3) on the batch layout: prompts right-aligned to a
common boundary P (left padding), responses left-aligned after it (right padding)::

    e = Emb(x)                       all T positions, causal
    r = Reason(e[:, :P])             prompt only: the one reasoning pass (router-gated)
    logits[t] = Head(Coh(r))[t]      t < P   (t = P-1 predicts the first response token)
    logits[t] = Head(Coh(z))[t]      t >= P, z from the YORO path below

Three orthogonal choices shape the YORO path (``reference`` is the original system):

- ``nets``: ``reference`` is ``z = Concat(Adapt(r~) + Comp(e))`` with ReLU MLPs
  (r~ = r on the prompt, 0 after it); ``residual`` is ``z = K(Comp(A(x)))`` with
  ``A(x) = x + W_out silu(W_in rms(x))``, ``W_out = 0`` at init (likewise K), and x = r on
  the prompt, e after it — at step 0 the nets are the identity.
- ``prompt_context``: ``yoro`` — the compensation and coherence layers attend over the YORO
  path's own states at prompt positions (the reference); ``exact`` — at prompt positions
  each of them attends over K/V computed from the *full model's* hidden state at the depth
  it stands for (compensation layer j for base layer N-C-Lc+j, coherence layer i for base
  layer N-C+i), all of which the one reasoning pass computes. Only generated positions
  take the YORO path.
- ``compensation_init``: ``random`` (HF init), ``identity`` (HF init with zeroed output
  projections: each layer starts as the identity) or ``reasoning`` (copies of the base's
  last Lc reasoning layers, N-C-Lc .. N-C-1).

With ``nets: residual``, ``prompt_context: exact`` and ``compensation_init: reasoning``
the model at step 0 is exactly "skip the middle reasoning layers, with the full model's
prompt KV at every layer that runs" (the training-free floor).

The YORO path is written once (:meth:`Yoro.yoro_path`) and serves teacher forcing, prefill
and decoding; in ``exact`` mode teacher forcing *is* a multi-token decode step over the
response on caches prefilled from the reasoning pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from yoro_jax import llama
from yoro_jax import router as router_lib
from yoro_jax.config import ConfigError, LlamaConfig
from yoro_jax.llama import Params
from yoro_jax.router import Router, RouterConfig, RouterOutput

YORO_CONFIG_FILE = "yoro_config.json"
# 2: compensation layers stacked (one leading layer axis); 1: a list of layers
NETS_FORMAT_VERSION = 2
TRAINABLE_DIR = "trainable"
_CHOICES = {
    "prompt_context": ("yoro", "exact"),
    "nets": ("reference", "residual"),
    "compensation_init": ("random", "identity", "reasoning"),
}
# Named variants of the same model (the split sizes are set separately).
PRESETS: dict[str, dict[str, str]] = {
    "reference": {"prompt_context": "yoro", "nets": "reference", "compensation_init": "random"},
    "exact": {"prompt_context": "exact", "nets": "residual", "compensation_init": "reasoning"},
}


@dataclasses.dataclass(frozen=True)
class YoroConfig:
    """How the base model is split, the sizes of the trainable nets, and the variant."""

    embedding_layers: int = 2
    coherence_layers: int = 2
    compensation_layers: int = 2
    adaptation_layers: int = 2
    concatenation_layers: int = 1
    prompt_context: str = "yoro"  # yoro (reference) | exact
    nets: str = "reference"  # reference (ReLU MLPs) | residual (zero-initialised)
    compensation_init: str = "random"  # random | identity | reasoning
    router: RouterConfig = RouterConfig()  # kind "none": every reasoning layer runs

    @classmethod
    def preset(cls, name: str, **fields: Any) -> YoroConfig:
        if name not in PRESETS:
            raise ConfigError(f"yoro preset {name!r} is not one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **fields})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> YoroConfig:
        """From the saved JSON (nets saved before routers or variants existed lack those keys:
        they are reference nets without a router)."""
        return cls(
            **{**PRESETS["reference"], **raw, "router": RouterConfig(**raw.get("router", {}))}
        )

    def validate_fields(self) -> YoroConfig:
        self.router.validate()
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "router":
                continue
            if field.name in _CHOICES:
                if value not in _CHOICES[field.name]:
                    raise ConfigError(
                        f"yoro.{field.name}: {value!r} is not one of "
                        f"{', '.join(_CHOICES[field.name])}"
                    )
            elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"yoro.{field.name} must be an integer >= 0, got {value!r}")
        return self

    def validate(self, base: LlamaConfig) -> YoroConfig:
        """Check the split against a base model (and every field)."""
        self.validate_fields()
        n = base.num_hidden_layers
        if self.embedding_layers + self.coherence_layers >= n:
            raise ConfigError(
                f"yoro split leaves no reasoning layer: embedding_layers ({self.embedding_layers})"
                f" + coherence_layers ({self.coherence_layers}) must be < the base model's "
                f"{n} layers"
            )
        needs_depth = self.prompt_context == "exact" or self.compensation_init == "reasoning"
        if needs_depth and self.compensation_layers > self.num_reasoning_layers(base):
            raise ConfigError(
                f"yoro.compensation_layers ({self.compensation_layers}) stand for the last "
                f"reasoning layers (prompt_context exact / compensation_init reasoning), but "
                f"the split has only {self.num_reasoning_layers(base)}"
            )
        return self

    def reasoning_range(self, base: LlamaConfig) -> tuple[int, int]:
        return self.embedding_layers, base.num_hidden_layers - self.coherence_layers

    def num_reasoning_layers(self, base: LlamaConfig) -> int:
        start, stop = self.reasoning_range(base)
        return stop - start

    def compensation_depths(self, base: LlamaConfig) -> range:
        """The base layers the compensation layers stand for: the last Lc reasoning layers."""
        stop = base.num_hidden_layers - self.coherence_layers
        return range(stop - self.compensation_layers, stop)

    @property
    def exact(self) -> bool:
        return self.prompt_context == "exact"


class ReluMLP(nn.Module):
    """``num_layers`` x (Linear(d, d, bias) -> ReLU); Xavier-normal weights, zero biases."""

    num_layers: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            dense = nn.Dense(
                x.shape[-1],
                kernel_init=nn.initializers.xavier_normal(),
                bias_init=nn.initializers.zeros,
                param_dtype=jnp.float32,
                dtype=x.dtype,
                name=f"linear_{i}",
            )
            x = jax.nn.relu(dense(x))
        return x


class ResidualMLP(nn.Module):
    """``x + W_out silu(... W_in rms(x))``: ``num_layers`` linear layers, the last one
    zero-initialised, so the net is the identity at step 0 and its output is signed and
    on the residual stream's scale (the input is RMS-normalised: SmolLM2's stream has a
    few channels hundreds of times larger than the rest)."""

    num_layers: int
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.num_layers == 0:
            return x
        h = llama.RMSNorm(self.eps, name="norm")(x)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            h = nn.Dense(
                x.shape[-1],
                kernel_init=nn.initializers.zeros if last else nn.initializers.xavier_normal(),
                bias_init=nn.initializers.zeros,
                param_dtype=jnp.float32,
                dtype=x.dtype,
                name=f"linear_{i}",
            )(h)
            h = h if last else jax.nn.silu(h)
        return x + h


def _mlp_module(ycfg: YoroConfig, num_layers: int) -> nn.Module:
    return ResidualMLP(num_layers) if ycfg.nets == "residual" else ReluMLP(num_layers)


def init_compensation(
    ycfg: YoroConfig, base: LlamaConfig, key: jax.Array, frozen: Params | None
) -> llama.Layers:
    """Fresh compensation layers (stacked, float32), as ``ycfg.compensation_init`` says."""
    if ycfg.compensation_init == "reasoning":
        if frozen is None:
            raise ValueError("compensation_init 'reasoning' copies base layers: pass frozen")
        depths = ycfg.compensation_depths(base)
        # real copies (a slice is one): the train step donates the trainable buffers
        return jax.tree.map(
            lambda a: jnp.asarray(a[depths.start : depths.stop], jnp.float32), frozen["layers"]
        )
    layers = llama.init_layers(base, key, ycfg.compensation_layers)
    if ycfg.compensation_init == "identity":
        layers["attn"]["wo"] = jnp.zeros_like(layers["attn"]["wo"])
        layers["mlp"]["w_down"] = jnp.zeros_like(layers["mlp"]["w_down"])
    return layers


def init_trainable(
    ycfg: YoroConfig, base: LlamaConfig, key: jax.Array, frozen: Params | None = None
) -> Params:
    """Fresh trainable nets (float32 master weights), the router's if there is one.
    ``frozen`` (the base params) is needed for ``compensation_init: reasoning``."""
    k_comp, k_adapt, k_concat = jax.random.split(key, 3)
    dummy = jnp.zeros((1, base.hidden_size), jnp.float32)

    def mlp(k, num_layers):
        return _mlp_module(ycfg, num_layers).init(k, dummy).get("params", {})

    nets = {
        "compensation": init_compensation(ycfg, base, k_comp, frozen),
        "adaptation": mlp(k_adapt, ycfg.adaptation_layers),
        "concatenation": mlp(k_concat, ycfg.concatenation_layers),
    }
    router = router_lib.make_router(ycfg.router)
    if router is not None:
        nets["router"] = router.init(
            jax.random.fold_in(key, 3), base.hidden_size, ycfg.num_reasoning_layers(base)
        )
    return nets


class TeacherForcing(NamedTuple):
    """What one teacher-forcing pass gives (hidden states before the final norm)."""

    h_reason: jax.Array  # [B, P, d] reasoning path at prompt positions
    h_yoro: jax.Array  # [B, T-P, d] YORO path at positions P..T-1
    z_yoro: jax.Array  # [B, T-P, d] the coherence block's input there
    routing: RouterOutput | None


def _block_kv(
    cfg: LlamaConfig, layers: llama.Layers, states: jax.Array, rope: llama.Rope, length: int
) -> llama.Caches:
    """Caches of ``length`` slots for a block whose layer l sees input states
    ``states[l]`` [B, P, d] at the first P slots: the K/V each layer computes from them."""
    pad = [(0, 0), (0, 0), (0, length - states.shape[2]), (0, 0), (0, 0)]
    kv = {name: jnp.pad(a, pad) for name, a in llama.block_kv(cfg, layers, states, rope).items()}
    if llama.is_unscanned(layers):  # caches in the layers' layout
        return tuple({name: a[i] for name, a in kv.items()} for i in range(len(layers)))
    return kv


# -------------------------------------------------------------------------- the blocks
@dataclasses.dataclass(frozen=True)
class Yoro:
    """The composed model. Hashable, so it can be a static argument of jitted functions."""

    base: LlamaConfig
    ycfg: YoroConfig
    dtype: Any = jnp.float32
    remat: bool = False  # rematerialise the trainable path's layers in training

    def __post_init__(self) -> None:
        self.ycfg.validate(self.base)

    @property
    def router(self) -> Router | None:
        return router_lib.make_router(self.ycfg.router)

    # blocks: slices of the frozen base's layer stack
    def embedding_layers(self, frozen: Params) -> llama.Layers:
        return llama.slice_layers(frozen["layers"], *self.embedding_span)

    def reasoning_layers(self, frozen: Params) -> llama.Layers:
        return llama.slice_layers(frozen["layers"], *self.reasoning_span)

    def coherence_layers(self, frozen: Params) -> llama.Layers:
        return llama.slice_layers(frozen["layers"], *self.coherence_span)

    # the same blocks as spans of the stack, for running them (no copy of the weights)
    @property
    def embedding_span(self) -> tuple[int, int]:
        return 0, self.ycfg.embedding_layers

    @property
    def reasoning_span(self) -> tuple[int, int]:
        return self.ycfg.reasoning_range(self.base)

    @property
    def coherence_span(self) -> tuple[int, int]:
        n = self.base.num_hidden_layers
        return n - self.ycfg.coherence_layers, n

    def adapt(self, trainable: Params, x: jax.Array) -> jax.Array:
        module = _mlp_module(self.ycfg, self.ycfg.adaptation_layers)
        return module.apply({"params": trainable["adaptation"]}, x)

    def concat(self, trainable: Params, x: jax.Array) -> jax.Array:
        module = _mlp_module(self.ycfg, self.ycfg.concatenation_layers)
        return module.apply({"params": trainable["concatenation"]}, x)

    def reason(
        self,
        frozen: Params,
        e: jax.Array,  # [B, P, d]
        rope: llama.Rope,
        mask: jax.Array,
        gates: jax.Array | None = None,  # [B, R] or [B, P, R]; None: every layer
        skip: bool = False,
        collect: int = 0,
    ) -> tuple[jax.Array, jax.Array | None]:
        """The reasoning block: the expensive middle layers, run once on the prompt.

        Returns the output and (``collect`` > 0) the input states ``[collect, B, P, d]`` of
        the block's last ``collect`` layers. With gates, layer l gives
        ``g*Layer(h) + (1-g)*h`` (straight-through gradients reach g). ``skip`` (inference,
        0/1 gates): a layer no row of the batch needs is not run at all (``lax.cond``), and
        rows that do not need a run layer keep h exactly.
        """
        cfg, stack = self.base, frozen["layers"]
        start, stop = self.reasoning_span
        head, tail = (start, stop - collect), (stop - collect, stop)
        if gates is None:
            h, _ = llama.run_layers(cfg, stack, e, rope, mask, span=head)
            if not collect:
                return h, None
            h, _, states = llama.run_layers(cfg, stack, h, rope, mask, collect=True, span=tail)
            return h, states
        by_layer = jnp.moveaxis(gates, -1, 0)  # [R, B] or [R, B, P]
        split = stop - collect - start
        h, _ = self._gated(stack, head, e, rope, mask, by_layer[:split], skip, False)
        if not collect:
            return h, None
        return self._gated(stack, tail, h, rope, mask, by_layer[split:], skip, True)

    def _gated(self, stack, span, h, rope, mask, gates, skip, collect):
        """Router-gated layers ``span`` of the stack as one scan over (layer, gate); see
        :meth:`reason`."""

        def body(h, index_and_gate):
            index, g = index_and_gate
            layer = llama.layer_at(stack, index)
            g = (g[:, None, None] if g.ndim == 1 else g[..., None]).astype(h.dtype)

            def run(h):
                return llama.apply_layer(self.base, layer, h, rope, mask)[0]

            if skip:
                out = jax.lax.cond(
                    jnp.any(g > 0), lambda h: jnp.where(g > 0, run(h), h), lambda h: h, h
                )
            else:
                out = g * run(h) + (1 - g) * h
            return out, h if collect else None

        if llama.is_unscanned(stack):  # the same body as a Python loop over static indices
            inputs = []
            for index, g in zip(range(*span), gates, strict=True):
                h, h_in = body(h, (index, g))
                inputs.append(h_in)
            return h, jnp.stack(inputs) if collect and inputs else None
        unroll = llama.scan_unroll(span[1] - span[0])
        return jax.lax.scan(body, h, (jnp.arange(*span), gates), unroll=unroll)

    def route(
        self,
        trainable: Params,
        e: jax.Array,  # [B, P, d] embedding-block output over the prompt
        valid: jax.Array,  # [B, P]
        key: jax.Array | None = None,
        router_temperature: jax.Array | float = 1.0,
    ) -> RouterOutput | None:
        """The router's gates: sampled (training, with ``key``) or deterministic."""
        router = self.router
        if router is None:
            return None
        if key is None:
            gates = router.decide(trainable["router"], e, valid)
            return RouterOutput(gates, gates)
        return router.sample(trainable["router"], e, valid, key=key, temperature=router_temperature)

    def prompt_pass(
        self,
        frozen: Params,
        e: jax.Array,
        rope: llama.Rope,
        mask: jax.Array,
        gates: jax.Array | None = None,
        skip: bool = False,
    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """Reasoning + coherence over the prompt: ``(r, h_reason, prompt_states)``.

        ``prompt_states`` [Lc+C, B, P, d] (exact context only, else None): the full model's
        hidden states at the inputs of the base layers the compensation and coherence
        layers stand for.
        """
        exact, stack, coherence = self.ycfg.exact, frozen["layers"], self.coherence_span
        collect = self.ycfg.compensation_layers if exact else 0
        r, comp_states = self.reason(frozen, e, rope, mask, gates, skip, collect)
        if not exact:
            return r, llama.run_layers(self.base, stack, r, rope, mask, span=coherence)[0], None
        h, _, coh_states = llama.run_layers(
            self.base, stack, r, rope, mask, collect=True, span=coherence
        )
        if comp_states is None:  # no compensation layers
            return r, h, coh_states
        return r, h, jnp.concatenate([comp_states, coh_states], axis=0)

    def exact_caches(
        self,
        frozen: Params,
        trainable: Params,
        prompt_states: jax.Array,
        rope: llama.Rope,
        length: int,
    ) -> dict[str, llama.Caches]:
        """Caches of ``length`` slots whose first P hold the prompt K/V of the exact context:
        each compensation / coherence layer's K/V of the full model's state at its depth
        (``prompt_states`` [Lc+C, B, P, d], as :meth:`prompt_pass` gives them)."""
        states, lc = prompt_states.astype(self.dtype), self.ycfg.compensation_layers
        comp = self.cast(trainable)["compensation"]
        return {
            "compensation": _block_kv(self.base, comp, states[:lc], rope, length),
            "coherence": _block_kv(
                self.base, self.coherence_layers(frozen), states[lc:], rope, length
            ),
        }

    def yoro_path(
        self,
        frozen: Params,
        trainable: Params,
        e: jax.Array,  # [B, T, d] embedding-block output at the positions computed
        r: jax.Array | None,  # [B, n, d] reasoning output for the first n of them (prompt)
        rope: llama.Rope,
        mask: jax.Array,
        caches: dict[str, llama.Caches] | None = None,
        slot: jax.Array | int = 0,
    ) -> tuple[jax.Array, jax.Array, dict[str, llama.Caches] | None]:
        """The one YORO composition: nets + compensation + coherence -> ``(h, z, caches)``.

        Teacher forcing (no caches, or exact-context caches), prefill (the prompt, with
        r) and decode steps (new tokens, r None) all call this.
        """
        cfg, n = self.base, 0 if r is None else r.shape[1]
        comp_layers = self.cast(trainable)["compensation"]
        comp_caches = None if caches is None else caches["compensation"]
        coh_caches = None if caches is None else caches["coherence"]

        def comp(x):
            return llama.run_layers(
                cfg, comp_layers, x, rope, mask, comp_caches, slot, remat=self.remat
            )

        if self.ycfg.nets == "reference":
            r_tilde = (
                jnp.zeros_like(e)
                if r is None
                else jnp.pad(r, ((0, 0), (0, e.shape[1] - n), (0, 0)))
            )
            c, comp_caches = comp(e)
            z = self.concat(trainable, self.adapt(trainable, r_tilde) + c)
        else:
            x = e if r is None else jnp.concatenate([r, e[:, n:]], axis=1)
            c, comp_caches = comp(self.adapt(trainable, x))
            z = self.concat(trainable, c)
        h, coh_caches = llama.run_layers(
            cfg,
            frozen["layers"],
            z,
            rope,
            mask,
            coh_caches,
            slot,
            remat=self.remat,
            span=self.coherence_span,
        )
        new = None if caches is None else {"compensation": comp_caches, "coherence": coh_caches}
        return h, z, new

    # ------------------------------------------------------------------ teacher forcing
    def full_pass(
        self, frozen: Params, tokens: jax.Array, valid: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
        """The unmodified full model over every position, seen through the split:
        ``(e, r, h, states)`` — embedding-block output, the coherence block's input (the
        teacher's target for z), the last layer's output (before the final norm), and the
        exact-context states at every position. Causal, so its prompt positions equal what
        the one reasoning pass computes: this is how teacher data stores the frozen
        features, and the online teacher of training."""
        cfg = self.base
        rope = llama.rope_tables(cfg, llama.positions_from_valid(valid))
        mask = llama.attention_mask(valid, 0, tokens.shape[1])
        x = llama.embed_tokens(frozen, tokens, self.dtype)
        e, _ = llama.run_layers(cfg, frozen["layers"], x, rope, mask, span=self.embedding_span)
        r, h, states = self.prompt_pass(frozen, e, rope, mask)
        return e, r, h, states

    def frozen_features(
        self, frozen: Params, tokens: jax.Array, valid: jax.Array, prompt_len: int
    ) -> dict[str, jax.Array]:
        """What training reads instead of recomputing the frozen blocks (no router):
        ``e_prompt`` / ``e_response`` [B, P | T-P, d] (embedding block), ``r_prompt``
        [B, P, d] (the reasoning output), ``prompt_states`` [B, Lc+C, P, d] (exact
        context), ``h_first`` [B, d] (the reasoning path at P-1,
        which predicts the first response token) and ``teacher_hidden`` [B, T-P, d] (the
        full model's coherence input after the prompt: the hidden-state target)."""
        e, r, h, states = self.full_pass(frozen, tokens, valid)
        return {
            "e_prompt": e[:, :prompt_len],
            "r_prompt": r[:, :prompt_len],
            "e_response": e[:, prompt_len:],
            "prompt_states": jnp.moveaxis(states[:, :, :prompt_len], 0, 1)
            if states is not None
            else jnp.zeros((e.shape[0], 0, prompt_len, e.shape[2]), e.dtype),
            "h_first": h[:, prompt_len - 1],
            "teacher_hidden": r[:, prompt_len:],
        }

    def yoro_from_features(
        self,
        frozen: Params,
        trainable: Params,
        e_response: jax.Array,  # [B, R, d]
        prompt_states: jax.Array,  # [B, Lc+C, P, d]
        valid: jax.Array,  # [B, P+R]
    ) -> tuple[jax.Array, jax.Array]:
        """Exact context: the YORO path over the response positions as one multi-token
        decode step on caches prefilled from the prompt states -> ``(h, z)`` [B, R, d]."""
        cfg, prompt_len, total = self.base, prompt_states.shape[2], valid.shape[1]
        rope = llama.rope_tables(cfg, llama.positions_from_valid(valid))
        prompt_rope = tuple(t[:, :prompt_len] for t in rope)
        states = jnp.moveaxis(prompt_states, 1, 0)  # [Lc+C, B, P, d]
        caches = self.exact_caches(frozen, trainable, states, prompt_rope, total)
        mask = llama.attention_mask(valid, prompt_len, total - prompt_len)
        response_rope = tuple(t[:, prompt_len:] for t in rope)
        h, z, _ = self.yoro_path(
            frozen,
            trainable,
            e_response.astype(self.dtype),
            None,
            response_rope,
            mask,
            caches,
            prompt_len,
        )
        return h, z

    def yoro_from_stored(
        self, frozen: Params, trainable: Params, feats: dict[str, jax.Array], valid: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """The YORO path ``(h, z)`` [B, R, d] after the prompt from stored frozen features
        (:meth:`frozen_features`, in the batch layout): no frozen block is recomputed."""
        if self.ycfg.exact:
            return self.yoro_from_features(
                frozen, trainable, feats["e_response"], feats["prompt_states"], valid
            )
        prompt_len = feats["e_prompt"].shape[1]
        e = jnp.concatenate([feats["e_prompt"], feats["e_response"]], axis=1).astype(self.dtype)
        rope = llama.rope_tables(self.base, llama.positions_from_valid(valid))
        mask = llama.attention_mask(valid, 0, valid.shape[1])
        r = feats["r_prompt"].astype(self.dtype)
        h, z, _ = self.yoro_path(frozen, trainable, e, r, rope, mask)
        return h[:, prompt_len:], z[:, prompt_len:]

    def hidden_states(
        self,
        frozen: Params,
        trainable: Params,
        tokens: jax.Array,  # [B, T]
        valid: jax.Array,  # [B, T]
        prompt_len: int,  # P, static: the common prompt boundary
        *,
        gates: jax.Array | None = None,  # fixed gates [B, R] (static baselines) or None
        key: jax.Array | None = None,  # sample the router's gates (training)
        router_temperature: jax.Array | float = 1.0,  # Gumbel temperature
    ) -> TeacherForcing:
        """Coherence-block outputs before the final norm, the coherence input on the YORO
        path, and the routing used (None when there is neither a router nor fixed gates).

        Position t < P comes from the reasoning path, t >= P from the YORO path.
        """
        cfg, total = self.base, tokens.shape[1]
        if not 0 < prompt_len <= total:
            raise ValueError(f"prompt_len must be in [1, {total}], got {prompt_len}")
        rope = llama.rope_tables(cfg, llama.positions_from_valid(valid))
        prompt_rope = tuple(t[:, :prompt_len] for t in rope)
        mask = llama.attention_mask(valid, 0, total)
        prompt_mask = mask[:, :prompt_len, :prompt_len]

        x = llama.embed_tokens(frozen, tokens, self.dtype)
        e, _ = llama.run_layers(cfg, frozen["layers"], x, rope, mask, span=self.embedding_span)
        if gates is not None:
            routing = RouterOutput(gates, gates)
        else:
            routing = self.route(
                trainable, e[:, :prompt_len], valid[:, :prompt_len], key, router_temperature
            )
        r, h_reason, states = self.prompt_pass(
            frozen,
            e[:, :prompt_len],
            prompt_rope,
            prompt_mask,
            None if routing is None else routing.gates,
        )
        if self.ycfg.exact:
            h, z = self.yoro_from_features(
                frozen, trainable, e[:, prompt_len:], jnp.moveaxis(states, 0, 1), valid
            )
            return TeacherForcing(h_reason, h, z, routing)
        h, z, _ = self.yoro_path(frozen, trainable, e, r, rope, mask)
        return TeacherForcing(h_reason, h[:, prompt_len:], z[:, prompt_len:], routing)

    def response_hidden(
        self, frozen, trainable, tokens, valid, prompt_len, **routing_args
    ) -> tuple[jax.Array, RouterOutput | None]:
        """Hidden states [B, T-P+1, d] at the positions that predict response tokens.

        Index 0 is position P-1 (reasoning path, predicts the first response token);
        index j >= 1 is position P-1+j (YORO path). Apply :meth:`logits` to get logits.
        ``routing_args``: see :meth:`hidden_states`.
        """
        out = self.hidden_states(frozen, trainable, tokens, valid, prompt_len, **routing_args)
        return jnp.concatenate([out.h_reason[:, -1:], out.h_yoro], axis=1), out.routing

    def logits(self, frozen: Params, hidden: jax.Array) -> jax.Array:
        """Final norm + LM head (float32 logits)."""
        return llama.head(self.base, frozen, hidden)

    def forward(self, frozen, trainable, tokens, valid, prompt_len, **routing_args) -> jax.Array:
        """Logits [B, T, V] at every position (tests and analysis; training avoids this)."""
        out = self.hidden_states(frozen, trainable, tokens, valid, prompt_len, **routing_args)
        return self.logits(frozen, jnp.concatenate([out.h_reason, out.h_yoro], axis=1))

    def cast(self, trainable: Params) -> Params:
        """Trainable decoder layers at compute dtype (master weights stay float32)."""
        return {
            **trainable,
            "compensation": jax.tree.map(lambda a: a.astype(self.dtype), trainable["compensation"]),
        }


# ------------------------------------------------------------------------- accounting
def param_summary(model: Yoro, frozen: Params, trainable: Params) -> dict[str, int]:
    """Parameter counts: frozen, trainable, and executed per generated token (YORO vs full)."""

    def count(tree: Any) -> int:
        return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))

    cfg, ycfg = model.base, model.ycfg
    head = frozen["embed"] if cfg.tie_word_embeddings else frozen["lm_head"]
    per_layer = count(frozen["layers"]) // cfg.num_hidden_layers
    embed_row = cfg.hidden_size  # one embedding row is read per token
    final = count(frozen["final_norm"]) + count(head) + embed_row
    yoro_step = (
        (ycfg.embedding_layers + ycfg.coherence_layers) * per_layer
        + count(trainable["compensation"])
        + count(trainable["concatenation"])
        # residual nets run the adaptation net on every token (the reference: Adapt(0))
        + (count(trainable["adaptation"]) if ycfg.nets == "residual" else 0)
        + final
    )
    return {
        "frozen": count(frozen),
        "trainable": count(trainable),
        "reasoning_layers": model.ycfg.num_reasoning_layers(cfg),
        "executed_per_token_full": cfg.num_hidden_layers * per_layer + final,
        "executed_per_token_yoro": yoro_step,
    }
