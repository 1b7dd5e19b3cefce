"""Full model vs YORO vs speculative decoding on the same lm-eval tasks, one backend, one table.

    python -m yoro_jax.eval.compare --yoro runs/smollm2-cpu [--tasks offline_core] \
        [--modes full yoro speculative] [--limit N] [--batch-size 8] [--out DIR]

Each mode is evaluated in turn (``mode=full`` on the base model the nets record, or
``--model``). The table has every metric, YORO's share of the full model's score, the
wall time with its XLA compile time reported apart, decoder layers per generated token,
and a measured decode speed-up (greedy generation of ``--speed-tokens`` tokens on a few
fixed prompts, the layers held unscanned as the generate CLI holds them). With ``--out``
the table, the raw results and a plot of accuracy against decode speed-up are written.
Speculative decoding's log-likelihoods are the full model's (its output is), so on
log-likelihood tasks it scores as the full model by construction; its row shows the speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from yoro_jax.eval import enable_compilation_cache, task_manager
from yoro_jax.report import markdown_table

MODES = ("full", "yoro", "speculative")
RETAINED = ("acc", "acc_norm", "exact_match")  # higher-is-better scores shown as a share
SPEED_PROMPTS = (
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give three tips for learning a new language.",
)

_compile_seconds = [0.0]
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)


def _on_duration(event: str, seconds: float, **_: Any) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += seconds


def compile_seconds() -> float:
    """Seconds spent tracing, lowering and compiling XLA programs in this process so far
    (a program loaded from the on-disk cache counts only its lookup)."""
    import jax

    if not getattr(compile_seconds, "registered", False):
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        compile_seconds.registered = True  # type: ignore[attr-defined]
    return _compile_seconds[0]


def evaluate(model_args: dict[str, Any], tasks: list[str], limit: int | None) -> dict:
    """One mode through lm-eval; adds wall and compile seconds and layers per token."""
    from lm_eval import simple_evaluate

    from yoro_jax.eval.lm import YoroJaxLM

    compile_before = compile_seconds()
    start = time.perf_counter()
    lm = YoroJaxLM(**model_args)
    out = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=task_manager(tasks))
    out["wall_s"] = time.perf_counter() - start
    out["compile_s"] = compile_seconds() - compile_before
    out["layers_per_token"] = lm.layers_per_token
    out["lm"] = lm
    return out


def decode_speed(lm: Any, new_tokens: int) -> float:
    """Greedy tokens per second, batch 1, over :data:`SPEED_PROMPTS` (after a warm-up),
    with the layers unscanned as the generate CLI decodes."""
    from yoro_jax.generate import encode_prompt, generate_tokens
    from yoro_jax.models import make_decoders

    k = getattr(lm.decoder, "k", None)
    decoders = make_decoders(lm.base, lm.nets, compare=True, unscan=True, speculative=k)
    decoder, params, _ = decoders[lm.mode]
    prompts = [encode_prompt(lm.tokenizer, p, chat=True) for p in SPEED_PROMPTS]

    def run(rows: list[list[int]]) -> int:
        done = generate_tokens(
            decoder, params, rows, max_new_tokens=new_tokens, eos_ids=(), pad_id=lm.pad_id
        )
        return sum(len(c.tokens) for c in done)

    for prompt in prompts:  # compile every prompt length's programs
        run([prompt])
    start, tokens = time.perf_counter(), 0
    for prompt in prompts:
        tokens += run([prompt])
    return tokens / (time.perf_counter() - start)


def _metrics(results: dict) -> dict[tuple[str, str], float]:
    rows = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," in key and "stderr" not in key and isinstance(value, (int, float)):
                rows[(task, key)] = float(value)
    return rows


def comparison_table(runs: dict[str, dict]) -> str:
    """Every metric of every mode, the share of the full model's score, then the costs."""
    modes = list(runs)
    base = _metrics(runs[modes[0]])
    others = {m: _metrics(runs[m]) for m in modes}
    headers = ["task", "metric", *modes]
    headers += [f"{m} / {modes[0]}" for m in modes[1:]]
    rows = []
    for task, key in sorted(base):
        metric = key.split(",")[0]
        row: list[Any] = [task.removeprefix("offline_"), metric]
        row += [_fmt(others[m].get((task, key))) for m in modes]
        for m in modes[1:]:
            value, ref = others[m].get((task, key)), base[(task, key)]
            share = metric in RETAINED and value is not None and ref > 0
            row.append(f"{100 * value / ref:.0f}%" if share else "-")
        rows.append(row)
    blank = ["-"] * (len(modes) - 1)
    rows.append(["(all)", "wall s", *[f"{runs[m]['wall_s']:.0f}" for m in modes], *blank])
    rows.append(
        ["(all)", "of which compile s", *[f"{runs[m]['compile_s']:.0f}" for m in modes], *blank]
    )
    rows.append(
        ["(decode)", "layers per token", *[str(runs[m]["layers_per_token"]) for m in modes], *blank]
    )
    if all("tokens_per_s" in runs[m] for m in modes):
        speed = [runs[m]["tokens_per_s"] for m in modes]
        rows.append(["(decode)", "tokens/s, batch 1", *[f"{s:.1f}" for s in speed], *blank])
        rows.append(["(decode)", "speed-up", *[f"{s / speed[0]:.2f}x" for s in speed], *blank])
    return markdown_table(headers, rows)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def plot_accuracy_vs_speed(runs: dict[str, dict], path: Path) -> None:
    """Each task's accuracy (acc) per mode against that mode's decode speed-up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(runs)
    speed0 = runs[modes[0]]["tokens_per_s"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    tasks = sorted({t for (t, k) in _metrics(runs[modes[0]]) if k == "acc,none"})
    tasks = [t for t in tasks if "mmlu_" not in t]  # subjects: the MMLU group is one point
    order = sorted(modes, key=lambda m: runs[m]["tokens_per_s"])  # left to right by speed
    xs = [runs[m]["tokens_per_s"] / speed0 for m in order]
    for task in tasks:
        ys = [_metrics(runs[m]).get((task, "acc,none"), float("nan")) for m in order]
        ax.plot(xs, ys, marker="o", label=task.removeprefix("offline_"))
    for i, (m, x) in enumerate(zip(order, xs, strict=True)):  # labels alternate in height
        ax.axvline(x, color="grey", lw=0.8, ls=":")
        y = 1.01 + 0.05 * (i % 2)
        ax.text(x, y, m, transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
    ax.set_xlabel("decode speed-up over the full model (measured, batch 1)")
    ax.set_ylabel("accuracy (acc)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yoro", required=True, help="trained YORO nets or a training run dir")
    parser.add_argument("--model", default=None, help="base model dir (default: the nets' base)")
    parser.add_argument("--tasks", nargs="+", default=["offline_core"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--limit", type=int, default=None, help="documents per task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--speculative-k", type=int, default=None)
    parser.add_argument("--speed-tokens", type=int, default=64, help="0: no decode timing")
    parser.add_argument("--out", type=Path, default=None, help="dir for table, JSON and plot")
    args = parser.parse_args(argv)
    if args.modes[0] != "full":
        parser.error("--modes must start with full (the reference the others are shown against)")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive number of documents, got {args.limit}")

    from yoro_jax.checkpoint import CheckpointError, resolve_nets
    from yoro_jax.convert.pypi import FetchError
    from yoro_jax.eval.standard import StandardTasksError

    try:
        resolve_nets(args.yoro)
    except CheckpointError as err:
        print(f"error: --yoro {args.yoro}: {err}", file=sys.stderr)
        return 2
    enable_compilation_cache()
    common = {"model": args.model, "yoro": args.yoro, "batch_size": args.batch_size}
    if args.speculative_k is not None:
        common["speculative_k"] = args.speculative_k
    runs: dict[str, dict] = {}
    try:
        task_manager(args.tasks)  # fetch the data before any model loads
        for mode in args.modes:
            runs[mode] = evaluate(common | {"mode": mode}, args.tasks, args.limit)
            if args.speed_tokens:
                runs[mode]["tokens_per_s"] = decode_speed(runs[mode]["lm"], args.speed_tokens)
            del runs[mode]["lm"]
    except (ValueError, OSError, StandardTasksError, FetchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = comparison_table(runs)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "comparison.md").write_text(table + "\n")
        keep = ("results", "groups", "n-samples", "wall_s", "compile_s", "tokens_per_s")
        raw = {
            m: {k: r.get(k) for k in keep} | {"layers_per_token": str(r["layers_per_token"])}
            for m, r in runs.items()
        }
        (args.out / "results.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
        if args.speed_tokens:
            plot_accuracy_vs_speed(runs, args.out / "accuracy_vs_speedup.png")
        print(f"\nwritten: {args.out}/comparison.md, results.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
