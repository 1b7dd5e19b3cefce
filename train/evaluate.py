"""Before/after quality of a training run on prompts it never saw.

    python -m train.evaluate --run runs/smollm2-cpu --prompts FILE.jsonl --format self-instruct

The full model answers the prompts (teacher data, cached under ``RUN/eval/NAME``); then
the YORO nets are scored against it by teacher forcing on those answers: dense KL to the
full model at T=1, top-1 agreement and the cross-entropy of the full model's tokens, for
freshly initialised nets ("before": the run's seed) and for each saved set ("after":
``RUN/export``, ``RUN/best``). A few answers are generated side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from train import data as data_lib
from train.config import PROMPT_FORMATS, PromptSource, load_config
from train.metrics import heldout_metrics
from train.prepare import compute_dtype, initial_trainable, resolve_base
from train.teacher_data import generate_teacher_data
from yoro_jax.checkpoint import CheckpointError, load_yoro
from yoro_jax.config import ConfigError
from yoro_jax.decoders import YoroDecoder
from yoro_jax.generate import LlamaDecoder, generate_tokens, special_ids
from yoro_jax.report import markdown_table
from yoro_jax.yoro import Yoro


def repeated_ngram_share(tokens: list[int], n: int = 4) -> float:
    """Share of a sequence's n-grams that already occurred earlier in it (0: no repetition;
    a generation stuck in a loop approaches 1)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def distinct_ngrams(tokens: list[int], n: int = 2) -> float:
    """distinct-n: distinct n-grams / n-grams in one sequence."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def evaluate_run(
    run_dir: Path,
    source: PromptSource,
    samples: int = 3,
    batch_size: int = 8,
    generations: int = 16,
) -> dict[str, Any]:
    """Metrics per parameter set (``before``, ``export``, ``best``), the repetition of greedy
    answers on ``generations`` prompts (full model and each set), and sample generations."""
    cfg = load_config(run_dir / "config.yaml")
    base = resolve_base(cfg)
    prompts = data_lib.load_prompts(dataclasses.replace(cfg.data, prompts=[source]), base.tokenizer)
    eval_cfg = dataclasses.replace(cfg, run_dir=str(run_dir / "eval" / Path(source.source).stem))
    shards = generate_teacher_data(eval_cfg, base, {"eval": prompts})["eval"]
    records = data_lib.TeacherRecords(shards)
    examples = [records[i] for i in range(len(records))]

    model = Yoro(base.config, cfg.yoro, compute_dtype(cfg))
    frozen = base.params
    nets = {"before (initial nets)": initial_trainable(cfg, base)}
    for name in ("export", "best"):
        if (run_dir / name).is_dir():
            nets[f"after ({name})"] = load_yoro(run_dir / name, base)[1]
    eos, pad = special_ids(base.config, base.tokenizer)
    metrics = {
        name: heldout_metrics(
            model,
            frozen,
            trainable,
            examples,
            batch_size,
            pad,
            cfg.teacher.top_k,
            cfg.loss.logits_chunk,
        )
        for name, trainable in nets.items()
    }

    opts = {
        "max_new_tokens": cfg.eval.sample_max_new_tokens,
        "eos_ids": eos,
        "pad_id": pad,
        "tokenizer": base.tokenizer,
    }
    chosen = [e["prompt"].tolist() for e in examples[: max(samples, generations)]]
    answers = {"full": generate_tokens(LlamaDecoder(base.config), frozen, chosen, **opts)}
    for name, trainable in nets.items():
        answers[name] = generate_tokens(YoroDecoder(model), (frozen, trainable), chosen, **opts)
    repetition = {
        name: {
            "repeated_4gram_share": float(np.mean([repeated_ngram_share(c.tokens) for c in a])),
            "distinct_2": float(np.mean([distinct_ngrams(c.tokens) for c in a])),
        }
        for name, a in answers.items()
    }
    texts = [
        {"prompt": base.tokenizer.decode(p, skip_special_tokens=True)}
        | {name: a[i].text for name, a in answers.items()}
        for i, p in enumerate(chosen[:samples])
    ]
    return {
        "metrics": metrics,
        "repetition": repetition,
        "samples": texts,
        "prompts": len(examples),
        "generated": len(chosen),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", required=True, help="a run directory of `python -m train`")
    parser.add_argument("--prompts", required=True, help=".json/.jsonl/.parquet or hub id")
    parser.add_argument("--format", default="generic", choices=PROMPT_FORMATS[1:])
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--samples", type=int, default=3, help="side-by-side generations")
    parser.add_argument(
        "--generations",
        type=int,
        default=16,
        help="greedy answers per model for the repetition measures",
    )
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        result = evaluate_run(
            Path(args.run),
            PromptSource(args.prompts, args.format, limit=args.limit),
            args.samples,
            generations=args.generations,
        )
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{result['prompts']} held-out prompts from {args.prompts}, "
        f"{int(next(iter(result['metrics'].values()))['tokens'])} response tokens"
    )
    rows = [
        [
            name,
            f"{m['kl']:.4f}",
            f"{m['top1']:.3f}",
            f"{m['ce']:.4f}",
            " ".join(f"{m[f'top1_at_{j}']:.2f}" for j in range(1, 9)),
        ]
        for name, m in result["metrics"].items()
    ]
    header = [
        "YORO nets",
        "KL to full (T=1)",
        "top-1 agreement",
        "CE of full's tokens",
        "top-1 at generated positions 1..8",
    ]
    print(markdown_table(header, rows))
    print(f"\ngreedy answers to {result['generated']} of the prompts:")
    print(
        markdown_table(
            ["model", "repeated 4-gram share", "distinct-2"],
            [
                [name, f"{r['repeated_4gram_share']:.3f}", f"{r['distinct_2']:.3f}"]
                for name, r in result["repetition"].items()
            ],
        )
    )
    for sample in result["samples"]:
        print()
        print(yaml.safe_dump(sample, sort_keys=False, allow_unicode=True, width=100), end="")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
