"""lm-eval wall time: the ``yoro-jax`` backend (mode=full) vs lm-eval's ``hf`` backend.

    python -m benchmarks.lm_eval_speed [--tasks offline_hellaswag offline_arc_easy] \
        [--limit 200] [--batch-size 8]

Same machine, same run, same tasks, same tokenizer, both float32 on CPU (needs the test
extra for torch). Each task is evaluated by ``hf``, then by ``yoro-jax`` twice: *cold*
is the first use in this process with no on-disk XLA cache (every bucketed shape is
compiled; the compile seconds are shown apart), *warm* reuses the compiled programs
(what a long evaluation sees after its first batches, or a second process with the
CLI's on-disk cache). Also prints the largest per-request log-likelihood difference and
both metrics: the parity check on real tasks. The last line is machine-readable:
total ``hf`` seconds over total ``yoro-jax`` seconds, cold and warm.
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import numpy as np

from benchmarks.common import default_model_dir, markdown_table
from yoro_jax.convert.smollm2 import fetch_smollm2_gguf
from yoro_jax.eval import task_manager
from yoro_jax.eval.compare import compile_seconds

METRICS = {"yoro_qa": "exact_match,strip", "yoro_text": "bits_per_byte,none"}
DEFAULT_TASKS = ["offline_hellaswag", "offline_arc_easy"]


def _logliks(resps: Any) -> list[float]:
    if isinstance(resps, (list, tuple)):
        return [x for r in resps for x in _logliks(r)]
    return [] if isinstance(resps, (bool, str)) else [float(resps)]


def timed_eval(lm: Any, task: str, limit: int | None, manager: Any) -> tuple[float, float, dict]:
    """(wall s, of which XLA compile s, lm-eval's output)."""
    from lm_eval import simple_evaluate

    compiled, start = compile_seconds(), time.perf_counter()
    out = simple_evaluate(
        model=lm, tasks=[task], task_manager=manager, log_samples=True, limit=limit
    )
    return time.perf_counter() - start, compile_seconds() - compiled, out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=200, help="documents per task (0: all)")
    args = parser.parse_args(argv)

    import torch
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from yoro_jax.eval.lm import YoroJaxLM

    model_dir, gguf = default_model_dir(), fetch_smollm2_gguf()
    ours = YoroJaxLM(model=str(model_dir), batch_size=args.batch_size)
    hf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    hf = HFLM(pretrained=hf_model, tokenizer=ours.tokenizer, batch_size=args.batch_size)

    manager, limit = task_manager(args.tasks), args.limit or None
    rows, totals = [], np.zeros(3)
    for task in args.tasks:
        hf_s, _, hf_out = timed_eval(hf, task, limit, manager)
        cold_s, cold_compile_s, _ = timed_eval(ours, task, limit, manager)
        warm_s, warm_compile_s, our_out = timed_eval(ours, task, limit, manager)
        totals += (hf_s, cold_s, warm_s)
        metric = METRICS.get(task, "acc,none")
        ref_samples, our_samples = hf_out["samples"][task], our_out["samples"][task]
        diffs = [
            np.abs(np.subtract(_logliks(a["resps"]), _logliks(b["resps"]))).max()
            for a, b in zip(ref_samples, our_samples, strict=True)
            if _logliks(a["resps"])
        ]
        same_text = all(
            a["resps"] == b["resps"] for a, b in zip(ref_samples, our_samples, strict=True)
        )
        rows.append(
            [
                task,
                len(ref_samples),
                f"{hf_s:.1f}",
                f"{cold_s:.1f} ({cold_compile_s:.1f})",
                f"{warm_s:.1f} ({warm_compile_s:.1f})",
                f"{hf_s / cold_s:.2f}x",
                f"{hf_s / warm_s:.2f}x",
                f"{hf_out['results'][task].get(metric, float('nan')):.4f} / "
                f"{our_out['results'][task].get(metric, float('nan')):.4f}",
                f"{max(diffs):.1e}" if diffs else ("identical" if same_text else "DIFFERENT"),
            ]
        )
    cpu = platform.processor() or platform.machine()
    print(
        f"\nlm-eval wall time, SmolLM2-135M float32, batch {args.batch_size}, {cpu}, "
        f"torch threads {torch.get_num_threads()}\n"
    )
    print(
        markdown_table(
            [
                "task",
                "docs",
                "hf s",
                "yoro-jax cold s (compile s)",
                "yoro-jax warm s (compile s)",
                "speedup cold",
                "speedup warm",
                "metric hf / ours",
                "max |Δ loglik| or texts",
            ],
            rows,
        )
    )
    hf_total, cold_total, warm_total = totals
    print(
        f"\nresult: cold_vs_hf={hf_total / cold_total:.2f} warm_vs_hf={hf_total / warm_total:.2f}"
    )


if __name__ == "__main__":
    main()
