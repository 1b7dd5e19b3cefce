"""Distillation training (docs/DESIGN.md §4): grain loader -> jitted optax step -> orbax.

Run directory layout::

    RUN/config.yaml        the resolved config (a resumed run must match it)
    RUN/base/              the base model (tiny-random only; others are referenced)
    RUN/teacher/           offline teacher shards (ArrayRecord) + manifest
    RUN/checkpoints/N/     orbax: train state (trainable, optimizer, step, rng) + loader state
    RUN/best/              YORO nets with the best validation KL so far
    RUN/export/            final YORO nets (load with ``--yoro RUN/export``)
    RUN/metrics.jsonl      every logged scalar; RUN/tb/ the same for TensorBoard
    RUN/samples.jsonl      sample generations, full model vs YORO, at each validation
    RUN/loss.png           loss curve, written at the end
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from train import data as data_lib
from train.config import RunConfig
from train.interrupts import SIGTERM_ENV, Preempted, stop_requests
from train.metrics import MetricsLog, heldout_metrics, plot_losses, to_device
from train.prepare import Prepared, compute_dtype, initial_trainable, prepare_run
from train.routing import temperature_at
from train.step import loss_options, lr_schedule, make_optimizer, train_step
from yoro_jax.checkpoint import (
    CheckpointError,
    listed_layout,
    save_yoro,
)
from yoro_jax.config import ConfigError
from yoro_jax.decoders import YoroDecoder
from yoro_jax.generate import LlamaDecoder, generate_tokens, special_ids
from yoro_jax.llama import Params
from yoro_jax.sharding import (
    gather_to_host,
    is_primary,
    make_mesh,
    shard_params,
    sync_processes,
)
from yoro_jax.yoro import Yoro

# Test hook: SIGKILL this process right after the given optimizer step (simulates a crash).
KILL_ENV = "YORO_JAX_KILL_AFTER_STEP"


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf; the offending update was not applied."""


# ------------------------------------------------------------------------- the loop
class Trainer:
    """Owns the run: state, loader, checkpoints, metrics. ``run()`` trains to the end."""

    def __init__(self, prepared: Prepared):
        import grain

        cfg, base = prepared.cfg, prepared.base
        self.cfg, self.base = cfg, base
        self.run_dir = Path(cfg.run_dir)
        self.model = Yoro(base.config, cfg.yoro, compute_dtype(cfg), remat=cfg.train.remat)
        self.mesh = make_mesh(cfg.mesh)  # None on one device
        frozen = jax.tree.map(lambda a: a.astype(self.model.dtype), base.params)
        self.frozen = shard_params(frozen, self.mesh)
        _, self.pad_id = special_ids(base.config, base.tokenizer)

        records = data_lib.TeacherRecords(prepared.shards["train"])
        if len(records) < cfg.train.batch_size:
            raise ConfigError(
                f"train.batch_size ({cfg.train.batch_size}) exceeds the {len(records)} training "
                "examples"
            )
        collate = partial(
            data_lib.collate,
            pad_id=self.pad_id,
            top_k=cfg.teacher.top_k,
            features=cfg.teacher.features,
        )
        # Multi-host too, every process reads and pads the whole global batch (cheap next to
        # the step), so all pick the same bucketed shapes, and places only its own rows.
        dataset = (
            grain.MapDataset.source(records).shuffle(seed=cfg.train.seed).repeat(cfg.train.epochs)
        )
        self.dataset = dataset.batch(cfg.train.batch_size, drop_remainder=True, batch_fn=collate)
        micro_steps = len(self.dataset)
        self.total_steps = micro_steps // cfg.optim.grad_accum
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        if self.total_steps < 1:
            raise ConfigError("the data gives no full optimizer step; lower train.batch_size")
        self.steps_per_epoch = micro_steps / cfg.train.epochs / cfg.optim.grad_accum
        self.routed = self.model.router is not None
        self.tx = make_optimizer(cfg, self.total_steps)
        self.schedule = lr_schedule(cfg, self.total_steps)  # for logging the learning rate
        self.loss_opts = loss_options(cfg.loss)
        val = data_lib.TeacherRecords(prepared.shards["val"]) if prepared.shards["val"] else []
        self.val_examples = [val[i] for i in range(len(val))]
        self._full_answers = None  # the teacher's sample answers never change: made once

    # ------------------------------------------------------------------ state
    def init_state(self) -> dict[str, Any]:
        _, rng = jax.random.split(jax.random.key(self.cfg.train.seed))
        trainable = initial_trainable(self.cfg, self.base)
        state = {
            "trainable": trainable,
            "opt_state": self.tx.init(trainable),
            "step": jnp.int32(0),
            "tokens_seen": jnp.int32(0),
            "rng": jax.random.key_data(rng),
        }
        if self.routed:  # REINFORCE's moving-average reward baseline
            state["baseline"] = jnp.float32(0)
        return shard_params(state, self.mesh)

    def checkpoint_manager(self):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(max_to_keep=self.cfg.checkpoint.keep, create=True)
        return ocp.CheckpointManager((self.run_dir / "checkpoints").absolute(), options=options)

    def restore(self, manager, state, iterator) -> tuple[dict[str, Any], int]:
        """Resume from the newest checkpoint that restores and verifies (finite values);
        newer ones that do not are reported and set aside in ``RUN/checkpoints.damaged``
        (never deleted). If none restores, the run was written with another config or
        yoro-jax version (or every checkpoint is damaged): a clear error."""
        import orbax.checkpoint as ocp

        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            return state, 0
        # the abstract state carries this run's shardings: a checkpoint written on another
        # mesh (or one device) is re-sharded onto this one as it is read
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        failures = []
        for step in steps:
            try:
                restored = self._read_checkpoint(manager, step, abstract)
            except Exception as err:  # noqa: BLE001 (any failure: try the one before)
                failures.append((step, err))
                continue
            for bad_step, err in failures:  # newer than a good one: damaged
                self._set_aside(manager, bad_step, err)
            iterator.set_state(restored["loader"])
            print(f"resumed {self.run_dir} from step {step}", file=sys.stderr)
            restored_state = restored["state"]
            return (jax.device_put(restored_state) if self.mesh is None else restored_state), step
        listed = "; ".join(f"step {s}: {_first_line(e)}" for s, e in failures)
        raise CheckpointError(
            f"{self.run_dir}: no checkpoint restores ({listed}); they were written with "
            "another config or yoro-jax version, or are damaged — use a new run directory "
            "(or --restart)"
        )

    def _read_checkpoint(self, manager, step: int, abstract) -> dict[str, Any]:
        import orbax.checkpoint as ocp

        def read(target):
            return manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), loader=ocp.args.JsonRestore()
                ),
            )

        try:
            restored = read(abstract)
        except (ValueError, KeyError, TypeError) as err:
            # a run saved before layers were stacked holds its compensation layers (and
            # their optimizer moments) as lists: read them so, then stack
            old, restack = listed_layout(abstract, "compensation")
            try:
                restored = read(old)
            except (ValueError, KeyError, TypeError):
                raise err from None
            restored["state"] = restack(restored["state"])
        floats = [
            leaf
            for leaf in jax.tree.leaves(restored["state"])
            if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)
        ]
        if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in floats):
            raise CheckpointError(f"checkpoint {step} holds non-finite values")
        return restored

    def _set_aside(self, manager, step: int, err: Exception) -> None:
        """Move a damaged checkpoint out of the manager's directory, with a warning."""
        source = self.run_dir / "checkpoints" / str(step)
        aside = self.run_dir / "checkpoints.damaged" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if is_primary():  # one process moves it (a shared run dir)
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(aside))
        manager.reload()
        print(
            f"warning: checkpoint {source} does not restore ({_first_line(err)}); moved it to "
            f"{aside} and resumed from an earlier one",
            file=sys.stderr,
        )

    def save(self, manager, step: int, state, iterator) -> None:
        import orbax.checkpoint as ocp

        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(iterator.get_state())
            ),
            force=True,
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, trainable: Params) -> dict[str, float]:
        """KL to the teacher (T=1), top-1 agreement, teacher-token CE on held-out prompts."""
        return heldout_metrics(
            self.model,
            self.frozen,
            trainable,
            self.val_examples,
            self.cfg.train.batch_size,
            self.pad_id,
            self.cfg.teacher.top_k,
            self.cfg.loss.logits_chunk,
        )

    def samples(self, trainable: Params, step: int) -> list[dict[str, str]]:
        tok = self.base.tokenizer
        system = self.cfg.data.system_prompt
        prompts = [
            data_lib.encode(tok, [{"role": "user", "content": p}], system)
            for p in self.cfg.eval.sample_prompts
        ]
        if not prompts:
            return []
        eos, pad = special_ids(self.base.config, tok)
        opts = {
            "max_new_tokens": self.cfg.eval.sample_max_new_tokens,
            "eos_ids": eos,
            "pad_id": pad,
            "tokenizer": tok,
            "mesh": self.mesh,
        }
        if self._full_answers is None:
            full = LlamaDecoder(self.base.config, self.model.dtype)
            self._full_answers = generate_tokens(full, self.frozen, prompts, **opts)
        yoro = generate_tokens(YoroDecoder(self.model), (self.frozen, trainable), prompts, **opts)
        rows = [
            {"step": step, "prompt": p, "full": f.text, "yoro": y.text}
            for p, f, y in zip(self.cfg.eval.sample_prompts, self._full_answers, yoro, strict=True)
        ]
        if is_primary():
            with (self.run_dir / "samples.jsonl").open("a") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        return rows

    def validate(
        self, trainable: Params, step: int, log: MetricsLog, best: dict, tokens_seen: int = 0
    ) -> None:
        metrics = self.evaluate(trainable)
        if not metrics:
            return
        scalars = {k: v for k, v in metrics.items() if k != "layer_skip_rate"}
        for index, rate in enumerate(metrics.get("layer_skip_rate", [])):
            scalars[f"skip_rate/layer_{index:02d}"] = rate
        log.write(step, "val", scalars | {"tokens_seen": tokens_seen})
        rows = self.samples(trainable, step)
        routed = (
            f"  reasoning layers {metrics['reasoning_layers']:.2f}"
            if "reasoning_layers" in metrics
            else ""
        )
        tqdm.write(f"step {step}: val KL {metrics['kl']:.4f}  top-1 {metrics['top1']:.3f}{routed}")
        for row in rows[:2]:
            tqdm.write(f"  [full] {row['full']!r}\n  [yoro] {row['yoro']!r}")
        if metrics["kl"] < best.get("kl", math.inf):
            best.update(metrics, step=step)
            self.export(self.run_dir / "best", trainable, extra={"val": best})

    def export(self, out: Path, trainable: Params, extra: dict | None = None) -> None:
        trainable = gather_to_host(trainable)  # multi-host: every process joins the gather
        if is_primary():
            save_yoro(
                out, self.cfg.yoro, trainable, self.base.path, self.base.fingerprint, overwrite=True
            )
            if extra:
                (out / "metrics.json").write_text(json.dumps(extra, indent=2) + "\n")
        sync_processes(f"exported {out.name}")

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        cfg, accum = self.cfg, self.cfg.optim.grad_accum
        iterator = self.dataset.to_iter_dataset().__iter__()
        manager = self.checkpoint_manager()
        state, start_step = self.restore(manager, self.init_state(), iterator)
        log = MetricsLog(self.run_dir)
        log.rewind(start_step)  # rows logged after the checkpoint would appear twice
        best_path = self.run_dir / "best" / "metrics.json"
        best = json.loads(best_path.read_text())["val"] if best_path.is_file() else {}
        kill_after = int(os.environ.get(KILL_ENV, "0"))
        term_after = int(os.environ.get(SIGTERM_ENV, "0"))
        if start_step == 0:
            teacher = self.run_dir / "teacher" / "throughput.json"
            if teacher.is_file():  # how fast this run's teacher data was made
                log.write(0, "teacher", json.loads(teacher.read_text()))
            self.validate(state["trainable"], 0, log, best)

        progress = tqdm(total=self.total_steps, initial=start_step, desc="train", unit="step")
        window = {"loss": 0.0, "kl": 0.0, "tokens": 0, "n": 0, "time": time.perf_counter()}
        router_window: dict[str, float] = {}
        router_opts = cfg.router_train if self.routed else None
        step = start_step
        handlers = ExitStack()
        try:
            stops = handlers.enter_context(stop_requests())
            for step in range(start_step + 1, self.total_steps + 1):
                temperature = temperature_at(cfg.router_train, step, self.steps_per_epoch)
                for micro in range(accum):
                    batch = next(iterator)
                    arrays, prompt_len = to_device(batch, self.mesh)
                    new_state, m = train_step(
                        self.model,
                        self.frozen,
                        state,
                        arrays,
                        tx=self.tx,
                        prompt_len=prompt_len,
                        loss_opts=self.loss_opts,
                        router_opts=router_opts,
                        temperature=jnp.float32(temperature),
                    )
                    loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        raise NonFiniteLoss(
                            f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at "
                            f"optimizer step {step}, micro-batch {micro} (loader position "
                            f"{iterator.get_state()}); the update was not applied and the last "
                            "checkpoint is intact"
                        )
                    state = new_state
                    count = max(float(m["count"]), 1.0)
                    window["loss"] += loss
                    window["kl"] += float(m["kl"]) / count
                    if "hidden" in m:
                        window["hidden"] = window.get("hidden", 0.0) + float(m["hidden"]) / count
                    window["tokens"] += int(batch["valid"].sum())
                    window["n"] += 1
                    for key in ("active_layers", "skip_rate", "gate_entropy", "reward"):
                        if key in m:
                            router_window[key] = router_window.get(key, 0.0) + float(m[key])
                progress.update(1)
                if step % cfg.train.log_every == 0 or step == self.total_steps:
                    elapsed = time.perf_counter() - window["time"]
                    scalars = {
                        "loss": window["loss"] / window["n"],
                        "kl": window["kl"] / window["n"],
                        "grad_norm": grad_norm,
                        "lr": float(self.schedule(step)),
                        "tokens_per_s": window["tokens"] / max(elapsed, 1e-9),
                    }
                    if "hidden" in window:
                        scalars["hidden"] = window["hidden"] / window["n"]
                    if self.routed:
                        scalars |= {k: v / window["n"] for k, v in router_window.items()}
                        scalars |= {
                            "temperature": temperature,
                            "baseline": float(state["baseline"]),
                        }
                        router_window = {}
                    log.write(step, "train", scalars)
                    progress.set_postfix(
                        loss=f"{scalars['loss']:.4f}", tok_s=f"{scalars['tokens_per_s']:.0f}"
                    )
                    window = {
                        "loss": 0.0,
                        "kl": 0.0,
                        "tokens": 0,
                        "n": 0,
                        "time": time.perf_counter(),
                    }
                paused = time.perf_counter()  # validation and saving don't count as training
                if step % cfg.eval.every_steps == 0 and step != self.total_steps:
                    self.validate(state["trainable"], step, log, best, int(state["tokens_seen"]))
                if step % cfg.checkpoint.every_steps == 0 or step == self.total_steps:
                    self.save(manager, step, state, iterator)
                window["time"] += time.perf_counter() - paused
                if kill_after and step == kill_after:
                    manager.wait_until_finished()
                    os.kill(os.getpid(), signal.SIGKILL)
                if term_after and step == term_after:
                    os.kill(os.getpid(), signal.SIGTERM)
                if stops and step != self.total_steps:  # a scheduler wants the machine back
                    if step % cfg.checkpoint.every_steps:
                        self.save(manager, step, state, iterator)
                    manager.wait_until_finished()
                    raise Preempted(self.run_dir, step, stops[0])
            manager.wait_until_finished()
            if step == self.total_steps and start_step < self.total_steps:
                self.validate(state["trainable"], step, log, best, int(state["tokens_seen"]))
        finally:
            handlers.close()
            progress.close()
            manager.close()
            log.close()
        self.export(self.run_dir / "export", state["trainable"], extra={"best_val": best})
        if is_primary():
            plot_losses(self.run_dir)
        return {"step": step, "state": state, "best": best}


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def train(config: str | RunConfig | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Prepare (teacher data) and train; resumes automatically from RUN/checkpoints."""
    return Trainer(prepare_run(config, overrides)).run()
