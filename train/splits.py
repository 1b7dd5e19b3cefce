"""Quality against speed over YORO splits: held-out agreement and the measured decode
speed-up over the full model, same prompts, steps and seed, one table and one plot.

    python -m train.splits --config configs/smollm2-cpu.yaml --splits 2,2,2 2,2,4 4,4,2 \\
        --prompts 320 --steps 120 --out runs/splits

A split is E,C,Lc (embedding, coherence, compensation layers). Each trains its own run
(its stored features depend on the split; the prompts are the same). Decode speed: greedy
KV-cached generation at batch 1 with the trained nets and unscanned layers (as the generate
CLI decodes), full model and YORO timed in turn beside every split, best of ``--repeats``.
Writes ``OUT/splits.json``, ``OUT/splits.md``, ``OUT/splits.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

from train.config import load_config
from train.metrics import read_metrics
from train.trainer import train
from yoro_jax.checkpoint import load_yoro
from yoro_jax.config import ConfigError
from yoro_jax.generate import encode_prompt, generate_tokens
from yoro_jax.models import make_decoders
from yoro_jax.report import markdown_table, timed_in_turn
from yoro_jax.yoro import Yoro, param_summary

PROMPT = "Explain why the sky is blue."


def side_by_side_tokens_per_s(
    decoders: dict[str, tuple], prompts: list[list[int]], new_tokens: int, repeats: int
) -> dict[str, float]:
    """Generated tokens per second of each decoder, best of ``repeats`` after a warm-up
    (compile) run, the decoders timed in turn within each repeat so load drifts hit both."""
    options = {"max_new_tokens": new_tokens, "eos_ids": [], "pad_id": 0}
    runs = {
        label: partial(generate_tokens, decoder, params, prompts, **options)
        for label, (decoder, params, _) in decoders.items()
    }
    best, _ = timed_in_turn(runs, repeats)
    return {label: len(prompts) * new_tokens / t for label, t in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.splits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--splits", nargs="+", default=["2,2,2", "2,2,4", "4,4,2"])
    parser.add_argument("--prompts", type=int, default=320, help="ShareGPT prompts (with held-out)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="runs/splits")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows, results = [], []
    try:
        for split in args.splits:
            e, c, lc = (int(x) for x in split.split(","))
            run_dir = out / f"E{e}-C{c}-Lc{lc}"
            cfg = load_config(
                args.config,
                [
                    f"run_dir={run_dir}",
                    f"yoro.embedding_layers={e}",
                    f"yoro.coherence_layers={c}",
                    f"yoro.compensation_layers={lc}",
                    f"data.prompts.0.limit={args.prompts}",
                    f"train.max_steps={args.steps}",
                    f"eval.every_steps={args.steps}",
                    "eval.sample_prompts=[]",
                ],
            )
            print(f"=== split E{e} C{c} Lc{lc}", file=sys.stderr, flush=True)
            result = train(cfg)
            val = [r for r in read_metrics(run_dir) if r["split"] == "val"][-1]
            ycfg, nets, base = load_yoro(run_dir / "export")
            prompts = [encode_prompt(base.tokenizer, PROMPT, chat=True)]
            # unscanned layers, as the generate CLI decodes; the full model timed again
            # beside every split so each ratio is measured side by side
            decoders = make_decoders(base, str(run_dir / "export"), compare=True)
            speed = side_by_side_tokens_per_s(decoders, prompts, args.new_tokens, args.repeats)
            full_tps, yoro_tps = speed["full"], speed["yoro"]
            summary = param_summary(Yoro(base.config, ycfg), base.params, nets)
            layers = e + lc + c
            results.append(
                {
                    "split": [e, c, lc],
                    "layers_per_token": layers,
                    "val": val,
                    "full_tok_s": full_tps,
                    "yoro_tok_s": yoro_tps,
                    "speedup": yoro_tps / full_tps,
                    "step": result["step"],
                    "predicted_speedup": summary["executed_per_token_full"]
                    / summary["executed_per_token_yoro"],
                }
            )
            rows.append(
                [
                    f"E{e} C{c} Lc{lc}",
                    layers,
                    f"{val['top1']:.3f}",
                    f"{val['kl']:.3f}",
                    f"{full_tps:.1f}",
                    f"{yoro_tps:.1f}",
                    f"{yoro_tps / full_tps:.2f}x",
                    f"{results[-1]['predicted_speedup']:.2f}x",
                ]
            )
            out.mkdir(parents=True, exist_ok=True)
            (out / "splits.json").write_text(json.dumps(results, indent=2) + "\n")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    header = [
        "split",
        "decoder layers / token",
        "held-out top-1",
        "KL (T=1)",
        "full tok/s (bs 1)",
        "YORO tok/s",
        "speed-up",
        "predicted (bytes)",
    ]
    text = markdown_table(header, rows)
    (out / "splits.md").write_text(text + "\n")
    plot(results, out / "splits.png")
    print(text)
    print(
        "result: "
        + " ".join(
            f"E{r['split'][0]}C{r['split'][1]}Lc{r['split'][2]}_top1={r['val']['top1']:.3f}"
            f" E{r['split'][0]}C{r['split'][1]}Lc{r['split'][2]}_speedup={r['speedup']:.2f}"
            for r in results
        )
    )
    return 0


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        e, c, lc = r["split"]
        ax.scatter(r["speedup"], r["val"]["top1"])
        ax.annotate(
            f"E{e} C{c} Lc{lc}",
            (r["speedup"], r["val"]["top1"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("measured decode speed-up over the full model (batch 1)")
    ax.set_ylabel("held-out top-1 agreement")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
