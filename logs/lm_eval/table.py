"""The whole-split table of docs/RESULTS.md (issue 17) from the lm-eval results JSONs that
``full_splits.sh`` writes: full model vs YORO per task, YORO's retained share of the full
model's score, and of its margin above chance (the share that measures the nets; shown
where the full model is more than 2 standard errors above chance).

    python logs/lm_eval/table.py   # from the repo root
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
# the floor a model that knows nothing reaches: uniform over the choices (ARC has a few 3-
# and 5-choice questions); BoolQ's majority answer ("yes", 62% of the validation split);
# LAMBADA's exact last word has none
CHANCE = {
    "offline_copa": 0.5,
    "offline_arc_challenge": 0.25,
    "offline_arc_easy": 0.25,
    "offline_openbookqa": 0.25,
    "offline_winogrande": 0.5,
    "offline_piqa": 0.5,
    "offline_boolq": 0.62,
    "offline_hellaswag": 0.25,
    "offline_mmlu": 0.25,
    "offline_lambada_openai": 0.0,
}


def latest_results(mode: str) -> dict[str, dict]:
    """task -> {metric: value, 'docs': n, 'seconds': s} from the newest JSON per task."""
    out: dict[str, dict] = {}
    for path in sorted((HERE / mode).glob("*/results_*.json"), key=lambda p: p.name):
        run = json.loads(path.read_text())
        for task, metrics in run["results"].items():
            if task in run["n-samples"]:
                out[task] = {
                    **{k.split(",")[0]: v for k, v in metrics.items() if "," in k},
                    "docs": run["n-samples"][task]["effective"],
                    "seconds": float(run["total_evaluation_time_seconds"]),
                }
    return out


def main() -> None:
    full, yoro = latest_results("full"), latest_results("yoro")
    print("| task | docs | metric | full | YORO | retained | margin above chance kept |")
    print("|---|---|---|---|---|---|---|")
    for task in CHANCE:
        if task not in full:
            continue
        for metric in ("acc", "acc_norm", "perplexity"):
            if metric not in full[task]:
                continue
            f = full[task][metric]
            y = yoro.get(task, {}).get(metric)
            err = full[task].get(f"{metric}_stderr")
            if y is None:
                cells = ["–", "–", "–"]
            elif metric == "perplexity":  # lower is better: show the ratio
                cells = [f"{y:.2f}", f"×{y / f:.2f} perplexity", "–"]
            else:
                chance = CHANCE[task]
                # a margin within 2 standard errors of chance is noise: no share of it is shown
                clear = f - chance > 2 * (err or 0.0)
                kept = (y - chance) / (f - chance) if clear else None
                cells = [f"{y:.3f}", f"{y / f:.0%}", "–" if kept is None else f"{kept:.0%}"]
            value = f"{f:.2f}" if metric == "perplexity" else f"{f:.3f}"
            value += f" ± {err:.3f}" if err is not None else ""
            name = task.removeprefix("offline_")
            print(
                f"| {name} | {full[task]['docs']} | {metric} | {value} | "
                + " | ".join(cells)
                + " |"
            )
    print()
    print("| task | full s | YORO s |")
    print("|---|---|---|")
    for task in CHANCE:
        if task in full:
            ys = yoro.get(task, {}).get("seconds")
            print(
                f"| {task.removeprefix('offline_')} | {full[task]['seconds']:.0f} | "
                + ("–" if ys is None else f"{ys:.0f}")
                + " |"
            )


if __name__ == "__main__":
    main()
