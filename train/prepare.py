"""Run preparation: the base model, the prompt splits, the teacher data, the resume check
and the run's starting nets — everything before the first step (docs/DESIGN.md §4)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from train import data as data_lib
from train.config import RunConfig, load_config, to_dict
from train.lock import lock_run_dir
from train.teacher_data import generate_teacher_data
from yoro_jax.checkpoint import (
    Model,
    load_model,
    load_yoro,
    resolve_dtype,
    write_model_dir,
)
from yoro_jax.config import ConfigError
from yoro_jax.llama import Params
from yoro_jax.models import EMBEDDED_DEFAULT, resolve_model
from yoro_jax.sharding import is_primary, sync_processes
from yoro_jax.yoro import init_trainable

# Sections whose change makes a resumed run a different experiment.
_FIXED_ON_RESUME = ("model", "yoro", "data", "teacher", "loss", "optim", "router_train")


# ------------------------------------------------------------------------- base model
def resolve_base(cfg: RunConfig) -> Model:
    """The frozen base: ``tiny-random`` (written to RUN/base), ``smollm2`` or a model dir."""
    path = cfg.model.path
    if path == "tiny-random":
        from train.tiny import byte_tokenizer, tiny_random_model

        out = Path(cfg.run_dir) / "base"
        if not out.is_dir() and is_primary():
            model = tiny_random_model(seed=0)
            params = jax.tree.map(lambda a: a.astype(resolve_dtype(cfg.model.dtype)), model.params)
            write_model_dir(
                out, model.config, params, byte_tokenizer().save_pretrained, "tiny-random"
            )
        sync_processes("tiny-random base written")
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
    """Refuse a run dir that holds a run with other fixed settings."""
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


def prepare_run(config: str | RunConfig | None, overrides: list[str] = ()) -> Prepared:
    """Config -> run dir -> base model -> prompts -> teacher data (made once, resumable)."""
    cfg = config if isinstance(config, RunConfig) else load_config(config, list(overrides))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_primary():
        lock_run_dir(run_dir)
    _check_resumable(cfg, run_dir)
    base = resolve_base(cfg)
    cfg.yoro.validate(base.config)
    if base.tokenizer is None:
        raise ConfigError(f"model.path: {base.path} has no tokenizer; training needs one")
    # only a config that validated claims the run dir (a failed one must not block its fix)
    if is_primary():
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    prompts = data_lib.load_prompts(cfg.data, base.tokenizer)
    splits = split_prompts(prompts, cfg.data.validation_prompts)
    # Online mode also trains on the teacher's answers (the sequences); only the target
    # changes: dense teacher logits computed in the step instead of the stored top-k.
    # Multi-host: process 0 makes them (one writer per shard), the others read them after.
    if is_primary():
        shards = generate_teacher_data(cfg, base, splits)
    sync_processes("teacher data written")
    if not is_primary():
        shards = generate_teacher_data(cfg, base, splits)  # all there: only their paths
    return Prepared(cfg, base, shards)


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
    return {
        **{k: v for k, v in loaded.items() if k != "router"},
        **({"router": fresh["router"]} if "router" in fresh else {}),
    }
