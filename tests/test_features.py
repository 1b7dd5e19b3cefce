"""Frozen features stored with the teacher data: the exact-context train step reads them
instead of recomputing the frozen blocks, with the same loss and gradients."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import QUIET_EVAL, kill_then_resume, reuse_teacher_data, smoke_config

from train import data as data_lib
from train.prepare import prepare_run
from train.step import loss_sums
from train.trainer import Trainer
from yoro_jax.checkpoint import load_yoro
from yoro_jax.config import ConfigError

# The default variant on the smoke config, hidden-state loss on, features stored.
EXACT = [
    "yoro.prompt_context=exact",
    "yoro.nets=residual",
    "yoro.compensation_init=reasoning",
    "teacher.features=true",
    "loss.hidden_weight=1.0",
    "loss.soft_temperature=1.0",
    *QUIET_EVAL,
]


@pytest.fixture(scope="module")
def exact_f32(tmp_path_factory):
    """Teacher data with float32 features (exactness), made once for this module."""
    run_dir = tmp_path_factory.mktemp("exact") / "run"
    prep = prepare_run(smoke_config(run_dir, *EXACT, "teacher.feature_dtype=float32"))
    return run_dir, prep


def _batch(prep, count=8):
    records = data_lib.TeacherRecords(prep.shards["train"])
    batch = data_lib.collate([records[i] for i in range(count)], pad_id=0, top_k=8)
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if k != "prompt_len"}
    return arrays, batch["prompt_len"]


def _loss_and_grads(trainer, trainable, arrays, prompt_len):
    opts = dict(trainer.loss_opts)

    def loss(t):
        sums = loss_sums(trainer.model, trainer.frozen, t, arrays, prompt_len, **opts)
        return (sums["kl"] + sums["hidden"]) / sums["count"], sums

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)


@pytest.mark.parametrize("variant", ["exact", "reference"])
def test_stored_features_give_the_recompute_loss_and_gradients(exact_f32, tmp_path, variant):
    run_dir, prep = exact_f32
    if variant == "reference":  # the same shards serve the reference context
        reuse_teacher_data(run_dir, tmp_path / "ref")
        overrides = [
            "teacher.features=true",
            "teacher.feature_dtype=float32",
            "loss.hidden_weight=1",
            *QUIET_EVAL,
        ]
        prep = prepare_run(smoke_config(tmp_path / "ref", *overrides))
    trainer = Trainer(prep)
    trainable = trainer.init_state()["trainable"]
    # move off the zero init, so every net gets a gradient
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    trainable = jax.tree.unflatten(
        tree, [a + 0.02 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    )
    arrays, prompt_len = _batch(prep)
    assert set(data_lib.FEATURES) <= set(arrays)
    recompute = {k: v for k, v in arrays.items() if k not in data_lib.FEATURES}
    (stored_loss, stored), stored_grads = _loss_and_grads(trainer, trainable, arrays, prompt_len)
    (loss, sums), grads = _loss_and_grads(trainer, trainable, recompute, prompt_len)
    assert float(sums["hidden"]) > 0 and float(sums["kl"]) > 0
    for key in ("kl", "hidden", "top1", "count"):
        np.testing.assert_allclose(stored[key], sums[key], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(stored_loss, loss, rtol=1e-5)
    for (path, a), b in zip(
        jax.tree.flatten_with_path(stored_grads)[0], jax.tree.leaves(grads), strict=True
    ):
        scale = float(jnp.abs(b).max())
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_bfloat16_features_change_the_loss_little(exact_f32, tmp_path):
    """bfloat16 storage (the default) rounds the stored states to 8 bits of mantissa; its
    effect on the training loss of fresh nets is measured here and bounded at 2%."""
    run_dir, prep32 = exact_f32
    run16 = tmp_path / "bf16"
    reuse_teacher_data(run_dir, run16)
    import shutil

    shutil.rmtree(run16 / "teacher")
    prep16 = prepare_run(smoke_config(run16, *EXACT))
    trainer = Trainer(prep32)
    trainable = trainer.init_state()["trainable"]
    (loss32, _), _ = _loss_and_grads(trainer, trainable, *_batch(prep32))
    (loss16, _), _ = _loss_and_grads(trainer, trainable, *_batch(prep16))
    relative = abs(float(loss16) - float(loss32)) / float(loss32)
    print(
        f"bfloat16 features: loss {float(loss16):.6f} vs float32 {float(loss32):.6f} "
        f"(relative {relative:.2e})"
    )
    assert 0 < relative < 2e-2


def test_shards_without_features_are_refused_for_a_config_that_needs_them(smoke_run, tmp_path):
    source, _ = smoke_run
    run_dir = tmp_path / "run"
    reuse_teacher_data(source, run_dir)  # reference-variant shards: no features
    with pytest.raises(ConfigError, match="made without the stored frozen features"):
        prepare_run(smoke_config(run_dir, *EXACT))
    with pytest.raises(ConfigError, match="teacher.features: stored features serve"):
        smoke_config(run_dir, "teacher.features=true", "yoro.router.kind=gumbel")


def test_killed_feature_run_resumes_bitwise_equal(exact_f32, tmp_path):
    """SIGKILL mid-epoch (after the step-4 checkpoint, at step 5; 8 steps an epoch) and
    resume: the final nets equal an uninterrupted run's exactly."""
    source, _ = exact_f32
    overrides = [
        *EXACT,
        "teacher.feature_dtype=float32",
        "train.max_steps=7",
        "checkpoint.every_steps=4",
        "train.log_every=1",
    ]
    reference, run_dir = kill_then_resume(source, tmp_path, overrides, kill_after=5, resumed_from=4)
    _, trainable, _ = load_yoro(run_dir / "export")
    for a, b in zip(
        jax.tree.leaves(trainable), jax.tree.leaves(reference["state"]["trainable"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("hidden" in r for r in rows if r["split"] == "train")
