"""Model directories: orbax params + HF-style config.json + tokenizer files + metadata.

A model directory is written into a temporary sibling and renamed into place only when
complete, and ``yoro_jax.json`` (written last) marks it complete, so an interrupted write
never leaves something that loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from yoro_jax.config import LlamaConfig
from yoro_jax.llama import Params, init_params, stack_layers, unstack_layers
from yoro_jax.yoro import (
    NETS_FORMAT_VERSION,
    TRAINABLE_DIR,
    YORO_CONFIG_FILE,
    YoroConfig,
    init_trainable,
)

# 2: the decoder layers stacked along a leading axis (lax.scan); 1: a list of layers
# (read and upgraded on load). The fingerprint is the same for both.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "yoro_jax.json"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class CheckpointError(RuntimeError):
    """A model or run directory that is missing, incomplete or does not match."""


def resolve_dtype(name: str | Any) -> Any:
    if not isinstance(name, str):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def params_fingerprint(params: Any) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes: identifies a set of weights.

    Computed layer by layer (as a list of layers), so it does not depend on the storage
    format: a model converted before layers were stacked keeps its fingerprint, and nets
    trained on it still match."""
    if isinstance(params.get("layers"), dict):
        params = {**params, "layers": unstack_layers(jax.tree.map(np.asarray, params["layers"]))}
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def map_named(tree: Any, name: str, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to the value under every dict key ``name`` in a nested structure of
    dicts, lists, tuples and NamedTuples (params, optimizer states): format upgrades."""
    if isinstance(tree, dict):
        return {k: fn(v) if k == name else map_named(v, name, fn) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_named(v, name, fn) for v in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(map_named(v, name, fn) for v in tree)
    return tree


def listed_layout(abstract: Any, name: str) -> tuple[Any, Callable[[Any], Any]]:
    """Format 1 stored every stack of layers as a list of layers. For the abstract tree of
    today's layout, return the format-1 layout of it (every stack under key ``name`` as a
    list), and the function that stacks a tree read in that layout back (an empty list
    becomes the empty stack of its abstract)."""
    stacks: list[Any] = []

    def listed(stack: Any) -> Any:
        stacks.append(stack)
        return jax.eval_shape(unstack_layers, stack)

    old = map_named(abstract, name, listed)

    def restack(tree: Any) -> Any:
        abstracts = iter(stacks)

        def stack(layers: list[Any]) -> Any:
            like = next(abstracts)
            if layers:
                return stack_layers(layers)
            return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), like)

        return map_named(tree, name, stack)

    return old, restack


def _this_process_only() -> dict[str, Any]:
    """Orbax options for a file one process writes or reads by itself (a model dir, exported
    nets): on a multi-host run the other processes are not part of the save or restore."""
    if jax.process_count() == 1:
        return {}
    me = jax.process_index()
    return {
        "multiprocessing_options": ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"local{me}"
        )
    }


def save_pytree(path: Path, tree: Any) -> None:
    """Synchronously save a pytree of arrays with orbax (from this process alone)."""
    if jax.process_count() > 1:  # host-local arrays: orbax saves them as numpy
        tree = jax.tree.map(np.asarray, tree)
    with ocp.StandardCheckpointer(**_this_process_only()) as checkpointer:
        checkpointer.save(Path(path).absolute(), tree)
        checkpointer.wait_until_finished()


def restore_pytree(path: Path, abstract: Any) -> Any:
    """Restore a pytree saved by :func:`save_pytree` onto ``abstract``'s structure and dtypes.

    Leaves come back as device arrays: orbax returns numpy for sharding-free targets, and
    numpy params would be copied into every jitted call.
    """
    try:
        with ocp.StandardCheckpointer(**_this_process_only()) as checkpointer:
            return jax.device_put(checkpointer.restore(Path(path).absolute(), abstract))
    except Exception as err:  # noqa: BLE001 (orbax / tensorstore raise many kinds)
        lines = str(err).strip().splitlines()
        raise CheckpointError(
            f"{path}: the saved arrays do not load ({type(err).__name__}: "
            f"{lines[0][:200] if lines else ''}); the files are damaged or incomplete — "
            "write them again (convert the model / export the nets)"
        ) from err


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-"


def sweep_dead_partials(out: Path) -> list[Path]:
    """Remove the temporary siblings (``.NAME.partial-HOST-PID-*``, ``.NAME.old-...``) that
    a writer of ``out`` on this host left when it was killed; returns what was removed."""
    removed = []
    host = socket.gethostname()
    for kind in ("partial", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-{host}-*-*"):
            pid = path.name[len(f".{out.name}.{kind}-{host}-") :].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out`` only if the block succeeds. The
    temporary names carry host and pid, so what a killed writer left is removed by the
    next writer of the same ``out``."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory already exists: {out} (pass --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    for path in sweep_dead_partials(out):
        print(f"removed {path}, left by a killed writer", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{_owner_tag()}", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like mkdir's
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{_owner_tag()}", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_model_dir(
    out: Path,
    cfg: LlamaConfig,
    params: Params,
    save_tokenizer: Callable[[Path], None] | None,
    source: str,
    overwrite: bool = False,
) -> str:
    """Write a complete model directory atomically; returns the params fingerprint."""
    fingerprint = params_fingerprint(params)
    dtype = str(np.asarray(params["embed"]).dtype)
    with atomic_directory(out, overwrite) as tmp:
        cfg.save(tmp / CONFIG_FILE)
        save_pytree(tmp / PARAMS_DIR, params)
        if save_tokenizer is not None:
            save_tokenizer(tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "source": source,
            "dtype": dtype,
            "fingerprint": fingerprint,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return fingerprint


@dataclasses.dataclass
class Model:
    """A loaded base model: config, params pytree, tokenizer (if saved) and identity."""

    config: LlamaConfig
    params: Params
    tokenizer: Any
    path: Path | None
    fingerprint: str


def read_meta(model_dir: Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    meta_path = model_dir / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(
            f"{model_dir} is not a complete yoro-jax model directory (no {META_FILE}); "
            "create one with `python -m convert SOURCE --out DIR`"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{model_dir}: format_version {meta.get('format_version')} is not supported "
            f"(this yoro-jax reads versions {', '.join(map(str, READABLE_VERSIONS))}); "
            "convert the checkpoint again with this version"
        )
    return meta


def load_model(model_dir: str | Path, dtype: str | Any | None = None) -> Model:
    """Load a model directory written by ``python -m convert``.

    ``dtype`` (``"float32"``/``"bfloat16"``) casts the weights; default: as saved.
    """
    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    cfg = LlamaConfig.load(model_dir / CONFIG_FILE)
    saved_dtype = resolve_dtype(meta["dtype"])
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), saved_dtype))
    if meta["format_version"] == 1:  # layers saved as a list: restore so, then stack
        old, restack = listed_layout(abstract, "layers")
        params = restack(restore_pytree(model_dir / PARAMS_DIR, old))
    else:
        params = restore_pytree(model_dir / PARAMS_DIR, abstract)
    if dtype is not None:
        target = resolve_dtype(dtype)
        params = jax.tree.map(lambda a: a.astype(target), params)
    tokenizer = load_tokenizer(model_dir)
    return Model(cfg, params, tokenizer, model_dir, meta["fingerprint"])


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer saved beside the params, or None if the directory has none."""
    if not (Path(model_dir) / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


# ------------------------------------------------------------------ YORO nets directories
def save_yoro(
    out: Path,
    ycfg: YoroConfig,
    trainable: Params,
    base_dir: Path | None,
    base_fingerprint: str,
    overwrite: bool = False,
) -> None:
    """Write the trainable nets + YORO config + the identity of their base model."""
    with atomic_directory(Path(out), overwrite) as tmp:
        save_pytree(tmp / TRAINABLE_DIR, trainable)
        meta = {
            "format_version": NETS_FORMAT_VERSION,
            "yoro": dataclasses.asdict(ycfg),  # includes the router's config
            "base_model": str(Path(base_dir).absolute()) if base_dir else None,
            "base_fingerprint": base_fingerprint,
        }
        (tmp / YORO_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_yoro_meta(path: Path) -> dict[str, Any]:
    meta_path = Path(path) / YORO_CONFIG_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path} holds no trained YORO nets (no {YORO_CONFIG_FILE})")
    return json.loads(meta_path.read_text())


def resolve_nets(path: str | Path) -> Path:
    """A YORO nets directory: the path itself, or a training run's ``export`` / ``best``."""
    path = Path(path)
    for candidate in (path, path / "export", path / "best"):
        if (candidate / YORO_CONFIG_FILE).is_file():
            return candidate
    raise CheckpointError(
        f"{path}: no trained YORO nets there (expected {YORO_CONFIG_FILE} in it, or a "
        "training run directory with export/ or best/)"
    )


def recorded_base(path: Path) -> str:
    """The base model directory the nets in ``path`` were trained on (as saved with them)."""
    base = read_yoro_meta(path).get("base_model")
    if not base:
        raise CheckpointError(f"{path} does not record its base model; give the model explicitly")
    return base


def load_yoro(path: Path, base: Any = None) -> tuple[YoroConfig, Params, Any]:
    """Load YORO nets and check them against ``base`` (a loaded Model, or None: the saved path).

    Returns ``(yoro config, trainable params, base model)``.
    """
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
    abstract = jax.eval_shape(
        lambda: init_trainable(ycfg, base.config, jax.random.key(0), base.params)
    )
    version = meta.get("format_version", 1)
    if version == NETS_FORMAT_VERSION:
        return ycfg, restore_pytree(Path(path) / TRAINABLE_DIR, abstract), base
    if version != 1:
        raise CheckpointError(
            f"{path}: YORO nets format_version {version} is not supported (this yoro-jax "
            f"reads {NETS_FORMAT_VERSION} and upgrades 1)"
        )
    # version 1 saved the compensation layers as a list: restore that, then stack
    old, restack = listed_layout(abstract, "compensation")
    return ycfg, restack(restore_pytree(Path(path) / TRAINABLE_DIR, old)), base
