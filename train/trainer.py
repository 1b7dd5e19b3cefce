"""Distillation training (docs/DESIGN.md §4): grain loader -> jitted optax step -> orbax.

Run directory layout::

    RUN/config.yaml        the resolved config (a resumed run must match it)
    RUN/base/              the base model (tiny-random only; others are referenced)
    RUN/teacher/           offline teacher shards (ArrayRecord) + manifest
    RUN/checkpoints/N/     orbax: train state (trainable, optimizer, step, rng) + loader state
    RUN/best/              YORO nets with the best validation KL so far
    RUN/export/            final YORO nets (load with ``--yoro RUN/export``)
    RUN/metrics.jsonl      every logged scalar; RUN/tb/ the same for TensorBoard
    RUN/samples.jsonl      sample generations, full model vs YORO, at each validation
    RUN/loss.png           loss curve, written at the end
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from tqdm.auto import tqdm

from train import data as data_lib
from train.config import LossSection, RunConfig, load_config, to_dict
from train.loss import chunked_sums, hidden_match
from train.routing import router_objective, temperature_at
from yoro_jax import llama
from yoro_jax.checkpoint import (
    CheckpointError,
    Model,
    load_model,
    map_named,
    resolve_dtype,
    write_model_dir,
)
from yoro_jax.config import ConfigError
from yoro_jax.generate import LlamaDecoder, generate_tokens, special_ids
from yoro_jax.llama import Params
from yoro_jax.models import EMBEDDED_DEFAULT, resolve_model
from yoro_jax.router import layers_needed, layers_on
from yoro_jax.sharding import make_mesh, shard_batch, shard_params
from yoro_jax.yoro import Yoro, YoroDecoder, init_trainable, load_yoro, save_yoro

# Held-out top-1 agreement is also reported at each of the first generated positions.
AT_POSITIONS = 8
# Sections whose change makes a resumed run a different experiment.
_FIXED_ON_RESUME = ("model", "yoro", "data", "teacher", "loss", "optim", "router_train")
# Test hook: SIGKILL this process right after the given optimizer step (simulates a crash).
KILL_ENV = "YORO_JAX_KILL_AFTER_STEP"


def listed_compensation(abstract: Any) -> Any:
    """A state's abstract tree with every ``compensation`` stack as a list of layers (the
    layout of runs saved before format 2)."""
    return map_named(abstract, "compensation", lambda t: jax.eval_shape(llama.unstack_layers, t))


def stacked_compensation(state: Any) -> Any:
    return map_named(state, "compensation", llama.stack_layers)


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf; the offending update was not applied."""


# ------------------------------------------------------------------------- base model
def resolve_base(cfg: RunConfig) -> Model:
    """The frozen base: ``tiny-random`` (written to RUN/base), ``smollm2`` or a model dir."""
    path = cfg.model.path
    if path == "tiny-random":
        from train.tiny import byte_tokenizer, tiny_random_model

        out = Path(cfg.run_dir) / "base"
        if not out.is_dir():
            model = tiny_random_model(seed=0)
            params = jax.tree.map(lambda a: a.astype(resolve_dtype(cfg.model.dtype)), model.params)
            write_model_dir(out, model.config, params, byte_tokenizer().save_pretrained,
                            "tiny-random")  # fmt: skip
        return load_model(out)
    if path != EMBEDDED_DEFAULT and not Path(path).is_dir():
        raise ConfigError(
            f"model.path: {path!r} is not a model directory; expected one written by "
            f"`python -m convert`, or '{EMBEDDED_DEFAULT}' / 'tiny-random'"
        )
    return resolve_model(path, cfg.model.dtype)


def compute_dtype(cfg: RunConfig) -> Any:
    """bf16 where the backend is fast at it (GPU/TPU), float32 on CPU, unless set."""
    if cfg.train.compute_dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return resolve_dtype(cfg.train.compute_dtype)


# ------------------------------------------------------------------------ preparation
@dataclasses.dataclass
class Prepared:
    cfg: RunConfig
    base: Model
    shards: dict[str, list[Path]]  # split -> teacher ArrayRecord shards


def split_prompts(prompts: list[list[int]], num_val: int) -> dict[str, list[list[int]]]:
    """Deterministic held-out split (seeded permutation, independent of the train seed)."""
    if num_val >= len(prompts):
        raise ConfigError(
            f"data.validation_prompts ({num_val}) must be smaller than the number of "
            f"prompts ({len(prompts)})"
        )
    order = np.random.RandomState(0).permutation(len(prompts))
    return {
        "train": [prompts[i] for i in order[num_val:]],
        "val": [prompts[i] for i in order[:num_val]],
    }


def _check_resumable(cfg: RunConfig, run_dir: Path) -> None:
    saved_path = run_dir / "config.yaml"
    new = to_dict(cfg)
    if saved_path.is_file():
        try:  # through the current schema: settings added since then take their defaults
            saved = to_dict(load_config(saved_path))
        except ConfigError:
            saved = yaml.safe_load(saved_path.read_text())
        changed = [k for k in _FIXED_ON_RESUME if saved.get(k) != new.get(k)]
        if changed:
            raise ConfigError(
                f"{run_dir} holds a run with different {', '.join(changed)} settings; "
                "use a new run_dir (only train/checkpoint/eval settings may change on resume)"
            )
    saved_path.write_text(yaml.safe_dump(new, sort_keys=False))


def prepare_run(config: str | RunConfig | None, overrides: list[str] = ()) -> Prepared:
    """Config -> run dir -> base model -> prompts -> teacher data (made once, resumable)."""
    from train.teacher import generate_teacher_data

    cfg = config if isinstance(config, RunConfig) else load_config(config, list(overrides))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_resumable(cfg, run_dir)
    base = resolve_base(cfg)
    cfg.yoro.validate(base.config)
    if base.tokenizer is None:
        raise ConfigError(f"model.path: {base.path} has no tokenizer; training needs one")
    prompts = data_lib.load_prompts(cfg.data, base.tokenizer)
    splits = split_prompts(prompts, cfg.data.validation_prompts)
    # Online mode also trains on the teacher's answers (the sequences); only the target
    # changes: dense teacher logits computed in the step instead of the stored top-k.
    return Prepared(cfg, base, generate_teacher_data(cfg, base, splits))


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
    return {name: jax.tree.map(lambda _, n=name: "train" if n == "router" else "keep", tree)
            for name, tree in trainable.items()}  # fmt: skip


def initial_trainable(cfg: RunConfig, base: Model) -> Params:
    """The run's starting nets: fresh (from ``train.seed``), or the YORO nets in
    ``router_train.init_nets`` with a fresh router (stage 2)."""
    init_key, _ = jax.random.split(jax.random.key(cfg.train.seed))
    fresh = init_trainable(cfg.yoro, base.config, init_key, base.params)
    if cfg.router_train.init_nets is None:
        return fresh
    path = Path(cfg.router_train.init_nets)
    if (path / "export").is_dir() and not (path / "yoro_config.json").is_file():
        path = path / "export"  # a run directory: its final nets
    ycfg, loaded, _ = load_yoro(path, base)
    ours = dataclasses.replace(cfg.yoro, router=ycfg.router)
    if ycfg != ours:
        raise ConfigError(
            f"router_train.init_nets: the nets in {path} have split/sizes {ycfg}, this run's "
            f"yoro section asks for {cfg.yoro}; they must match (the router may differ)"
        )
    return {**{k: v for k, v in loaded.items() if k != "router"}, **(
        {"router": fresh["router"]} if "router" in fresh else {})}  # fmt: skip


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
        lambda h: model.logits(frozen, h), hidden, batch, temperature=temperature,
        ce_weight=ce_weight, chunk=chunk, teacher_hidden=teacher_hidden if online else None,
        remat=remat_logits,
    )  # fmt: skip
    if hidden_weight:
        target = batch.get("teacher_hidden", teacher_z)
        # z at position P+i predicts response token i+1: mask of targets 1..R-1
        sums["hidden"] = hidden_match(
            z[:, : resp_len - 1], target[:, : resp_len - 1], batch["target_mask"][:, 1:],
            hidden_loss,
        )  # fmt: skip
    return sums, routing


def loss_options(loss: LossSection) -> tuple[tuple[str, Any], ...]:
    """The train step's static loss options (hashable) from the config's loss section."""
    return (
        ("online", loss.mode == "online"), ("temperature", loss.soft_temperature),
        ("ce_weight", loss.ce_weight), ("chunk", loss.logits_chunk),
        ("hidden_weight", loss.hidden_weight), ("hidden_loss", loss.hidden_loss),
        ("remat_logits", loss.remat_logits),
    )  # fmt: skip


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
            trainable = {k: v if k == "router" else jax.lax.stop_gradient(v)
                         for k, v in trainable.items()}  # fmt: skip
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
            routing, row_loss, batch["valid"][:, :prompt_len], router_opts, state["step"],
            state["baseline"],
        )  # fmt: skip
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


@partial(jax.jit, static_argnames=("model", "prompt_len", "chunk"))
def eval_sums(
    model: Yoro, frozen: Params, trainable: Params, batch, prompt_len: int, chunk: int,
    keep: jax.Array | None = None,  # [R] fixed 0/1 gates for every row (static baselines)
):  # fmt: skip
    """Held-out metrics against the exact teacher (the full model's dense logits, T=1),
    with deterministic routing; also [B] reasoning layers each row needed and [B, R] which."""
    gates = (
        None if keep is None else jnp.broadcast_to(keep, (batch["tokens"].shape[0], *keep.shape))
    )
    rows, routing = row_sums(model, frozen, trainable, batch, prompt_len, online=True,
                             temperature=1.0, ce_weight=1.0, chunk=chunk, gates=gates)  # fmt: skip
    sums = {key: jnp.sum(value) for key, value in rows.items() if key != "agree_positions"}
    # agreement at generated positions 1..8: what a speculative decoder's drafts would see
    sums["top1_at"] = jnp.sum(rows["agree_positions"][:, :AT_POSITIONS], axis=0)
    sums["count_at"] = jnp.sum(batch["target_mask"][:, :AT_POSITIONS].astype(jnp.float32), axis=0)
    if routing is not None:
        sums |= {"layers": layers_needed(routing.gates), "layer_on": layers_on(routing.gates)}
    return sums


def heldout_metrics(
    model: Yoro,
    frozen: Params,
    trainable: Params,
    examples: list[dict[str, np.ndarray]],
    batch_size: int,
    pad_id: int,
    top_k: int,
    chunk: int,
    keep: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-token means over ``examples``: dense KL to the full model (T=1), top-1 agreement
    with it, and cross-entropy of the teacher's tokens. With a router (or fixed ``keep``
    gates): mean reasoning layers run per prompt and each layer's skip rate."""
    if not examples:
        return {}
    totals: dict[str, float] = {}
    layers, layer_on = [], []
    for batch in data_lib.batches(examples, batch_size, pad_id, top_k):
        arrays, prompt_len = _to_device(batch)
        sums = eval_sums(model, frozen, trainable, arrays, prompt_len, chunk,
                         None if keep is None else jnp.asarray(keep, jnp.float32))  # fmt: skip
        for key in ("kl", "ce", "top1", "count"):
            totals[key] = totals.get(key, 0.0) + float(sums[key])
        for key in ("top1_at", "count_at"):
            totals[key] = totals.get(key, 0.0) + np.asarray(sums[key], np.float64)
        if "layers" in sums:
            layers.append(np.asarray(sums["layers"]))
            layer_on.append(np.asarray(sums["layer_on"]))
    count = max(totals["count"], 1.0)
    out = {key: totals[key] / count for key in ("kl", "top1", "ce")} | {"tokens": count}
    at = totals["top1_at"] / np.maximum(totals["count_at"], 1.0)
    out |= {f"top1_at_{j + 1}": float(a) for j, a in enumerate(at)}
    if layers:
        on = np.concatenate(layer_on).astype(np.float64)
        out |= {"reasoning_layers": float(np.concatenate(layers).mean()),
                "layer_skip_rate": (1.0 - on.mean(axis=0)).tolist()}  # fmt: skip
    return out


# ------------------------------------------------------------------------- the loop
class MetricsLog:
    """metrics.jsonl + TensorBoard scalars."""

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        row = {"step": step, "split": split, **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in values.items():
            self.tb.add_scalar(f"{split}/{key}", float(value), step)

    def close(self) -> None:
        self.tb.close()


def _to_device(batch: dict[str, Any], mesh: Any = None) -> tuple[dict[str, jax.Array], int]:
    """Batch arrays on device (split over the mesh's devices if given) + the static P."""
    prompt_len = int(batch["prompt_len"])
    arrays = shard_batch({k: v for k, v in batch.items() if k != "prompt_len"}, mesh)
    return arrays, prompt_len


class Trainer:
    """Owns the run: state, loader, checkpoints, metrics. ``run()`` trains to the end."""

    def __init__(self, prepared: Prepared):
        import grain

        cfg, base = prepared.cfg, prepared.base
        self.cfg, self.base = cfg, base
        self.run_dir = Path(cfg.run_dir)
        self.model = Yoro(base.config, cfg.yoro, compute_dtype(cfg), remat=cfg.train.remat)
        self.mesh = make_mesh(cfg.mesh)  # None on one device
        frozen = jax.tree.map(lambda a: a.astype(self.model.dtype), base.params)
        self.frozen = shard_params(frozen, self.mesh)
        _, self.pad_id = special_ids(base.config, base.tokenizer)

        records = data_lib.TeacherRecords(prepared.shards["train"])
        if len(records) < cfg.train.batch_size:
            raise ConfigError(
                f"train.batch_size ({cfg.train.batch_size}) exceeds the {len(records)} training "
                "examples"
            )
        collate = partial(data_lib.collate, pad_id=self.pad_id, top_k=cfg.teacher.top_k,
                          features=cfg.teacher.features)  # fmt: skip
        hosts, host = jax.process_count(), jax.process_index()
        dataset = (
            grain.MapDataset.source(records).shuffle(seed=cfg.train.seed).repeat(cfg.train.epochs)
        )
        if hosts > 1:  # multi-host: every process reads its own slice of each global batch
            dataset = dataset[host::hosts]
        self.dataset = dataset.batch(
            cfg.train.batch_size // hosts, drop_remainder=True, batch_fn=collate
        )
        micro_steps = len(self.dataset)
        self.total_steps = micro_steps // cfg.optim.grad_accum
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        if self.total_steps < 1:
            raise ConfigError("the data gives no full optimizer step; lower train.batch_size")
        self.steps_per_epoch = micro_steps / cfg.train.epochs / cfg.optim.grad_accum
        self.routed = self.model.router is not None
        self.tx = make_optimizer(cfg, self.total_steps)
        self.schedule = lr_schedule(cfg, self.total_steps)  # for logging the learning rate
        self.loss_opts = loss_options(cfg.loss)
        val = data_lib.TeacherRecords(prepared.shards["val"]) if prepared.shards["val"] else []
        self.val_examples = [val[i] for i in range(len(val))]
        self._full_answers = None  # the teacher's sample answers never change: made once

    # ------------------------------------------------------------------ state
    def init_state(self) -> dict[str, Any]:
        _, rng = jax.random.split(jax.random.key(self.cfg.train.seed))
        trainable = initial_trainable(self.cfg, self.base)
        state = {
            "trainable": trainable,
            "opt_state": self.tx.init(trainable),
            "step": jnp.int32(0),
            "tokens_seen": jnp.int32(0),
            "rng": jax.random.key_data(rng),
        }
        if self.routed:  # REINFORCE's moving-average reward baseline
            state["baseline"] = jnp.float32(0)
        return shard_params(state, self.mesh)

    def checkpoint_manager(self):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.checkpoint.keep, create=True)
        return ocp.CheckpointManager((self.run_dir / "checkpoints").absolute(), options=options)

    def restore(self, manager, state, iterator) -> tuple[dict[str, Any], int]:
        import orbax.checkpoint as ocp

        step = manager.latest_step()
        if step is None:
            return state, 0
        # the abstract state carries this run's shardings: a checkpoint written on another
        # mesh (or one device) is re-sharded onto this one as it is read
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

        def read(target):
            return manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), loader=ocp.args.JsonRestore()))  # fmt: skip

        try:
            restored = read(abstract)
        except (ValueError, KeyError, TypeError) as err:
            # a run saved before layers were stacked holds its compensation layers (and
            # their optimizer moments) as lists: read them so, then stack
            try:
                restored = read(listed_compensation(abstract))
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(
                    f"{self.run_dir}: checkpoint {step} does not match this run's state "
                    f"({err}); it was written with another config or yoro-jax version — "
                    "use a new run directory"
                ) from err
            restored["state"] = stacked_compensation(restored["state"])
        iterator.set_state(restored["loader"])
        print(f"resumed {self.run_dir} from step {step}", file=sys.stderr)
        restored_state = restored["state"]
        return (jax.device_put(restored_state) if self.mesh is None else restored_state), step

    def save(self, manager, step: int, state, iterator) -> None:
        import orbax.checkpoint as ocp

        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(iterator.get_state())),
            force=True)  # fmt: skip

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, trainable: Params) -> dict[str, float]:
        """KL to the teacher (T=1), top-1 agreement, teacher-token CE on held-out prompts."""
        return heldout_metrics(self.model, self.frozen, trainable, self.val_examples,
                               self.cfg.train.batch_size, self.pad_id, self.cfg.teacher.top_k,
                               self.cfg.loss.logits_chunk)  # fmt: skip

    def samples(self, trainable: Params, step: int) -> list[dict[str, str]]:
        tok = self.base.tokenizer
        system = self.cfg.data.system_prompt
        prompts = [
            data_lib.encode(tok, [{"role": "user", "content": p}], system)
            for p in self.cfg.eval.sample_prompts
        ]
        if not prompts:
            return []
        eos, pad = special_ids(self.base.config, tok)
        opts = {"max_new_tokens": self.cfg.eval.sample_max_new_tokens, "eos_ids": eos,
                "pad_id": pad, "tokenizer": tok, "mesh": self.mesh}  # fmt: skip
        if self._full_answers is None:
            full = LlamaDecoder(self.base.config, self.model.dtype)
            self._full_answers = generate_tokens(full, self.frozen, prompts, **opts)
        yoro = generate_tokens(YoroDecoder(self.model), (self.frozen, trainable), prompts, **opts)
        rows = [{"step": step, "prompt": p, "full": f.text, "yoro": y.text}
                for p, f, y in zip(self.cfg.eval.sample_prompts, self._full_answers, yoro,
                                   strict=True)]  # fmt: skip
        with (self.run_dir / "samples.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        return rows

    def validate(
        self, trainable: Params, step: int, log: MetricsLog, best: dict, tokens_seen: int = 0
    ) -> None:
        metrics = self.evaluate(trainable)
        if not metrics:
            return
        scalars = {k: v for k, v in metrics.items() if k != "layer_skip_rate"}
        for index, rate in enumerate(metrics.get("layer_skip_rate", [])):
            scalars[f"skip_rate/layer_{index:02d}"] = rate
        log.write(step, "val", scalars | {"tokens_seen": tokens_seen})
        rows = self.samples(trainable, step)
        routed = (f"  reasoning layers {metrics['reasoning_layers']:.2f}"
                  if "reasoning_layers" in metrics else "")  # fmt: skip
        tqdm.write(f"step {step}: val KL {metrics['kl']:.4f}  top-1 {metrics['top1']:.3f}{routed}")
        for row in rows[:2]:
            tqdm.write(f"  [full] {row['full']!r}\n  [yoro] {row['yoro']!r}")
        if metrics["kl"] < best.get("kl", math.inf):
            best.update(metrics, step=step)
            self.export(self.run_dir / "best", trainable, extra={"val": best})

    def export(self, out: Path, trainable: Params, extra: dict | None = None) -> None:
        save_yoro(out, self.cfg.yoro, trainable, self.base.path, self.base.fingerprint,
                  overwrite=True)  # fmt: skip
        if extra:
            (out / "metrics.json").write_text(json.dumps(extra, indent=2) + "\n")

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        cfg, accum = self.cfg, self.cfg.optim.grad_accum
        iterator = self.dataset.to_iter_dataset().__iter__()
        manager = self.checkpoint_manager()
        state, start_step = self.restore(manager, self.init_state(), iterator)
        log = MetricsLog(self.run_dir)
        best_path = self.run_dir / "best" / "metrics.json"
        best = json.loads(best_path.read_text())["val"] if best_path.is_file() else {}
        kill_after = int(os.environ.get(KILL_ENV, "0"))
        if start_step == 0:
            teacher = self.run_dir / "teacher" / "throughput.json"
            if teacher.is_file():  # how fast this run's teacher data was made
                log.write(0, "teacher", json.loads(teacher.read_text()))
            self.validate(state["trainable"], 0, log, best)

        progress = tqdm(total=self.total_steps, initial=start_step, desc="train", unit="step")
        window = {"loss": 0.0, "kl": 0.0, "tokens": 0, "n": 0, "time": time.perf_counter()}
        router_window: dict[str, float] = {}
        router_opts = cfg.router_train if self.routed else None
        step = start_step
        try:
            for step in range(start_step + 1, self.total_steps + 1):
                temperature = temperature_at(cfg.router_train, step, self.steps_per_epoch)
                for micro in range(accum):
                    batch = next(iterator)
                    arrays, prompt_len = _to_device(batch, self.mesh)
                    new_state, m = train_step(
                        self.model, self.frozen, state, arrays,
                        tx=self.tx, prompt_len=prompt_len, loss_opts=self.loss_opts,
                        router_opts=router_opts, temperature=jnp.float32(temperature),
                    )  # fmt: skip
                    loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        raise NonFiniteLoss(
                            f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at "
                            f"optimizer step {step}, micro-batch {micro} (loader position "
                            f"{iterator.get_state()}); the update was not applied and the last "
                            "checkpoint is intact"
                        )
                    state = new_state
                    count = max(float(m["count"]), 1.0)
                    window["loss"] += loss
                    window["kl"] += float(m["kl"]) / count
                    if "hidden" in m:
                        window["hidden"] = window.get("hidden", 0.0) + float(m["hidden"]) / count
                    window["tokens"] += int(batch["valid"].sum())
                    window["n"] += 1
                    for key in ("active_layers", "skip_rate", "gate_entropy", "reward"):
                        if key in m:
                            router_window[key] = router_window.get(key, 0.0) + float(m[key])
                progress.update(1)
                if step % cfg.train.log_every == 0 or step == self.total_steps:
                    elapsed = time.perf_counter() - window["time"]
                    scalars = {
                        "loss": window["loss"] / window["n"], "kl": window["kl"] / window["n"],
                        "grad_norm": grad_norm, "lr": float(self.schedule(step)),
                        "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                    }  # fmt: skip
                    if "hidden" in window:
                        scalars["hidden"] = window["hidden"] / window["n"]
                    if self.routed:
                        scalars |= {k: v / window["n"] for k, v in router_window.items()}
                        scalars |= {"temperature": temperature,
                                    "baseline": float(state["baseline"])}  # fmt: skip
                        router_window = {}
                    log.write(step, "train", scalars)
                    progress.set_postfix(loss=f"{scalars['loss']:.4f}",
                                         tok_s=f"{scalars['tokens_per_s']:.0f}")  # fmt: skip
                    window = {"loss": 0.0, "kl": 0.0, "tokens": 0, "n": 0,
                              "time": time.perf_counter()}  # fmt: skip
                paused = time.perf_counter()  # validation and saving don't count as training
                if step % cfg.eval.every_steps == 0 and step != self.total_steps:
                    self.validate(state["trainable"], step, log, best,
                                  int(state["tokens_seen"]))  # fmt: skip
                if step % cfg.checkpoint.every_steps == 0 or step == self.total_steps:
                    self.save(manager, step, state, iterator)
                window["time"] += time.perf_counter() - paused
                if kill_after and step == kill_after:
                    manager.wait_until_finished()
                    os.kill(os.getpid(), signal.SIGKILL)
            manager.wait_until_finished()
            if step == self.total_steps and start_step < self.total_steps:
                self.validate(state["trainable"], step, log, best, int(state["tokens_seen"]))
        finally:
            progress.close()
            manager.close()
            log.close()
        self.export(self.run_dir / "export", state["trainable"], extra={"best_val": best})
        plot_losses(self.run_dir)
        return {"step": step, "state": state, "best": best}


def train(config: str | RunConfig | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Prepare (teacher data) and train; resumes automatically from RUN/checkpoints."""
    return Trainer(prepare_run(config, overrides)).run()


# ------------------------------------------------------------------------------ plot
def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def plot_losses(run_dir: Path) -> Path | None:
    """RUN/loss.png: training loss and held-out KL against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, key, label in (("train", "loss", "train loss (T_soft KL)"),
                              ("val", "kl", "held-out KL to teacher (T=1)")):  # fmt: skip
        points = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if split == "val" else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL (nats / token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
