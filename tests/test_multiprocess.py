"""The multi-host path for real: two ``python -m train`` processes on this machine
(``jax.distributed`` over localhost, CPU collectives), one device each, a data-parallel
mesh across them — train, checkpoint, lose the last checkpoint, resume — against one
process on one device."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from yoro_jax.checkpoint import load_yoro

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    "train.max_steps=6",
    "checkpoint.every_steps=2",
    "checkpoint.keep=3",
    "eval.every_steps=1000",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train(run_dir: Path, processes: int) -> list[subprocess.CompletedProcess]:
    env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    sets = [f"run_dir={run_dir}", *SETTINGS]
    if processes > 1:
        sets.append(f"mesh.data={processes}")
    command = [sys.executable, "-m", "train", "--config", str(ROOT / "configs" / "smoke.yaml")]
    command += [arg for kv in sets for arg in ("--set", kv)]
    if processes > 1:
        port = _free_port()
        command += ["--coordinator", f"localhost:{port}", "--num-processes", str(processes)]
    running = [
        subprocess.Popen(
            [*command, *(["--process-id", str(i)] if processes > 1 else [])],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    done = []
    for i, proc in enumerate(running):
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        assert proc.returncode == 0, f"process {i}:\n{err[-3000:]}"
    return done


def _nets(run_dir: Path) -> dict:
    _, trainable, _ = load_yoro(run_dir / "export")
    return trainable


def test_two_processes_train_checkpoint_and_resume_like_one(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    first = _train(multi, 2)
    assert "done: 6 optimizer steps" in first[0].stdout
    shutil.rmtree(multi / "checkpoints" / "6")  # as if both were killed after step 4's save
    shutil.rmtree(multi / "export")
    resumed = _train(multi, 2)
    assert all("done: 6 optimizer steps" in r.stdout for r in resumed)
    _train(single, 1)

    got, want = _nets(multi), _nets(single)
    diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), got, want)
    assert max(jax.tree.leaves(diffs)) < 1e-5, diffs
    # one writer for the run's files: every row once, as in the one-process run
    rows = [json.loads(x) for x in (multi / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(r["step"], r["split"]) for r in reference]
    for name in ("samples.jsonl",):
        lines = (multi / name).read_text().splitlines()
        assert len(lines) == len((single / name).read_text().splitlines()) > 0
