"""Full model vs YORO on the same lm-eval tasks, through the same backend.

    python -m yoro_jax.eval.compare --yoro runs/smollm2-cpu [--tasks yoro_offline] \
        [--limit N] [--batch-size 8] [--out results.md]

Runs ``mode=full`` and ``mode=yoro`` (the base model recorded in the YORO nets, or
``--model``) and prints a markdown table of every metric, with wall time and decoder
layers run per generated token.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from yoro_jax.eval import TASKS_DIR, enable_compilation_cache
from yoro_jax.report import markdown_table


def evaluate(model_args: dict[str, Any], tasks: list[str], limit: int | None) -> tuple[dict, float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from yoro_jax.eval.lm import YoroJaxLM

    lm = YoroJaxLM(**model_args)
    start = time.perf_counter()
    out = simple_evaluate(
        model=lm, tasks=tasks, limit=limit, task_manager=TaskManager(include_path=str(TASKS_DIR))
    )
    out["layers_per_token"] = lm.layers_per_token
    return out, time.perf_counter() - start


def comparison_table(full: dict, yoro: dict) -> str:
    rows = []
    for task in sorted(full["results"]):
        for key, value in full["results"][task].items():
            if "," not in key or "stderr" in key or not isinstance(value, (int, float)):
                continue
            other = yoro["results"].get(task, {}).get(key)
            metric = key.split(",")[0]
            rows.append(
                [
                    task,
                    metric,
                    f"{value:.4f}",
                    f"{other:.4f}" if isinstance(other, (int, float)) else "-",
                ]
            )
    rows.append(
        [
            "(generation)",
            "decoder layers per generated token",
            str(full["layers_per_token"]),
            str(yoro["layers_per_token"]),
        ]
    )
    return markdown_table(["task", "metric", "full", "YORO"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yoro", required=True, help="trained YORO nets or a training run dir")
    parser.add_argument("--model", default=None, help="base model dir (default: the nets' base)")
    parser.add_argument("--tasks", nargs="+", default=["yoro_mc", "yoro_qa", "yoro_text"])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)

    enable_compilation_cache()
    common = {"model": args.model, "yoro": args.yoro, "batch_size": args.batch_size}
    try:
        full, full_s = evaluate(common | {"mode": "full"}, args.tasks, args.limit)
        yoro, yoro_s = evaluate(common | {"mode": "yoro"}, args.tasks, args.limit)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = comparison_table(full, yoro)
    table += f"\n\nwall time: full {full_s:.1f} s, YORO {yoro_s:.1f} s (incl. compilation)\n"
    print(table)
    if args.out:
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
