"""Pareto sweep: router quality vs reasoning layers run, against static baselines.

    python -m train.pareto --config configs/router-smollm2-cpu.yaml \\
        --variants gumbel reinforce --lambdas 0.05 0.2 0.5

For each variant and compute penalty lambda this trains a router (the run config's
``router_train`` settings, normally stage 2 on frozen YORO nets) in ``OUT/<variant>-<lambda>``,
then evaluates it on the held-out prompts: dense KL to the full model (T=1), top-1
agreement, and reasoning layers run per prompt (deterministic gates). The same nets
without a router are evaluated with static gates at equal compute: the first R-k
reasoning layers (drop the last k) and k random layers dropped (several draws). Writes
``OUT/pareto.json``, ``OUT/pareto.md`` (table) and ``OUT/pareto.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from train import data as data_lib
from train.config import RunConfig, load_config
from train.metrics import heldout_metrics
from train.prepare import compute_dtype, initial_trainable, prepare_run
from train.trainer import train
from yoro_jax.checkpoint import load_yoro
from yoro_jax.config import ConfigError
from yoro_jax.generate import special_ids
from yoro_jax.router import RouterConfig
from yoro_jax.yoro import Yoro


def _label(value: float) -> str:
    return f"{value:g}".replace(".", "p")


def _seed_teacher_data(cfg: RunConfig, run_dir: Path) -> None:
    """Reuse the stage-1 run's teacher shards (same settings) instead of regenerating."""
    source = Path(cfg.router_train.init_nets or "")
    source = source.parent if source.name in ("export", "best") else source
    if (source / "teacher" / "manifest.json").is_file() and not (run_dir / "teacher").exists():
        shutil.copytree(source / "teacher", run_dir / "teacher")


def train_point(cfg: RunConfig, variant: str, lam: float, out: Path) -> Path:
    run_dir = out / f"{variant}-{_label(lam)}"
    point = dataclasses.replace(
        cfg,
        run_dir=str(run_dir),
        yoro=dataclasses.replace(
            cfg.yoro, router=dataclasses.replace(cfg.yoro.router, kind=variant)
        ),
        router_train=dataclasses.replace(cfg.router_train, compute_penalty=lam),
    )
    if not (run_dir / "export").is_dir():
        run_dir.mkdir(parents=True, exist_ok=True)
        _seed_teacher_data(cfg, run_dir)
        train(point)
    return run_dir / "export"


def sweep(
    cfg: RunConfig,
    variants: list[str],
    lambdas: list[float],
    out: Path,
    drops: list[int] | None,
    random_draws: int,
) -> dict[str, Any]:
    if cfg.router_train.init_nets is None:
        raise ConfigError(
            "the sweep compares routers on fixed YORO nets: set router_train.init_nets"
        )
    out.mkdir(parents=True, exist_ok=True)
    exports = {(v, lam): train_point(cfg, v, lam, out) for v in variants for lam in lambdas}

    # held-out examples: the validation split of the (shared) teacher data
    first = out / f"{variants[0]}-{_label(lambdas[0])}"
    prepared = prepare_run(load_config(first / "config.yaml"))
    base = prepared.base
    val = data_lib.TeacherRecords(prepared.shards["val"])
    examples = [val[i] for i in range(len(val))]
    _, pad = special_ids(base.config, base.tokenizer)
    opts = dict(
        batch_size=cfg.train.batch_size,
        pad_id=pad,
        top_k=cfg.teacher.top_k,
        chunk=cfg.loss.logits_chunk,
    )
    dtype = compute_dtype(cfg)

    def evaluate(model, trainable, keep=None) -> dict[str, Any]:
        m = heldout_metrics(model, base.params, trainable, examples, keep=keep, **opts)
        return {k: m[k] for k in ("kl", "top1", "reasoning_layers", "layer_skip_rate") if k in m}

    rows: list[dict[str, Any]] = []
    for (variant, lam), export in exports.items():
        ycfg, trainable, _ = load_yoro(export, base)
        rows.append(
            {
                "method": f"router: {variant}",
                "lambda": lam,
                **evaluate(Yoro(base.config, ycfg, dtype), trainable),
            }
        )
        print(
            f"{variant} lambda={lam}: {rows[-1]['reasoning_layers']:.2f} layers, "
            f"KL {rows[-1]['kl']:.4f}",
            file=sys.stderr,
        )

    plain_cfg = dataclasses.replace(cfg, yoro=dataclasses.replace(cfg.yoro, router=RouterConfig()))
    nets = {k: v for k, v in initial_trainable(plain_cfg, base).items() if k != "router"}
    plain = Yoro(base.config, plain_cfg.yoro, dtype)
    num = plain.ycfg.num_reasoning_layers(base.config)
    if drops is None:
        drops = sorted({0, num // 4, num // 2, 3 * num // 4, num})
    rng = np.random.RandomState(0)
    for k in drops:
        if not 0 <= k <= num:
            raise ConfigError(f"--drops: {k} is outside 0..{num} reasoning layers")
        keep = (np.arange(num) < num - k).astype(np.float32)
        rows.append({"method": "static: drop last k", "k": k, **evaluate(plain, nets, keep)})
        draws = [evaluate(plain, nets, rng.permutation(keep)) for _ in range(random_draws)]
        if 0 < k < num and draws:
            rows.append(
                {
                    "method": "static: drop k random",
                    "k": k,
                    "draws": len(draws),
                    "kl": float(np.mean([d["kl"] for d in draws])),
                    "kl_std": float(np.std([d["kl"] for d in draws])),
                    "top1": float(np.mean([d["top1"] for d in draws])),
                    "reasoning_layers": float(num - k),
                }
            )
        print(f"static k={k}: KL {rows[-1]['kl']:.4f}", file=sys.stderr)
    result = {"reasoning_layers": num, "heldout_prompts": len(examples), "rows": rows}
    (out / "pareto.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "pareto.md").write_text(table(result))
    plot(result, out / "pareto.png")
    return result


def table(result: dict[str, Any]) -> str:
    header = f"| method | λ / k | reasoning layers run (of {result['reasoning_layers']}) |"
    lines = [header + " held-out KL | top-1 |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        setting = f"λ={r['lambda']:g}" if "lambda" in r else f"k={r['k']}"
        kl = f"{r['kl']:.4f}" + (f" ± {r['kl_std']:.4f}" if "kl_std" in r else "")
        lines.append(
            f"| {r['method']} | {setting} | {r['reasoning_layers']:.2f} | {kl} | {r['top1']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    markers = {"static: drop last k": "s-", "static: drop k random": "^--"}
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        pts = sorted(
            (r["reasoning_layers"], r["kl"], r["top1"])
            for r in result["rows"]
            if r["method"] == method
        )
        style = markers.get(method, "o")
        for ax, index in zip(axes, (1, 2), strict=True):
            ax.plot([p[0] for p in pts], [p[index] for p in pts], style, label=method)
    for ax, name in zip(
        axes, ("held-out KL to the full model (T=1)", "top-1 agreement"), strict=True
    ):
        ax.set_xlabel(f"reasoning layers run per prompt (of {result['reasoning_layers']})")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.pareto",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="router run config (stage 2)")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--variants", nargs="+", default=["gumbel", "reinforce"])
    parser.add_argument("--lambdas", nargs="+", type=float, required=True)
    parser.add_argument(
        "--drops",
        nargs="+",
        type=int,
        default=None,
        help="static baselines: numbers of reasoning layers dropped "
        "(default: 0, R/4, R/2, 3R/4, R)",
    )
    parser.add_argument("--random-draws", type=int, default=3)
    parser.add_argument("--out", default=None, help="default: RUN_DIR/pareto")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        out = Path(args.out or Path(cfg.run_dir) / "pareto")
        result = sweep(cfg, args.variants, args.lambdas, out, args.drops, args.random_draws)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(result))
    print(f"wrote {out / 'pareto.md'}, {out / 'pareto.png'}, {out / 'pareto.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
