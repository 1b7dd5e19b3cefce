"""Sharded training, checkpoints and generation on 8 simulated CPU devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from yoro_jax.sharding import MeshConfig, param_spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharded_checks"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["8x1", "4x2", "2x4"])
def test_sharded_train_step_equals_single_device(report, mesh):
    row = report["train"][mesh]
    assert row["loss_diff"] <= 1e-5
    assert row["params_diff"] <= 1e-5 and row["opt_state_diff"] <= 1e-5
    if mesh != "8x1":  # FSDP actually splits frozen weights and the optimizer state
        assert row["sharded_frozen_leaves"] > 0 and row["sharded_state_leaves"] > 0


@pytest.mark.parametrize("mesh", ["8x1", "2x4"])
def test_sharded_generation_equals_unsharded(report, mesh):
    assert report["generate"][mesh] == {"full_identical": True, "yoro_identical": True}


@pytest.mark.parametrize("mesh", ["8x1", "2x4"])
def test_sharded_lm_eval_scoring_equals_unsharded(report, mesh):
    row = report["score"][mesh]
    assert row["loglik_diff"] <= 1e-4 and row["greedy_identical"]


def test_checkpoint_saved_on_one_mesh_restores_on_another(report):
    ckpt = report["checkpoint"]
    assert ckpt["values_diff"] == 0.0 and ckpt["single_device_values_diff"] == 0.0
    assert ckpt["shardings_match_target"] and ckpt["sharded_leaves_restored"] > 0


def test_remat_changes_memory_not_results():
    import jax
    import numpy as np

    from train.tiny import tiny_random_model
    from yoro_jax.yoro import Yoro, YoroConfig, init_trainable

    base = tiny_random_model(seed=0, num_layers=4)
    ycfg = YoroConfig(1, 1, 1, 1, 1)
    trainable = init_trainable(ycfg, base.config, jax.random.key(0))
    tokens = np.arange(5, 37, dtype=np.int32).reshape(2, 16)
    valid = np.ones_like(tokens, bool)

    def grads(remat):
        model = Yoro(base.config, ycfg, remat=remat)
        loss = lambda t: model.forward(base.params, t, tokens, valid, 8).std()  # noqa: E731
        return jax.grad(loss)(trainable)

    plain, remat = grads(False), grads(True)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_param_spec_shards_the_largest_divisible_dimension():
    assert param_spec((320, 64), 4) == ("fsdp", None) or param_spec((320, 64), 4)[0] == "fsdp"
    assert tuple(param_spec((64, 4, 16), 4)) == ("fsdp",)
    assert tuple(param_spec((6, 3), 4)) == ()  # nothing divisible: replicated
    assert tuple(param_spec((576,), 1)) == ()
    # a stack of layers: the layer axis stays whole even when it is the largest
    assert tuple(param_spec((64, 8, 3), 4, layer_axis=True)) == (None, "fsdp")
    assert tuple(param_spec((8, 3), 4, layer_axis=True)) == ()


def test_mesh_larger_than_the_machine_is_a_clear_error():
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        MeshConfig(64, 2).validate()


def test_train_cli_refuses_a_mesh_bigger_than_the_machine_before_any_work(tmp_path, capsys):
    import jax

    from train.__main__ import main

    run_dir, n = tmp_path / "run", 2 * jax.device_count()
    smoke = str(ROOT / "configs" / "smoke.yaml")
    code = main(
        [
            "--config",
            smoke,
            "--set",
            f"mesh.data={n}",
            "--set",
            f"train.batch_size={n}",
            "--set",
            f"run_dir={run_dir}",
        ]
    )
    assert code == 2
    assert f"needs {n} devices" in capsys.readouterr().err
    assert not run_dir.exists()  # no teacher data made, nothing written
