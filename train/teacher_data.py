"""Offline teacher data: the full model answers each prompt; we keep its top-k per position.

    python -m train.teacher --config configs/smollm2-cpu.yaml

Records go to ``RUN/teacher/{train,val}-NNNNN.array_record`` shards (grain reads them with
random access). A shard is written under a temporary name and renamed when complete, so
an interrupted run resumes at the first missing shard; ``manifest.json`` pins what the
data was made from and refuses to mix settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from train.config import RunConfig
from train.data import serialize
from yoro_jax.config import ConfigError
from yoro_jax.decoders import unscanned
from yoro_jax.generate import LlamaDecoder, RecordingDecoder, generate_tokens, special_ids

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
    return {
        "dtype": cfg.teacher.feature_dtype,
        "splits": list(FEATURE_SPLITS),
        "embedding_layers": y.embedding_layers,
        "coherence_layers": y.coherence_layers,
        "compensation_layers": y.compensation_layers,
    }


def feature_depths(cfg: RunConfig, base: Any) -> tuple[int, ...]:
    """The base-layer inputs the stored features are read from: the embedding block's
    output (E), the reasoning output / coherence input (N-C), the prompt states of the
    exact context (N-C-Lc .. N-1), and the last layer's output (N, for the first response
    token's hidden state)."""
    y, n = cfg.yoro, base.config.num_hidden_layers
    coherence_input = n - y.coherence_layers
    exact = range(coherence_input - y.compensation_layers, n)
    return (y.embedding_layers, coherence_input, *exact, n)


def feature_record(completion: Any, cfg: RunConfig, dtype) -> dict:
    """One example's frozen features (see ``Yoro.frozen_features``) from the states the
    teacher recorded while answering at :func:`feature_depths`."""
    y = cfg.yoro
    n_prompt_states = y.compensation_layers + y.coherence_layers
    prompt, response = completion.prompt_states, completion.response_states
    record = {  # indices into feature_depths
        "e_prompt": prompt[0],
        "e_response": response[0],
        "r_prompt": prompt[1],
        "teacher_hidden": response[1],
        "prompt_states": prompt[2 : 2 + n_prompt_states],
        "h_first": prompt[-1, -1],
    }
    return {k: np.asarray(v).astype(dtype) for k, v in record.items()}


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
        if manifest["features"] is None:  # stored features a run does not read are harmless
            manifest["features"] = existing.get("features")
        if existing != manifest:
            changed = sorted(k for k in manifest if existing.get(k) != manifest[k])
            raise ConfigError(
                f"teacher data in {out} was made with different settings ({', '.join(changed)});"
                " delete that directory or use another run_dir"
            )
    else:
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    decoder = LlamaDecoder(base.config, base.params["embed"].dtype)
    recording = RecordingDecoder(base.config, base.params["embed"].dtype, feature_depths(cfg, base))
    feature_dtype = ml_dtypes.bfloat16 if cfg.teacher.feature_dtype == "bfloat16" else np.float32
    eos, pad = special_ids(base.config, base.tokenizer)
    size = cfg.teacher.shard_size
    paths = {s: shard_paths(out, s, len(p), size) for s, p in splits.items()}
    todo = sum(
        len(splits[s][i * size : (i + 1) * size])
        for s in splits
        for i, p in enumerate(paths[s])
        if not p.exists()
    )
    if not todo:
        return paths
    # per-layer buffers, as the generate CLI decodes: on CPU a scan over the stacked
    # weights copies every layer's slice on every step (docs/DESIGN.md §8)
    params = unscanned(base.params)
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
                features = cfg.teacher.features and split in FEATURE_SPLITS
                completions = generate_tokens(
                    recording if features else decoder,
                    params,
                    [shard[i] for i in rows],
                    max_new_tokens=cfg.teacher.max_new_tokens,
                    eos_ids=eos,
                    pad_id=pad,
                    record_top_k=cfg.teacher.top_k,
                )
                for i, c in zip(rows, completions, strict=True):
                    f = feature_record(c, cfg, feature_dtype) if features else {}
                    records[i] = serialize(
                        {
                            "prompt": np.asarray(shard[i], np.int32),
                            "response": np.asarray(c.tokens, np.int32),
                            "top_ids": c.top_ids.astype(np.int32),
                            "top_logprobs": c.top_logprobs.astype(np.float32),
                        }
                        | f
                    )
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
    seconds = time.perf_counter() - started
    report = {
        "prompts": todo,
        "seconds": round(seconds, 1),
        "prompts_per_s": todo / seconds,
        "tokens_per_s": new_tokens / seconds,
        "response_tokens": new_tokens,
        "bytes": sum(p.stat().st_size for ps in paths.values() for p in ps),
    }
    (out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"teacher: {todo} prompts in {seconds:.0f} s ({report['prompts_per_s']:.2f} prompts/s, "
        f"{report['tokens_per_s']:.0f} answer tokens/s); {report['bytes'] / 2**20:.0f} MiB of "
        f"shards, {report['bytes'] / max(new_tokens, 1) / 1024:.1f} KiB per answer token"
        + (
            f" (frozen features in {cfg.teacher.feature_dtype})"
            if cfg.teacher.features and set(FEATURE_SPLITS) & set(splits)
            else ""
        ),
        file=sys.stderr,
    )
    return paths
