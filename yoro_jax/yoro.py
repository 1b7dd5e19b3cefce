"""YORO: reason once on the prompt, then decode with embedding + compensation + coherence.

Given a base Llama with N layers and a :class:`YoroConfig` (E, C, Lc, La, Lk)::

    embedding block   token embedding + base layers [0, E)          frozen
    reasoning block   base layers [E, N-C)  -- run once, prompt only frozen
    coherence block   base layers [N-C, N) + final norm + LM head    frozen
    compensation      Lc new decoder layers                          trainable
    adaptation        La x (Linear(d, d) -> ReLU)                    trainable
    concatenation     Lk x (Linear(d, d) -> ReLU)                    trainable
    router            optional: gates the reasoning layers           trainable

``frozen`` is the base model's params pytree itself (blocks are slices of its layer list,
so the teacher shares it); ``trainable`` is a separate pytree
``{"compensation": [...], "adaptation": {...}, "concatenation": {...}[, "router": {...}]}``.

Teacher forcing (DESIGN §3) on the batch layout: prompts right-aligned to a common
boundary P (left padding), responses left-aligned after it (right padding)::

    e = Emb(x)                       all T positions, causal
    r = Reason(e[:, :P])             prompt only: the one reasoning pass (router-gated)
    logits[t] = Head(Coh(r))[t]      t < P   (t = P-1 predicts the first response token)
    z = Concat(Adapt(r~) + Comp(e))  r~ = r on the prompt, 0 after it
    logits[t] = Head(Coh(z))[t]      t >= P
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from yoro_jax import llama
from yoro_jax import router as router_lib
from yoro_jax.config import ConfigError, LlamaConfig
from yoro_jax.llama import Params
from yoro_jax.router import Router, RouterConfig, RouterOutput

YORO_CONFIG_FILE = "yoro_config.json"
TRAINABLE_DIR = "trainable"


@dataclasses.dataclass(frozen=True)
class YoroConfig:
    """How the base model is split, and the sizes of the trainable nets."""

    embedding_layers: int = 2
    coherence_layers: int = 2
    compensation_layers: int = 2
    adaptation_layers: int = 2
    concatenation_layers: int = 1
    router: RouterConfig = RouterConfig()  # kind "none": every reasoning layer runs

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> YoroConfig:
        """From the saved JSON (nets saved before routers existed have no "router")."""
        return cls(**{**raw, "router": RouterConfig(**raw.get("router", {}))})

    def validate_fields(self) -> YoroConfig:
        self.router.validate()
        for field in dataclasses.fields(self):
            if field.name == "router":
                continue
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
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
        return self

    def reasoning_range(self, base: LlamaConfig) -> tuple[int, int]:
        return self.embedding_layers, base.num_hidden_layers - self.coherence_layers

    def num_reasoning_layers(self, base: LlamaConfig) -> int:
        start, stop = self.reasoning_range(base)
        return stop - start


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


def _mlp(trainable: Params, name: str, num_layers: int, x: jax.Array) -> jax.Array:
    return ReluMLP(num_layers).apply({"params": trainable[name]}, x)


def init_trainable(ycfg: YoroConfig, base: LlamaConfig, key: jax.Array) -> Params:
    """Fresh trainable nets (float32 master weights), the router's if there is one."""
    k_comp, k_adapt, k_concat = jax.random.split(key, 3)
    dummy = jnp.zeros((1, base.hidden_size), jnp.float32)
    nets = {
        "compensation": llama.init_layers(base, k_comp, ycfg.compensation_layers),
        "adaptation": ReluMLP(ycfg.adaptation_layers).init(k_adapt, dummy).get("params", {}),
        "concatenation": ReluMLP(ycfg.concatenation_layers).init(k_concat, dummy).get("params", {}),
    }
    router = router_lib.make_router(ycfg.router)
    if router is not None:
        nets["router"] = router.init(
            jax.random.fold_in(key, 3), base.hidden_size, ycfg.num_reasoning_layers(base)
        )
    return nets


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

    # layer slices of the frozen base
    def embedding_layers(self, frozen: Params) -> list[Params]:
        return frozen["layers"][: self.ycfg.embedding_layers]

    def reasoning_layers(self, frozen: Params) -> list[Params]:
        start, stop = self.ycfg.reasoning_range(self.base)
        return frozen["layers"][start:stop]

    def coherence_layers(self, frozen: Params) -> list[Params]:
        return frozen["layers"][self.base.num_hidden_layers - self.ycfg.coherence_layers :]

    def adapt(self, trainable: Params, r: jax.Array) -> jax.Array:
        return _mlp(trainable, "adaptation", self.ycfg.adaptation_layers, r)

    def concat(self, trainable: Params, x: jax.Array) -> jax.Array:
        return _mlp(trainable, "concatenation", self.ycfg.concatenation_layers, x)

    def reason(
        self,
        frozen: Params,
        e: jax.Array,  # [B, P, d]
        rope: llama.Rope,
        mask: jax.Array,
        gates: jax.Array | None = None,  # [B, R] or [B, P, R]; None: every layer
        skip: bool = False,
    ) -> jax.Array:
        """The reasoning block: the expensive middle layers, run once on the prompt.

        With gates, layer l gives ``g*Layer(h) + (1-g)*h`` (straight-through gradients reach
        g). ``skip`` (inference, 0/1 gates): a layer no row of the batch needs is not run at
        all (``lax.cond``), and rows that do not need a run layer keep h exactly.
        """
        layers = self.reasoning_layers(frozen)
        if gates is None:
            return llama.run_layers(self.base, layers, e, rope, mask)[0]
        h = e
        for index, layer in enumerate(layers):
            g = gates[..., index]  # [B] or [B, P]
            g = (g[:, None, None] if g.ndim == 1 else g[..., None]).astype(h.dtype)

            def run(h, layer=layer):
                return llama.run_layers(self.base, [layer], h, rope, mask)[0]

            if skip:
                h = jax.lax.cond(
                    jnp.any(g > 0), lambda h, g=g, run=run: jnp.where(g > 0, run(h), h),
                    lambda h: h, h,
                )  # fmt: skip
            else:
                h = g * run(h) + (1 - g) * h
        return h

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

    # ------------------------------------------------------------------ teacher forcing
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
    ) -> tuple[jax.Array, jax.Array, RouterOutput | None]:
        """Coherence-block outputs before the final norm, and the routing used.

        Returns ``(h_reason [B, P, d], h_yoro [B, T-P, d], routing)``: position t < P comes
        from the reasoning path, t >= P from the YORO path (DESIGN §3). ``routing`` is None
        when there is neither a router nor fixed ``gates``.
        """
        cfg, total = self.base, tokens.shape[1]
        if not 0 < prompt_len <= total:
            raise ValueError(f"prompt_len must be in [1, {total}], got {prompt_len}")
        rope = llama.rope_tables(cfg, llama.positions_from_valid(valid))
        prompt_rope = tuple(t[:, :prompt_len] for t in rope)
        mask = llama.attention_mask(valid, 0, total)
        prompt_mask = mask[:, :prompt_len, :prompt_len]

        x = llama.embed_tokens(frozen, tokens, self.dtype)
        e, _ = llama.run_layers(cfg, self.embedding_layers(frozen), x, rope, mask)
        if gates is not None:
            routing = RouterOutput(gates, gates)
        else:
            routing = self.route(trainable, e[:, :prompt_len], valid[:, :prompt_len], key,
                                 router_temperature)  # fmt: skip
        r = self.reason(frozen, e[:, :prompt_len], prompt_rope, prompt_mask,
                        None if routing is None else routing.gates)  # fmt: skip
        h_reason, _ = llama.run_layers(
            cfg, self.coherence_layers(frozen), r, prompt_rope, prompt_mask
        )

        comp, _ = llama.run_layers(
            cfg, self.cast(trainable)["compensation"], e, rope, mask, remat=self.remat
        )
        adapted = jnp.concatenate(
            [
                self.adapt(trainable, r),
                jnp.broadcast_to(
                    self.adapt(trainable, jnp.zeros_like(r[:, :1])),
                    (r.shape[0], total - prompt_len, r.shape[2]),
                ),
            ],
            axis=1,
        )
        z = self.concat(trainable, adapted + comp)
        h_yoro, _ = llama.run_layers(
            cfg, self.coherence_layers(frozen), z, rope, mask, remat=self.remat
        )
        return h_reason, h_yoro[:, prompt_len:], routing

    def response_hidden(
        self, frozen, trainable, tokens, valid, prompt_len, **routing_args
    ) -> tuple[jax.Array, RouterOutput | None]:
        """Hidden states [B, T-P+1, d] at the positions that predict response tokens.

        Index 0 is position P-1 (reasoning path, predicts the first response token);
        index j >= 1 is position P-1+j (YORO path). Apply :meth:`logits` to get logits.
        ``routing_args``: see :meth:`hidden_states`.
        """
        h_reason, h_yoro, routing = self.hidden_states(
            frozen, trainable, tokens, valid, prompt_len, **routing_args
        )
        return jnp.concatenate([h_reason[:, -1:], h_yoro], axis=1), routing

    def logits(self, frozen: Params, hidden: jax.Array) -> jax.Array:
        """Final norm + LM head (float32 logits)."""
        return llama.head(self.base, frozen, hidden)

    def forward(self, frozen, trainable, tokens, valid, prompt_len, **routing_args) -> jax.Array:
        """Logits [B, T, V] at every position (tests and analysis; training avoids this)."""
        h_reason, h_yoro, _ = self.hidden_states(
            frozen, trainable, tokens, valid, prompt_len, **routing_args
        )
        return self.logits(frozen, jnp.concatenate([h_reason, h_yoro], axis=1))

    def cast(self, trainable: Params) -> Params:
        """Trainable decoder layers at compute dtype (master weights stay float32)."""
        return {**trainable, "compensation": jax.tree.map(
            lambda a: a.astype(self.dtype), trainable["compensation"])}  # fmt: skip


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

    def prefill(self, params, tokens, valid, kv_valid):
        frozen, trainable = params
        m, cfg = self.model, self.model.base
        (batch, prompt_len), length = tokens.shape, kv_valid.shape[1]
        caches = {
            "embedding": llama.init_cache(cfg, m.ycfg.embedding_layers, batch, length, m.dtype),
            "compensation": llama.init_cache(
                cfg, m.ycfg.compensation_layers, batch, length, m.dtype
            ),
            "coherence": llama.init_cache(cfg, m.ycfg.coherence_layers, batch, length, m.dtype),
        }
        rope = llama.rope_tables(cfg, llama.positions_from_valid(valid))
        cached_mask = llama.attention_mask(kv_valid, 0, prompt_len)
        prompt_mask = llama.attention_mask(valid, 0, prompt_len)

        x = llama.embed_tokens(frozen, tokens, m.dtype)
        e, caches["embedding"] = llama.run_layers(
            cfg, m.embedding_layers(frozen), x, rope, cached_mask, caches["embedding"], 0
        )
        gates = self.gates(trainable, e, valid)
        r = m.reason(frozen, e, rope, prompt_mask, gates, skip=True)
        caches["reasoning_layers"] = (
            jnp.full((batch,), m.ycfg.num_reasoning_layers(cfg), jnp.int32)
            if gates is None
            else router_lib.layers_needed(gates)
        )
        h_reason, _ = llama.run_layers(cfg, m.coherence_layers(frozen), r, rope, prompt_mask)
        comp, caches["compensation"] = llama.run_layers(
            cfg, m.cast(trainable)["compensation"], e, rope, cached_mask, caches["compensation"], 0
        )
        z = m.concat(trainable, m.adapt(trainable, r) + comp)
        _, caches["coherence"] = llama.run_layers(
            cfg, m.coherence_layers(frozen), z, rope, cached_mask, caches["coherence"], 0
        )
        return m.logits(frozen, h_reason[:, -1]), caches

    def extend(self, params, caches, tokens, positions, kv_valid, slot):
        """Tokens after the prompt: embedding + compensation + coherence, no reasoning."""
        frozen, trainable = params
        m, cfg = self.model, self.model.base
        rope = llama.rope_tables(cfg, positions)
        mask = llama.attention_mask(kv_valid, slot, tokens.shape[1])
        caches = dict(caches)
        x = llama.embed_tokens(frozen, tokens, m.dtype)
        e, caches["embedding"] = llama.run_layers(
            cfg, m.embedding_layers(frozen), x, rope, mask, caches["embedding"], slot
        )
        comp, caches["compensation"] = llama.run_layers(
            cfg, m.cast(trainable)["compensation"], e, rope, mask, caches["compensation"], slot
        )
        # after the prompt the reasoning input is zero: Adapt(0) is one vector for all tokens
        z = m.concat(trainable, m.adapt(trainable, jnp.zeros((cfg.hidden_size,), m.dtype)) + comp)
        h, caches["coherence"] = llama.run_layers(
            cfg, m.coherence_layers(frozen), z, rope, mask, caches["coherence"], slot
        )
        return h, caches

    def head(self, params, hidden):
        return self.model.logits(params[0], hidden)

    def reasoning_layers(self, caches) -> jax.Array:
        """[B] reasoning layers each prompt's prefill needed."""
        return caches["reasoning_layers"]


# ------------------------------------------------------------------------- accounting
def param_summary(model: Yoro, frozen: Params, trainable: Params) -> dict[str, int]:
    """Parameter counts: frozen, trainable, and executed per generated token (YORO vs full)."""

    def count(tree: Any) -> int:
        return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))

    cfg, ycfg = model.base, model.ycfg
    head = frozen["embed"] if cfg.tie_word_embeddings else frozen["lm_head"]
    per_layer = count(frozen["layers"][0])
    embed_row = cfg.hidden_size  # one embedding row is read per token
    final = count(frozen["final_norm"]) + count(head) + embed_row
    yoro_step = (
        (ycfg.embedding_layers + ycfg.coherence_layers) * per_layer
        + count(trainable["compensation"])
        + count(trainable["concatenation"])
        + final
    )
    return {
        "frozen": count(frozen),
        "trainable": count(trainable),
        "reasoning_layers": model.ycfg.num_reasoning_layers(cfg),
        "executed_per_token_full": cfg.num_hidden_layers * per_layer + final,
        "executed_per_token_yoro": yoro_step,
    }


# ----------------------------------------------------------------------- save / load
def save_yoro(
    out: Path, ycfg: YoroConfig, trainable: Params, base_dir: Path | None, base_fingerprint: str,
    overwrite: bool = False,
) -> None:  # fmt: skip
    """Write the trainable nets + YORO config + the identity of their base model."""
    from yoro_jax.checkpoint import atomic_directory, save_pytree

    with atomic_directory(Path(out), overwrite) as tmp:
        save_pytree(tmp / TRAINABLE_DIR, trainable)
        meta = {
            "yoro": dataclasses.asdict(ycfg),  # includes the router's config
            "base_model": str(Path(base_dir).absolute()) if base_dir else None,
            "base_fingerprint": base_fingerprint,
        }
        (tmp / YORO_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_yoro_meta(path: Path) -> dict[str, Any]:
    from yoro_jax.checkpoint import CheckpointError

    meta_path = Path(path) / YORO_CONFIG_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path} holds no trained YORO nets (no {YORO_CONFIG_FILE})")
    return json.loads(meta_path.read_text())


def recorded_base(path: Path) -> str:
    """The base model directory the nets in ``path`` were trained on (as saved with them)."""
    from yoro_jax.checkpoint import CheckpointError

    base = read_yoro_meta(path).get("base_model")
    if not base:
        raise CheckpointError(f"{path} does not record its base model; give the model explicitly")
    return base


def load_yoro(path: Path, base: Any = None) -> tuple[YoroConfig, Params, Any]:
    """Load YORO nets and check them against ``base`` (a loaded Model, or None: the saved path).

    Returns ``(yoro config, trainable params, base model)``.
    """
    from yoro_jax.checkpoint import CheckpointError, load_model, restore_pytree

    meta = read_yoro_meta(path)
    if base is None:
        base = load_model(recorded_base(path))
    if base.fingerprint != meta["base_fingerprint"]:
        raise CheckpointError(
            f"the YORO nets in {path} were trained on a different base model: they expect "
            f"fingerprint {meta['base_fingerprint'][:16]} ({meta.get('base_model')}), the given "
            f"base {base.path} has {base.fingerprint[:16]}"
        )
    ycfg = YoroConfig.from_dict(meta["yoro"]).validate(base.config)
    abstract = jax.eval_shape(lambda: init_trainable(ycfg, base.config, jax.random.key(0)))
    return ycfg, restore_pytree(Path(path) / TRAINABLE_DIR, abstract), base
