"""Sharded vs single-device runs on 8 simulated CPU devices; prints one JSON report.

Run by tests/test_sharding.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set before JAX
starts, so it cannot run inside the pytest process).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import optax

from train.config import LossSection
from train.data import collate
from train.step import loss_options, train_step
from train.tiny import tiny_random_model
from yoro_jax.decoders import YoroDecoder
from yoro_jax.eval.scoring import score_pairs
from yoro_jax.generate import LlamaDecoder, generate_tokens
from yoro_jax.sharding import MeshConfig, make_mesh, shard_batch, shard_params
from yoro_jax.yoro import Yoro, YoroConfig, init_trainable

MESHES = [(8, 1), (4, 2), (2, 4)]
LOSS_OPTS = loss_options(LossSection(soft_temperature=1.0, ce_weight=0.5, logits_chunk=8))


def synthetic_batch(vocab: int, rows: int = 8, top_k: int = 4) -> dict:
    rng = np.random.RandomState(0)
    examples = []
    for _ in range(rows):
        n = rng.randint(3, 12)
        top = rng.randint(3, vocab, (n, top_k)).astype(np.int32)
        examples.append(
            {
                "prompt": rng.randint(3, vocab, rng.randint(2, 14)).astype(np.int32),
                "response": top[:, 0],
                "top_ids": top,
                "top_logprobs": np.sort(rng.randn(n, top_k).astype(np.float32), -1)[:, ::-1] - 1,
            }
        )
    return collate(examples, pad_id=0, top_k=top_k)


def max_diff(a, b) -> float:
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def sharded_leaves(tree) -> int:
    """How many arrays are actually split (not fully replicated) across devices."""
    return sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(tree))


def main() -> dict:
    assert jax.device_count() == 8, jax.devices()
    base = tiny_random_model(seed=0, num_layers=4)
    ycfg = YoroConfig(1, 1, 1, 1, 1)
    model = Yoro(base.config, ycfg)
    trainable = init_trainable(ycfg, base.config, jax.random.key(0))
    tx = optax.adamw(1e-2)
    batch = synthetic_batch(base.config.vocab_size)
    prompt_len = batch.pop("prompt_len")

    def fresh_state():  # host copies: train_step donates (deletes) the state it is given
        host = jax.tree.map(np.array, trainable)
        return jax.tree.map(
            np.array,
            {
                "trainable": host,
                "opt_state": tx.init(host),
                "step": np.int32(0),
                "tokens_seen": np.int32(0),
                "rng": jax.random.key_data(jax.random.key(1)),
            },
        )

    step = dict(model=model, tx=tx, prompt_len=prompt_len, loss_opts=LOSS_OPTS)
    ref_state, ref_metrics = train_step(
        frozen=base.params, state=fresh_state(), batch=shard_batch(batch, None), **step
    )
    report: dict = {"train": {}, "generate": {}, "score": {}}
    rng = np.random.RandomState(3)
    pairs = [
        (
            rng.randint(3, 300, rng.randint(2, 20)).tolist(),
            rng.randint(3, 300, rng.randint(1, 6)).tolist(),
        )
        for _ in range(11)
    ]
    pairs += [(pairs[0][0], [7, 8]), (pairs[0][0], [9])]  # shared contexts
    ref_scores = score_pairs(
        YoroDecoder(model), (base.params, trainable), pairs, batch_size=4, pad_id=0
    )
    prompts = [list(range(5, 5 + n)) for n in (3, 9, 5, 12, 7)]  # 5 rows: not a multiple of 8
    gen = dict(max_new_tokens=10, eos_ids=(2,), pad_id=0)
    ref_full = [
        c.tokens for c in generate_tokens(LlamaDecoder(base.config), base.params, prompts, **gen)
    ]
    ref_yoro = [
        c.tokens
        for c in generate_tokens(YoroDecoder(model), (base.params, trainable), prompts, **gen)
    ]
    for data, fsdp in MESHES:
        mesh = make_mesh(MeshConfig(data, fsdp))
        frozen = shard_params(base.params, mesh)
        state = shard_params(fresh_state(), mesh)
        new_state, metrics = train_step(
            frozen=frozen, state=state, batch=shard_batch(batch, mesh), **step
        )
        report["train"][f"{data}x{fsdp}"] = {
            "loss_diff": abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
            "params_diff": max_diff(new_state["trainable"], ref_state["trainable"]),
            "opt_state_diff": max_diff(new_state["opt_state"], ref_state["opt_state"]),
            "sharded_frozen_leaves": sharded_leaves(frozen),
            "sharded_state_leaves": sharded_leaves(new_state),
        }
        if (data, fsdp) == (4, 2):  # generation and scoring: pure data parallel and FSDP-heavy
            continue
        full = generate_tokens(LlamaDecoder(base.config), frozen, prompts, mesh=mesh, **gen)
        yoro = generate_tokens(
            YoroDecoder(model), (frozen, shard_params(trainable, mesh)), prompts, mesh=mesh, **gen
        )
        scores = score_pairs(
            YoroDecoder(model),
            (frozen, shard_params(trainable, mesh)),
            pairs,
            batch_size=4,
            pad_id=0,
            mesh=mesh,
        )
        report["score"][f"{data}x{fsdp}"] = {
            "loglik_diff": max(abs(a[0] - b[0]) for a, b in zip(scores, ref_scores, strict=True)),
            "greedy_identical": [a[1] for a in scores] == [b[1] for b in ref_scores],
        }
        report["generate"][f"{data}x{fsdp}"] = {
            "full_identical": [c.tokens for c in full] == ref_full,
            "yoro_identical": [c.tokens for c in yoro] == ref_yoro,
        }
    report["checkpoint"] = checkpoint_across_meshes(fresh_state())
    return report


def checkpoint_across_meshes(state) -> dict:
    """Save the state sharded on (4, 2), restore it onto (2, 4) and onto one device."""
    import orbax.checkpoint as ocp

    save_mesh, load_mesh = make_mesh(MeshConfig(4, 2)), make_mesh(MeshConfig(2, 4))
    saved = shard_params(state, save_mesh)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, saved)
        target = jax.tree.map(lambda a: a.sharding, shard_params(state, load_mesh))
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=s),
            state,
            target,
        )
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path, abstract)
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        flat = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=single),
            state,
        )
        with ocp.StandardCheckpointer() as ckptr:
            restored_single = ckptr.restore(path, flat)
    return {
        "values_diff": max_diff(restored, state),
        "single_device_values_diff": max_diff(restored_single, state),
        "shardings_match_target": all(
            a.sharding == s
            for a, s in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True)
        ),
        "sharded_leaves_restored": sharded_leaves(restored),
    }


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
