"""Ablation of docs/DESIGN.md §3.4: the reference, each lever alone, and the levers
combined — same teacher data (prompts and answers), same steps, same seed.

    python -m train.ablation --config configs/smollm2-cpu.yaml --teacher-from runs/smollm2-cpu \\
        --out runs/ablation --steps 200

Every variant trains from the stored frozen features of one teacher run (linked, not
copied) and is scored on that run's held-out prompts: dense KL to the full model at T=1,
top-1 agreement overall and at generated positions 1..8, and the repetition of its greedy
answers next to the full model's. Writes ``OUT/ablation.json``, ``OUT/ablation.md`` and
``OUT/agreement.png`` (held-out agreement against training tokens seen, every variant).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from train.config import load_config
from train.evaluate import distinct_ngrams, repeated_ngram_share
from train.metrics import read_metrics
from train.prepare import prepare_run
from train.trainer import Trainer
from yoro_jax.checkpoint import load_yoro
from yoro_jax.config import ConfigError
from yoro_jax.decoders import YoroDecoder
from yoro_jax.generate import LlamaDecoder, generate_tokens, special_ids
from yoro_jax.report import markdown_table

# The reference recipe, stated in full so that every variant differs from it only in
# its levers whatever the base config says.
REFERENCE = [
    "yoro.prompt_context=yoro",
    "yoro.nets=reference",
    "yoro.compensation_init=random",
    "loss.soft_temperature=3.0",
    "loss.hidden_weight=0.0",
]
LEVERS = {
    "exact context": ["yoro.prompt_context=exact"],
    "residual nets": ["yoro.nets=residual"],
    "reasoning init": ["yoro.compensation_init=reasoning"],
    "T=1 KL + hidden": ["loss.soft_temperature=1.0", "loss.hidden_weight=1.0"],
}
VARIANTS: dict[str, list[str]] = {
    "reference": [],
    **{f"+ {name} only": overrides for name, overrides in LEVERS.items()},
    "all levers": [o for overrides in LEVERS.values() for o in overrides],
    "all levers, no hidden loss": [
        *LEVERS["exact context"],
        *LEVERS["residual nets"],
        *LEVERS["reasoning init"],
        "loss.soft_temperature=1.0",
    ],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def run_variant(
    config: str, teacher_run: Path, out: Path, name: str, steps: int, extra: list[str]
) -> dict[str, Any]:
    run_dir = out / slug(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    link = run_dir / "teacher"
    if not link.exists():
        link.symlink_to((teacher_run / "teacher").absolute(), target_is_directory=True)
    overrides = [
        f"run_dir={run_dir}",
        *REFERENCE,
        *VARIANTS[name],
        f"train.max_steps={steps}",
        f"eval.every_steps={max(steps // 4, 1)}",
        "eval.sample_prompts=[]",
        *extra,
    ]
    trainer = Trainer(prepare_run(load_config(config, overrides)))
    trainer.run()
    val = [r for r in read_metrics(run_dir) if r["split"] == "val"]
    return {
        "name": name,
        "overrides": VARIANTS[name],
        "run_dir": str(run_dir),
        "final": val[-1],
        "curve": val,
        "repetition": repetition(trainer, run_dir),
    }


_FULL_ANSWERS: dict[str, Any] = {}


def repetition(trainer: Trainer, run_dir: Path) -> dict[str, dict[str, float]]:
    """Repetition of greedy answers to the held-out prompts: YORO (the run's final nets)
    and the full model."""
    prompts = [e["prompt"].tolist() for e in trainer.val_examples]
    eos, pad = special_ids(trainer.base.config, trainer.base.tokenizer)
    opts = {"max_new_tokens": trainer.cfg.eval.sample_max_new_tokens, "eos_ids": eos, "pad_id": pad}
    if "full" not in _FULL_ANSWERS:
        full = LlamaDecoder(trainer.base.config, trainer.model.dtype)
        _FULL_ANSWERS["full"] = generate_tokens(full, trainer.frozen, prompts, **opts)
    nets = load_yoro(run_dir / "export", trainer.base)[1]
    yoro = generate_tokens(YoroDecoder(trainer.model), (trainer.frozen, nets), prompts, **opts)

    def measure(completions):
        return {
            "repeated_4gram_share": float(
                np.mean([repeated_ngram_share(c.tokens) for c in completions])
            ),
            "distinct_2": float(np.mean([distinct_ngrams(c.tokens) for c in completions])),
        }

    return {"yoro": measure(yoro), "full": measure(_FULL_ANSWERS["full"])}


def table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        f, rep = r["final"], r["repetition"]
        rows.append(
            [
                r["name"],
                f"{f['top1']:.3f}",
                f"{f['kl']:.3f}",
                " ".join(f"{f[f'top1_at_{j}']:.2f}" for j in range(1, 9)),
                f"{rep['yoro']['repeated_4gram_share']:.3f}",
                f"{rep['full']['repeated_4gram_share']:.3f}",
                f"{rep['yoro']['distinct_2']:.3f}",
            ]
        )
    header = [
        "variant",
        "top-1",
        "KL (T=1)",
        "top-1 at generated positions 1..8",
        "repeated 4-grams YORO",
        "full",
        "distinct-2 YORO",
    ]
    return markdown_table(header, rows)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        points = [(v.get("tokens_seen", 0), v["top1"]) for v in r["curve"]]
        ax.plot(*zip(*points, strict=True), marker="o", label=r["name"])
    ax.set_xlabel("training tokens seen (response positions)")
    ax.set_ylabel("held-out top-1 agreement with the full model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.ablation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--teacher-from", required=True, help="a run dir whose teacher/ to use")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    args = parser.parse_args(argv)
    out, teacher_run = Path(args.out), Path(args.teacher_from)
    if not (teacher_run / "teacher" / "manifest.json").is_file():
        print(f"error: {teacher_run} has no teacher data (teacher/manifest.json)", file=sys.stderr)
        return 2
    results = []
    try:
        for name in args.variants:
            print(f"=== {name}", file=sys.stderr, flush=True)
            results.append(run_variant(args.config, teacher_run, out, name, args.steps, args.set))
            (out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = table(results)
    (out / "ablation.md").write_text(text + "\n")
    plot(results, out / "agreement.png")
    print(text)
    best = max(results, key=lambda r: r["final"]["top1"])
    print(
        f"result: best={slug(best['name'])} top1={best['final']['top1']:.3f} "
        f"kl={best['final']['kl']:.3f} reference_top1={results[0]['final']['top1']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
