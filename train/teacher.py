"""Offline teacher data: the full model answers each prompt; we keep its top-k per position.

    python -m train.teacher --config configs/smollm2-cpu.yaml

Records go to ``RUN/teacher/{train,val}-NNNNN.array_record`` shards (grain reads them with
random access). A shard is written under a temporary name and renamed when complete, so
an interrupted run resumes at the first missing shard; ``manifest.json`` pins what the
data was made from and refuses to mix settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from train.config import RunConfig
from train.data import bucket, serialize
from yoro_jax.batch import prompt_response_layout
from yoro_jax.config import ConfigError
from yoro_jax.generate import LlamaDecoder, generate_tokens, special_ids
from yoro_jax.yoro import Yoro

# Frozen features are stored for the training split only: validation recomputes them
# (it runs rarely, and so checks the stored path against the recompute path).
FEATURE_SPLITS = ("train",)


def teacher_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir) / "teacher"


def _manifest(cfg: RunConfig, fingerprint: str, splits: dict[str, list[list[int]]]) -> dict:
    digest = hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()
    return {
        "base_fingerprint": fingerprint,
        "max_new_tokens": cfg.teacher.max_new_tokens,
        "top_k": cfg.teacher.top_k,
        "shard_size": cfg.teacher.shard_size,
        "prompts_sha256": digest,
        "counts": {name: len(prompts) for name, prompts in splits.items()},
        "features": _feature_spec(cfg),
    }


def _feature_spec(cfg: RunConfig) -> dict | None:
    """What the stored features depend on (None: none stored)."""
    if not cfg.teacher.features:
        return None
    y = cfg.yoro
    return {"dtype": cfg.teacher.feature_dtype, "splits": list(FEATURE_SPLITS),
            "embedding_layers": y.embedding_layers, "coherence_layers": y.coherence_layers,
            "compensation_layers": y.compensation_layers}  # fmt: skip


@functools.partial(jax.jit, static_argnames=("model", "prompt_len"))
def _features(model: Yoro, frozen, tokens, valid, prompt_len: int):
    return model.frozen_features(frozen, tokens, valid, prompt_len)


def feature_records(
    model: Yoro, frozen: Any, prompts: list[list[int]], responses: list[list[int]],
    pad_id: int, dtype: Any,
) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """The frozen features of (prompt, response) pairs, one full-model pass per batch,
    cut to each example's own length and cast to the storage dtype."""
    prompt_len = bucket(max(map(len, prompts)))
    total = prompt_len + bucket(max(map(len, responses)))
    tokens, valid, _ = prompt_response_layout(prompts, responses, prompt_len, total, pad_id)
    feats = jax.device_get(_features(model, frozen, jnp.asarray(tokens), jnp.asarray(valid),
                                     prompt_len))  # fmt: skip
    out = []
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        n, p = len(response), len(prompt)
        out.append({
            "e_response": feats["e_response"][row, :n],
            "prompt_states": feats["prompt_states"][row, :, prompt_len - p :],
            "h_first": feats["h_first"][row],
            "teacher_hidden": feats["teacher_hidden"][row, :n],
        })  # fmt: skip
    return [{k: np.asarray(v).astype(dtype) for k, v in r.items()} for r in out]


def shard_paths(out: Path, split: str, count: int, shard_size: int) -> list[Path]:
    return [out / f"{split}-{i:05d}.array_record" for i in range(math.ceil(count / shard_size))]


def generate_teacher_data(
    cfg: RunConfig, base: Any, splits: dict[str, list[list[int]]]
) -> dict[str, list[Path]]:
    """Make (or finish) the teacher shards for each split; returns their paths."""
    from array_record.python.array_record_module import ArrayRecordWriter

    out = teacher_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _manifest(cfg, base.fingerprint, splits)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        existing = json.loads(manifest_path.read_text())
        if existing.get("features") is None and manifest["features"] is not None:
            raise ConfigError(
                f"teacher data in {out} was made without the stored frozen features that "
                "teacher.features: true needs; delete that directory (or use another run_dir) "
                "to make them, or set teacher.features: false to recompute them every step"
            )
        if existing != manifest:
            changed = sorted(k for k in manifest if existing.get(k) != manifest[k])
            raise ConfigError(
                f"teacher data in {out} was made with different settings ({', '.join(changed)});"
                " delete that directory or use another run_dir"
            )
    else:
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    decoder = LlamaDecoder(base.config, base.params["embed"].dtype)
    feature_model = Yoro(base.config, cfg.yoro, base.params["embed"].dtype)
    feature_dtype = ml_dtypes.bfloat16 if cfg.teacher.feature_dtype == "bfloat16" else np.float32
    eos, pad = special_ids(base.config, base.tokenizer)
    size = cfg.teacher.shard_size
    paths = {s: shard_paths(out, s, len(p), size) for s, p in splits.items()}
    todo = sum(len(splits[s][i * size : (i + 1) * size])
               for s in splits for i, p in enumerate(paths[s]) if not p.exists())  # fmt: skip
    if not todo:
        return paths
    progress = tqdm(total=todo, desc="teacher responses", unit="prompt")
    started, new_tokens = time.perf_counter(), 0
    for split, prompts in splits.items():
        for index, path in enumerate(paths[split]):
            if path.exists():
                continue
            shard = prompts[index * size : (index + 1) * size]
            # similar lengths together: less padding per generation batch
            order = sorted(range(len(shard)), key=lambda i: len(shard[i]))
            records: dict[int, bytes] = {}
            for start in range(0, len(order), cfg.teacher.batch_size):
                rows = order[start : start + cfg.teacher.batch_size]
                completions = generate_tokens(
                    decoder, base.params, [shard[i] for i in rows],
                    max_new_tokens=cfg.teacher.max_new_tokens, eos_ids=eos, pad_id=pad,
                    record_top_k=cfg.teacher.top_k,
                )  # fmt: skip
                features = (
                    feature_records(feature_model, base.params, [shard[i] for i in rows],
                                    [c.tokens for c in completions], pad, feature_dtype)
                    if cfg.teacher.features and split in FEATURE_SPLITS else [{}] * len(rows)
                )  # fmt: skip
                for i, c, f in zip(rows, completions, features, strict=True):
                    records[i] = serialize({
                        "prompt": np.asarray(shard[i], np.int32),
                        "response": np.asarray(c.tokens, np.int32),
                        "top_ids": c.top_ids.astype(np.int32),
                        "top_logprobs": c.top_logprobs.astype(np.float32),
                    } | f)  # fmt: skip
                new_tokens += sum(len(c.tokens) for c in completions)
                progress.update(len(rows))
                progress.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - started):.0f}")
            partial = path.with_suffix(".partial")
            writer = ArrayRecordWriter(str(partial), "group_size:1")
            for i in range(len(shard)):
                writer.write(records[i])
            writer.close()
            partial.replace(path)
    progress.close()
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from train.trainer import prepare_run

    parser = argparse.ArgumentParser(prog="python -m train.teacher", description=__doc__)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    args = parser.parse_args(argv)
    try:
        prepare_run(args.config, args.set)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
