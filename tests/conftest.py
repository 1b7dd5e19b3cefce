"""Shared fixtures: tiny random HF Llamas, and the real SmolLM2 (converted once per session)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set through the environment (before jax is imported) so that the CLI subprocesses some
# tests start compute exactly like this process and reuse its compiled programs.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="yoro-jax-xla-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from yoro_jax.batch import left_pad  # noqa: E402
from yoro_jax.yoro import YoroConfig  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
QUIET_EVAL = ["eval.sample_prompts=[]", "eval.every_steps=1000"]


# The fast tier (`pytest -m "not slow"`, the inner loop) leaves out the tests on the real
# model, those that share the smoke training run, and the ones marked slow by hand.
SLOW_FIXTURES = {
    "smollm2",
    "smollm2_dir",
    "smollm2_hf",
    "smollm2_gguf",  # the real model
    "smoke_run",  # the shared smoke training run
    "exact_f32",  # a feature-recording teacher run (test_features)
    "report",  # the 8-device sharded checks subprocess (test_sharding)
}


# ... and the tests that took longest in the fast tier on 2 cores (>= 9 s each), except
# one case of the core invariant (teacher forcing == cached generation), kept fast.
SLOW_TESTS = {
    "test_splits_driver_reports_agreement_and_speed_per_split",
    "test_cli_runs_offline_tasks_and_writes_results",
    "test_all_gates_on_equals_the_routerless_model",
    "test_remat_changes_memory_not_results",
    "test_cached_generation_equals_teacher_forcing",
    "test_variant_cached_generation_equals_teacher_forcing",
    "test_cached_decode_equals_full_recomputation",
    "test_batched_loss_equals_per_sequence_reference",
    "test_batched_full_scores_equal_one_sequence_at_a_time",
    "test_a_new_variant_plugs_in_without_touching_the_model",
    "test_exact_residual_nets_at_step_0_skip_the_middle_layers_exactly",
    "test_routed_generation_equals_teacher_forcing",
    "test_only_trainable_params_get_gradients",
    "test_reasoning_block_runs_once_per_generate_call",
    "test_layer_gated_off_for_the_whole_batch_is_not_executed",
    "test_response_hidden_selects_the_predicting_positions",
    "test_recorded_top_k_matches_full_forward",
    "test_reinforce_estimator_is_unbiased_on_a_toy_problem",
    "test_unscanned_layers_decode_like_the_stack",
    "test_greedy_output_is_the_full_models",
    "test_a_perfect_draft_keeps_every_proposal",
    "test_batched_rows_accepting_differently_give_their_single_prompt_results",
    "test_eos_and_stop_strings_behave_as_in_normal_generation",
    "test_speculative_sampling_keeps_the_full_models_distribution",
    "test_generate_cli_speculative_prints_the_full_models_answer",
    "test_speculative_mode_generates_and_scores_like_the_full_model",
    "test_generate_cli_checks_its_input_before_any_allocation",
    "test_cli_bad_model_args_are_one_error_line",
    "test_compare_prints_modes_side_by_side_and_plots",
    "test_cli_runs_an_offline_standard_task_with_no_hub",
    "test_two_processes_train_checkpoint_and_resume_like_one",
}
FAST_KEEP = {
    "test_cached_generation_equals_teacher_forcing[lean]",
    "test_greedy_output_is_the_full_models[exact-3]",  # speculative decoding, shared caches
    "test_a_perfect_draft_keeps_every_proposal[unscanned]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        uses = set(getattr(item, "fixturenames", ()))
        named_slow = getattr(item, "originalname", item.name) in SLOW_TESTS
        if named_slow and item.name in FAST_KEEP:
            continue
        if item.get_closest_marker("smollm2") or uses & SLOW_FIXTURES or named_slow:
            item.add_marker(pytest.mark.slow)


def tiny_hf_config(**overrides):
    from transformers import LlamaConfig as HFLlamaConfig

    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return HFLlamaConfig(**kwargs)


def tiny_hf_model(seed: int = 0, **overrides):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_hf_config(**overrides)).eval()
    # HF initialises norms to 1; randomise them so parity tests exercise the norm weights
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def params_from_hf(model):
    """Our config + params from an in-memory HF model (through the converter's mapping)."""
    from yoro_jax.config import LlamaConfig
    from yoro_jax.convert.mapping import hf_to_params

    cfg = LlamaConfig.from_hf_dict(model.config.to_dict())
    tensors = ((k, v.detach().float().numpy()) for k, v in model.state_dict().items())
    params = jax.tree.map(jax.numpy.asarray, hf_to_params(cfg, tensors))
    return cfg, params


def random_batch(rng: np.random.RandomState, lengths: list[int], vocab: int, width: int):
    """Left-padded [B, width] tokens + valid mask for rows of the given lengths."""
    tokens = np.zeros((len(lengths), width), np.int32)
    valid = np.zeros((len(lengths), width), bool)
    for row, n in enumerate(lengths):
        tokens[row, width - n :] = rng.randint(3, vocab, n)
        valid[row, width - n :] = True
    return tokens, valid


def cached_logits(decoder, params, prompts, continuations, width):
    """Drive prefill + steps by hand, feeding given tokens: logits [B, steps, V]."""
    tokens, valid = left_pad(prompts, width, 0)
    steps = continuations.shape[1]
    kv_valid = jnp.zeros((len(prompts), width + steps), bool).at[:, :width].set(valid)
    from yoro_jax.generate import step as decode_step

    prefill = jax.jit(decoder.prefill)
    step = jax.jit(lambda *args: decode_step(decoder, *args))
    logits, caches = prefill(params, tokens, valid, kv_valid)
    out = [logits]
    positions = valid.sum(1)
    for i in range(steps - 1):
        kv_valid = kv_valid.at[:, width + i].set(True)
        logits, caches = step(
            params,
            caches,
            continuations[:, i : i + 1],
            (positions + i)[:, None],
            kv_valid,
            width + i,
        )
        out.append(logits)
    return np.stack([np.asarray(x) for x in out], axis=1)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from yoro_jax.convert.smollm2 import fetch_smollm2_gguf

    return fetch_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2 converted from its GGUF (reuses YORO_JAX_TEST_MODEL if it points at one)."""
    from yoro_jax.convert.core import convert

    existing = os.environ.get("YORO_JAX_TEST_MODEL")
    if existing and (Path(existing) / "yoro_jax.json").is_file():
        return Path(existing)
    out = tmp_path_factory.mktemp("smollm2") / "model"
    convert(str(smollm2_gguf), out)
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    from yoro_jax.checkpoint import load_model

    return load_model(smollm2_dir)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf):
    """transformers' own float32 load of the same GGUF: the parity reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "List three prime numbers and explain why 1 is not prime.",
    "Translate 'good morning' into Spanish and German.",
]


# ------------------------------------------------------------------------- training runs
def smoke_config(run_dir: Path, *overrides: str):
    from train.config import load_config

    return load_config(SMOKE, [f"run_dir={run_dir}", *overrides])


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One smoke-config run shared by training and router tests (teacher data + 24 steps)."""
    from train.trainer import train

    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    result = train(smoke_config(run_dir))
    return run_dir, result


def reuse_teacher_data(source_run: Path, run_dir: Path) -> None:
    """Start a run with another run's base model and teacher shards (same settings)."""
    import shutil

    for name in ("base", "teacher"):
        shutil.copytree(source_run / name, run_dir / name)


def assert_greedy_choices(logits, tokens, margin: float = 1e-4) -> None:
    """``tokens`` are the greedy choices under ``logits`` [..., V] computed by *another*
    program (teacher forcing vs cached decoding, eager vs jitted).

    Exact argmax equality across programs is brittle: float32 summation order differs, so
    a near-tie may flip on another CPU. Where the argmax differs, the chosen token must be
    within ``margin`` of the maximum logit (a top-2 gap below float tolerance)."""
    logits, tokens = np.asarray(logits), np.asarray(tokens)
    chosen = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    gap = logits.max(-1) - chosen
    differ = logits.argmax(-1) != tokens
    assert np.all(gap[differ] <= margin), (
        f"{int(differ.sum())} greedy choices are not the argmax; largest top-1 gap "
        f"{float(gap.max()):.3g} > {margin}"
    )


def kill_then_resume(
    source_run: Path,
    tmp_path: Path,
    overrides: list[str],
    kill_after: int,
    resumed_from: int,
    signal_env: str | None = None,
    returncode: int = -9,
    stopped_says: str = "",
) -> tuple[dict, Path]:
    """Train ``overrides`` on the smoke config uninterrupted, and again in a subprocess
    SIGKILLed right after optimizer step ``kill_after`` (or sent the signal of
    ``signal_env``, exiting with ``returncode`` and printing ``stopped_says``) and rerun
    (which must resume from the step-``resumed_from`` checkpoint). Both reuse
    ``source_run``'s teacher data. Returns (the uninterrupted run's result, the killed-and-
    resumed run dir)."""
    import subprocess
    import sys

    from train.trainer import KILL_ENV, train

    reuse_teacher_data(source_run, tmp_path / "straight")
    reference = train(smoke_config(tmp_path / "straight", *overrides))
    run_dir = tmp_path / "killed"
    reuse_teacher_data(source_run, run_dir)
    command = [sys.executable, "-m", "train", "--config", str(SMOKE), "--set", f"run_dir={run_dir}"]
    for item in overrides:
        command += ["--set", item]
    env = {**os.environ, signal_env or KILL_ENV: str(kill_after)}
    killed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert killed.returncode == returncode, killed.stderr[-2000:]
    assert not (run_dir / "export").exists()
    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from step {resumed_from}" in resumed.stderr
    assert stopped_says in killed.stderr, killed.stderr[-2000:]
    return reference, run_dir


# a tiny model directory with trained-shaped YORO nets (eval and standard-task tests)
YCFG = YoroConfig(1, 1, 1, 1, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model directory (byte tokenizer) and trained-shaped YORO nets for it."""
    from train.tiny import tiny_random_model
    from yoro_jax.checkpoint import save_yoro, write_model_dir
    from yoro_jax.yoro import init_trainable

    model = tiny_random_model(seed=3, num_layers=4)
    root = tmp_path_factory.mktemp("eval")
    fingerprint = write_model_dir(
        root / "model", model.config, model.params, model.tokenizer.save_pretrained, "tiny-random"
    )
    trainable = init_trainable(YCFG, model.config, jax.random.key(1))
    trainable = jax.tree.map(
        lambda a: a + 0.02 * jax.random.normal(jax.random.key(2), a.shape), trainable
    )
    save_yoro(root / "nets", YCFG, trainable, root / "model", fingerprint)
    return model, trainable, root
