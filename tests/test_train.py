"""Training: losses against naive references, masks, configs, teacher data, smoke run, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    QUIET_EVAL,
    ROOT,
    SHARED_DATA,
    SMOKE,
    assert_greedy_choices,
    reuse_teacher_data,
    smoke_config,
)

from train import data as data_lib
from train.config import load_config
from train.loss import dense_kl, sparse_kl
from train.prepare import prepare_run
from train.step import loss_sums
from train.teacher_data import generate_teacher_data
from train.trainer import NonFiniteLoss, Trainer
from yoro_jax import llama
from yoro_jax.checkpoint import CheckpointError, load_yoro
from yoro_jax.config import ConfigError
from yoro_jax.yoro import Yoro, YoroConfig, init_trainable


# ------------------------------------------------------------------------------ losses
def test_sparse_kl_equals_naive_reference():
    rng = np.random.RandomState(0)
    vocab, k, temperature = 50, 6, 3.0
    logits = rng.randn(2, 3, vocab).astype(np.float32) * 3
    teacher = rng.randn(2, 3, vocab).astype(np.float32) * 3
    teacher_logp = teacher - np.log(np.exp(teacher).sum(-1, keepdims=True))
    top_ids = np.argsort(-teacher_logp, axis=-1)[..., :k]
    top_logp = np.take_along_axis(teacher_logp, top_ids, -1)

    got = np.asarray(sparse_kl(jnp.asarray(logits), top_ids, top_logp, temperature))
    for b in range(2):
        for t in range(3):  # naive: dense target with zeros off the top-k, loop over ids
            scaled = np.exp(top_logp[b, t] / temperature)
            p = scaled / scaled.sum()
            log_q = logits[b, t] - np.log(np.exp(logits[b, t].astype(np.float64)).sum())
            want = sum(p[i] * (np.log(p[i]) - log_q[top_ids[b, t, i]]) for i in range(k))
            assert got[b, t] == pytest.approx(want, abs=1e-5)


def test_sparse_kl_with_full_vocabulary_equals_dense_kl():
    rng = np.random.RandomState(1)
    logits, teacher = rng.randn(4, 20).astype(np.float32), rng.randn(4, 20).astype(np.float32)
    logp = jax.nn.log_softmax(teacher)
    ids = jnp.argsort(-logp, axis=-1)
    sparse = sparse_kl(logits, ids, jnp.take_along_axis(logp, ids, -1), 1.0)
    np.testing.assert_allclose(sparse, dense_kl(logits, teacher, 1.0), atol=1e-5)
    assert float(dense_kl(teacher, teacher, 2.0).max()) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def tiny():
    from train.tiny import tiny_random_model

    base = tiny_random_model(seed=3)
    ycfg = YoroConfig(1, 1, 1, 1, 1)
    model = Yoro(base.config, ycfg)
    trainable = init_trainable(ycfg, base.config, jax.random.key(7))
    return base, model, trainable


def _examples(rng, vocab, k, shapes):
    out = []
    for prompt_len, resp_len in shapes:
        logp = np.log(rng.dirichlet(np.ones(vocab), size=resp_len)).astype(np.float32)
        ids = np.argsort(-logp, -1)[:, :k].astype(np.int32)
        out.append(
            {
                "prompt": rng.randint(3, vocab, prompt_len).astype(np.int32),
                "response": rng.randint(3, vocab, resp_len).astype(np.int32),
                "top_ids": ids,
                "top_logprobs": np.take_along_axis(logp, ids, -1),
            }
        )
    return out


@pytest.mark.parametrize("online", [False, True])
def test_batched_loss_equals_per_sequence_reference(tiny, online):
    """Padding and prompt positions contribute nothing: the padded batch's loss sums equal
    the sums over each sequence computed alone (no padding) from full YORO logits."""
    base, model, trainable = tiny
    rng = np.random.RandomState(0)
    examples = _examples(rng, base.config.vocab_size, 5, [(7, 9), (20, 3), (12, 16)])
    batch = data_lib.collate(examples, pad_id=0, top_k=5)
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if k != "prompt_len"}
    opts = {"online": online, "temperature": 2.0, "ce_weight": 0.5, "chunk": 8}
    got = loss_sums(model, base.params, trainable, arrays, batch["prompt_len"], **opts)
    forward = jax.jit(model.forward, static_argnums=4)
    teacher_forward = jax.jit(lambda t, v: llama.forward(base.config, base.params, t, v))

    kl = ce = 0.0
    for e in examples:
        p, r = len(e["prompt"]), len(e["response"])
        tokens = jnp.asarray(np.concatenate([e["prompt"], e["response"]]))[None]
        valid = jnp.ones_like(tokens, bool)
        logits = forward(base.params, trainable, tokens, valid, p)[0, p - 1 : p - 1 + r]
        if online:
            teacher = teacher_forward(tokens, valid)[0, p - 1 : p - 1 + r]
            kl += float(dense_kl(logits, teacher, 2.0).sum())
        else:
            kl += float(sparse_kl(logits, e["top_ids"], e["top_logprobs"], 2.0).sum())
        log_q = jax.nn.log_softmax(logits)
        ce -= float(jnp.take_along_axis(log_q, jnp.asarray(e["response"])[:, None], -1).sum())
    assert float(got["count"]) == sum(len(e["response"]) for e in examples)
    assert float(got["kl"]) == pytest.approx(kl, rel=1e-4)
    assert float(got["ce"]) == pytest.approx(ce, rel=1e-4)


def test_garbage_in_masked_slots_does_not_change_the_loss(tiny):
    base, model, trainable = tiny
    rng = np.random.RandomState(1)
    batch = data_lib.collate(_examples(rng, base.config.vocab_size, 4, [(5, 3), (9, 11)]), 0, 4)
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if k != "prompt_len"}
    opts = {"online": False, "temperature": 3.0, "ce_weight": 1.0, "chunk": 16}
    ref = loss_sums(model, base.params, trainable, arrays, batch["prompt_len"], **opts)
    masked = ~batch["target_mask"]
    noisy = dict(arrays)
    noisy["top_logprobs"] = jnp.where(masked[..., None], 50.0, arrays["top_logprobs"])
    noisy["top_ids"] = jnp.where(masked[..., None], 7, arrays["top_ids"])
    noisy["targets"] = jnp.where(masked, 9, arrays["targets"])
    noisy["tokens"] = jnp.where(batch["valid"], arrays["tokens"], 11)  # padding tokens
    out = loss_sums(model, base.params, trainable, noisy, batch["prompt_len"], **opts)
    for key in ("kl", "ce", "count"):
        assert float(out[key]) == pytest.approx(float(ref[key]), rel=1e-6)


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1"], "unknown key optim.lrr; allowed keys here: b1, b2, clip_norm"),
        (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
        (["train.batch_size=0"], "train.batch_size: must be > 0, got 0"),
        (["train.batch_size=2.5"], "train.batch_size: expected int, got 2.5"),
        (["loss.mode=magic"], "loss.mode: 'magic' is not one of offline, online"),
        (["data.prompts.0.format=csv"], "data.prompts.0.format: 'csv' is not one of"),
        (["model=3"], "model: expected a mapping, got 3"),
        (["optim.lr"], "expected path.to.field=value"),
        (["yoro.embedding_layers=-1"], "yoro.embedding_layers must be an integer >= 0"),
        (["optim.lr=.nan"], "optim.lr: must be a finite number, got nan"),
        (["loss.soft_temperature=.inf"], "loss.soft_temperature: must be a finite number"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(SMOKE, overrides)


def test_yaml_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {batch_size: 8\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="--set optim.lr: the value .* is not valid YAML"):
        load_config(SMOKE, ["optim.lr=[1"])
    with pytest.raises(ConfigError, match="optim.lr is a value .* not a section"):
        load_config(SMOKE, ["optim.lr.x=1"])


def test_missing_config_file_and_cli_exit_code(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "train", "--config", str(SMOKE), "--set", "optim.clip_norm=-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "error: optim.clip_norm: must be >= 0, got -1" in result.stderr


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.run_dir.startswith("runs/"), path


def test_split_that_leaves_no_reasoning_layer_is_rejected(tmp_path):
    cfg = smoke_config(tmp_path / "run", "yoro.embedding_layers=3", "yoro.coherence_layers=3")
    with pytest.raises(ConfigError, match="leaves no reasoning layer"):
        prepare_run(cfg)
    # the failed run did not claim the dir: a corrected config is not refused as "different"
    assert not (tmp_path / "run" / "config.yaml").exists()
    from train.prepare import _check_resumable

    _check_resumable(smoke_config(tmp_path / "run"), tmp_path / "run")


def test_a_run_dir_is_locked_while_a_process_trains_in_it(tmp_path):
    """A second trainer on a run dir is refused, naming the holder; the lock dies with
    its process (no stale lock)."""
    from train.__main__ import main as train_main
    from train.lock import RunDirLocked, lock_run_dir

    run_dir = tmp_path / "run"
    code = "import sys, time; from train.lock import lock_run_dir; lock_run_dir(sys.argv[1]); "
    code += "print('locked', flush=True); time.sleep(120)"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"in use by pid {holder.pid} on "):
            lock_run_dir(run_dir)
        assert train_main(["--config", str(SMOKE), "--set", f"run_dir={run_dir}"]) == 2
    finally:
        holder.kill()
        holder.wait()
    lock_run_dir(run_dir)  # the dead holder left nothing behind
    assert f"pid {os.getpid()} on " in (run_dir / ".lock").read_text()


# --------------------------------------------------------------------------- prompt data
@pytest.mark.parametrize(
    "fmt, record, want",
    [
        ("alpaca-gpt4", {"instruction": "Sum", "input": "1 2", "output": "3"}, "Sum\n\n1 2"),
        ("generic", {"instruction": "Hi", "input": ""}, "Hi"),
        ("dolly-15k", {"instruction": "Q?", "context": "ctx", "response": "A"}, "Q?\n\nctx"),
        (
            "self-instruct",
            {"instruction": "Do", "instances": [{"input": "x", "output": "y"}]},
            "Do\n\nx",
        ),
        (
            "wizardlm",
            {"conversations": [{"from": "human", "value": "Why?"}, {"from": "gpt", "value": "."}]},
            "Why?",
        ),
        (
            "openhermes",
            {
                "conversations": [
                    {"from": "system", "value": "Be brief"},
                    {"from": "human", "value": "Go"},
                ]
            },
            "Go",
        ),
        ("slimorca", {"conversations": [{"from": "gpt", "value": "x"}]}, None),
    ],
)
def test_dataset_field_mappings(fmt, record, want):
    messages = data_lib.record_to_messages(record, fmt)
    if want is None:
        assert messages is None
    else:
        assert messages[-1] == {"role": "user", "content": want}
    if fmt == "openhermes":
        assert messages[0] == {"role": "system", "content": "Be brief"}


def test_local_prompt_file_and_truncation_report(tmp_path, capsys):
    from train.config import DataSection, PromptSource
    from train.tiny import byte_tokenizer

    path = SHARED_DATA / "self_instruct_user_oriented.jsonl"
    if not path.is_file():  # the shared data is absent on a user's machine: write a file
        path = tmp_path / "prompts.jsonl"
        rows = [
            {"instruction": f"Task {i} " * (i + 1), "instances": [{"input": ""}]} for i in range(30)
        ]
        path.write_text("\n".join(json.dumps(r) for r in rows))
    section = DataSection(
        prompts=[PromptSource(str(path), "self-instruct", limit=25)], max_prompt_tokens=64
    )
    tokenizer = byte_tokenizer()
    prompts = data_lib.load_prompts(section, tokenizer)
    assert len(prompts) == 25 and max(map(len, prompts)) == 64
    assert "exceed max_prompt_tokens=64" in capsys.readouterr().err
    longest = tokenizer.decode(max(prompts, key=len))
    assert longest.startswith("<|im_start|>user\n")  # the template survives the cut
    assert longest.endswith("<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ConfigError, match="expected a .json, .jsonl or .parquet"):
        data_lib.load_source(PromptSource(str(SMOKE), "generic"))


# --------------------------------------------------------------------------- teacher data
def test_teacher_records_match_the_full_model(smoke_run):
    run_dir, _ = smoke_run
    prep = prepare_run(smoke_config(run_dir))
    records = data_lib.TeacherRecords(prep.shards["val"])
    base = prep.base
    for index in range(3):
        e = records[index]
        tokens = jnp.asarray(np.concatenate([e["prompt"], e["response"]]))[None]
        logp = jax.nn.log_softmax(
            llama.forward(base.config, base.params, tokens, jnp.ones_like(tokens, bool))[0]
        )[len(e["prompt"]) - 1 : -1]
        assert_greedy_choices(logp, e["response"])  # greedy (eager vs cached decode)
        top = np.take_along_axis(np.asarray(logp), e["top_ids"], -1)
        np.testing.assert_allclose(top, e["top_logprobs"], atol=1e-4)
        np.testing.assert_array_equal(e["top_ids"][:, 0], e["response"])


def test_teacher_generation_resumes_and_refuses_other_settings(smoke_run):
    run_dir, _ = smoke_run
    prep = prepare_run(smoke_config(run_dir))
    shard = prep.shards["train"][1]
    before = shard.read_bytes()
    shard.unlink()  # as if interrupted before this shard was finished
    prepare_run(smoke_config(run_dir))
    assert shard.read_bytes() == before
    with pytest.raises(ConfigError, match="different teacher settings"):
        prepare_run(smoke_config(run_dir, "teacher.top_k=4"))


# ------------------------------------------------------------------------- training runs
def test_smoke_training_lowers_heldout_kl(smoke_run):
    run_dir, result = smoke_run
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert val[0]["step"] == 0 and val[-1]["step"] == result["step"] == 24
    assert val[-1]["kl"] < 0.5 * val[0]["kl"]
    assert val[-1]["top1"] > val[0]["top1"]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert all(r["tokens_per_s"] > 0 for r in train_rows)
    assert (run_dir / "loss.png").stat().st_size > 1000
    assert list((run_dir / "tb").iterdir())
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 24} and all("yoro" in s for s in samples)
    # the exported nets load against the run's base model and equal the final params
    ycfg, trainable, _ = load_yoro(run_dir / "export")
    assert ycfg == smoke_config(run_dir).yoro
    for a, b in zip(
        jax.tree.leaves(trainable), jax.tree.leaves(result["state"]["trainable"]), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert json.loads((run_dir / "best" / "metrics.json").read_text())["val"]["step"] == 24


def test_frozen_params_get_no_optimizer_state(smoke_run):
    run_dir, result = smoke_run
    state = result["state"]
    trainable_shapes = {leaf.shape for leaf in jax.tree.leaves(state["trainable"])}
    for leaf in jax.tree.leaves(state["opt_state"]):
        assert leaf.shape == () or leaf.shape in trainable_shapes
    n_opt = sum(leaf.size for leaf in jax.tree.leaves(state["opt_state"]) if leaf.shape != ())
    n_trainable = sum(leaf.size for leaf in jax.tree.leaves(state["trainable"]))
    assert n_opt == 2 * n_trainable  # Adam's two moments, of the trainable nets only


def test_resumed_run_with_other_loss_settings_is_refused(smoke_run):
    run_dir, _ = smoke_run
    with pytest.raises(ConfigError, match="different loss settings"):
        prepare_run(smoke_config(run_dir, "loss.soft_temperature=2.0"))


def test_non_finite_loss_stops_with_step_and_batch(tmp_path, smoke_run):
    run_dir = tmp_path / "run"
    reuse_teacher_data(smoke_run[0], run_dir)
    cfg = smoke_config(
        run_dir,
        "optim.lr=1.0e+30",
        "optim.warmup_steps=0",
        "optim.clip_norm=0",
        "checkpoint.every_steps=1",
        *QUIET_EVAL,
    )
    with pytest.raises(NonFiniteLoss, match=r"at optimizer step \d+, micro-batch 0") as err:
        Trainer(prepare_run(cfg)).run()
    bad_step = int(str(err.value).split("optimizer step ")[1].split(",")[0])
    assert bad_step > 1
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == bad_step - 1  # the checkpoints before the failure are intact


def test_generate_teacher_data_is_deterministic(tmp_path, tiny):
    base, _, _ = tiny
    cfg = smoke_config(tmp_path / "a", "teacher.shard_size=4", "teacher.max_new_tokens=5")
    prompts = {"train": [[5, 6, 7], [8, 9], [10] * 6, [11, 12, 13, 14], [15]], "val": [[16, 17]]}
    paths = generate_teacher_data(cfg, base, prompts)
    assert [len(p) for p in paths.values()] == [2, 1]
    records = data_lib.TeacherRecords(paths["train"])
    assert len(records) == 5
    assert [list(records[i]["prompt"]) for i in range(5)] == prompts["train"]


def test_generate_cli_finds_the_base_from_the_exported_nets(smoke_run, capsys):
    from yoro_jax.generate_cli import main

    run_dir, _ = smoke_run
    argv = [
        "--yoro",
        str(run_dir / "export"),
        "--compare",
        "--chat",
        "--prompt",
        "hi",
        "--max-new-tokens",
        "4",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "[full: 6 decoder layers per generated token]" in captured.err
    assert "[yoro: 3 decoder layers per generated token]" in captured.err
    assert main(["--prompt", "hi"]) == 2
    assert "give --model DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_keeping_the_logits_gives_the_recomputed_loss_and_gradients(tiny):
    """loss.remat_logits only trades memory for one head matmul: same loss, same grads."""
    base, model, trainable = tiny
    examples = _examples(np.random.RandomState(2), base.config.vocab_size, 5, [(7, 9), (12, 16)])
    batch = data_lib.collate(examples, pad_id=0, top_k=5)
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if k != "prompt_len"}

    def loss(t, remat):
        sums = loss_sums(
            model,
            base.params,
            t,
            arrays,
            batch["prompt_len"],
            online=False,
            temperature=1.0,
            ce_weight=0.5,
            chunk=8,
            remat_logits=remat,
        )
        return (sums["kl"] + 0.5 * sums["ce"]) / sums["count"]

    kept, kept_grads = jax.value_and_grad(loss)(trainable, False)
    remat, remat_grads = jax.value_and_grad(loss)(trainable, True)
    np.testing.assert_allclose(kept, remat, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(kept_grads), jax.tree.leaves(remat_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_metrics_log_rewinds_to_the_resumed_checkpoint(tmp_path):
    from train.metrics import MetricsLog, read_metrics

    log = MetricsLog(tmp_path)
    samples = tmp_path / "samples.jsonl"
    for step in (0, 1, 2, 3):
        log.write(step, "train", {"loss": float(step)})
        with samples.open("a") as f:
            f.write(json.dumps({"step": step, "prompt": "p", "full": "a", "yoro": "b"}) + "\n")
    log.rewind(2)  # resumed from the step-2 checkpoint: step 3 will be logged again
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert [json.loads(r)["step"] for r in samples.read_text().splitlines()] == [0, 1, 2]
    log.rewind(0)  # no checkpoint: the run starts over and logs step 0 again
    assert read_metrics(tmp_path) == [] and samples.read_text() == ""
    log.close()


def _damage(step_dir, how):
    state = step_dir / "state"
    if how == "truncated":  # the largest data file cut in half
        biggest = max((p for p in state.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    else:
        (state / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["truncated", "no metadata", "all damaged"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    smoke_run, tmp_path, capsys, how
):
    """Resume skips checkpoints that do not restore, reports them and moves them aside
    (not deleted); with none left, one clear error."""
    import shutil

    source, _ = smoke_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, ignore=shutil.ignore_patterns(".lock"))
    checkpoints = run_dir / "checkpoints"
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert len(steps) >= 2
    for step in steps if how == "all damaged" else steps[-1:]:
        _damage(checkpoints / str(step), "truncated" if how == "all damaged" else how)
    trainer = Trainer(prepare_run(smoke_config(run_dir)))
    manager = trainer.checkpoint_manager()
    iterator = trainer.dataset.to_iter_dataset().__iter__()
    if how == "all damaged":
        with pytest.raises(CheckpointError, match="no checkpoint restores .*step"):
            trainer.restore(manager, trainer.init_state(), iterator)
        return
    _, step = trainer.restore(manager, trainer.init_state(), iterator)
    assert step == steps[-2]
    assert f"checkpoint {checkpoints / str(steps[-1])} does not restore" in capsys.readouterr().err
    moved = [p.name.split("-")[0] for p in (run_dir / "checkpoints.damaged").iterdir()]
    assert moved == [str(steps[-1])] and manager.latest_step() == steps[-2]


def test_sigterm_saves_a_checkpoint_and_resume_is_bitwise_equal(smoke_run, tmp_path):
    """SIGTERM after step 3 (checkpoints every 2): the run saves step 3, says so and exits
    75; rerun, it resumes from step 3 and ends with the uninterrupted run's nets, bitwise."""
    from conftest import kill_then_resume

    from train.interrupts import PREEMPTED_EXIT, SIGTERM_ENV

    source, _ = smoke_run
    overrides = ["train.max_steps=5", "checkpoint.every_steps=2", "train.log_every=1", *QUIET_EVAL]
    reference, run_dir = kill_then_resume(
        source,
        tmp_path,
        overrides,
        kill_after=3,
        resumed_from=3,
        signal_env=SIGTERM_ENV,
        returncode=PREEMPTED_EXIT,
        stopped_says="SIGTERM: stopped after optimizer step 3 with a checkpoint",
    )
    _, trainable, _ = load_yoro(run_dir / "export")
    for a, b in zip(
        jax.tree.leaves(trainable), jax.tree.leaves(reference["state"]["trainable"]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("how", ["truncated", "bit flip"])
def test_a_damaged_teacher_shard_is_named(smoke_run, tmp_path, how):
    import shutil

    source, _ = smoke_run
    shard = sorted((source / "teacher").glob("train-*.array_record"))[0]
    damaged = tmp_path / shard.name
    shutil.copy(shard, damaged)
    data = bytearray(damaged.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{damaged.name}: teacher shard is damaged"):
        records = data_lib.TeacherRecords([damaged])
        for i in range(len(records)):
            records[i]


def test_teacher_records_decode_from_many_threads_at_once():
    """grain reads records in threads; numpy's header parsing is not thread-safe on CPython
    3.11 (python/cpython#106905). Finalizers running during the parse and a tiny switch
    interval make the race show within a second without the lock in ``deserialize``."""
    import sys
    import threading

    import ml_dtypes

    record = data_lib.serialize(
        {"ids": np.arange(10, dtype=np.int32), "h": np.zeros((4, 8), ml_dtypes.bfloat16)}
    )

    class Cyclic:
        def __del__(self):
            sum(range(50))  # Python code inside a GC pass: a chance to switch threads

    errors = []

    def decode_many():
        for _ in range(1500):
            try:
                out = data_lib.deserialize(record)
            except SystemError as err:
                errors.append(err)
                return
            assert out["h"].dtype == ml_dtypes.bfloat16
            for _ in range(5):
                a, b = Cyclic(), Cyclic()
                a.other, b.other = b, a

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=decode_many) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]


def test_an_interpreter_error_while_decoding_is_not_called_a_damaged_shard(smoke_run, monkeypatch):
    """Only errors about the bytes say 'delete the shard': deleting data for an interpreter
    fault would throw away good teacher answers."""
    source, _ = smoke_run
    shard = sorted((source / "teacher").glob("train-*.array_record"))[0]
    records = data_lib.TeacherRecords([shard])

    def fail(_):
        raise SystemError("AST constructor recursion depth mismatch (before=66, after=63)")

    monkeypatch.setattr(data_lib, "deserialize", fail)
    with pytest.raises(SystemError, match="recursion depth mismatch"):
        records[0]
