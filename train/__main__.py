"""``python -m train --config configs/NAME.yaml [--set path.to.field=value ...]``.

Makes the teacher data if needed, then trains; a run directory that already holds
checkpoints is resumed from the latest one (``--restart`` discards them instead).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from train.config import load_config
from train.interrupts import PREEMPTED_EXIT, Preempted
from yoro_jax.checkpoint import CheckpointError
from yoro_jax.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (fields not given take their defaults)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override one field, e.g. --set optim.lr=1e-4 (repeatable)",
    )
    parser.add_argument(
        "--restart",
        action="store_true",
        help="delete the run's checkpoints and train from step 0 (teacher data is kept)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    multi = parser.add_argument_group(
        "multi-host (jax.distributed; default: from JAX_COORDINATOR_ADDRESS / "
        "JAX_NUM_PROCESSES / JAX_PROCESS_ID, or the cluster launcher)"
    )
    multi.add_argument("--coordinator", help="host:port of process 0")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    return parser


def print_summary(run_dir: Path) -> None:
    """The run's last held-out metrics and its last sample answers, full model vs YORO."""
    import json

    from train.metrics import read_metrics

    val = [r for r in read_metrics(run_dir) if r["split"] == "val"]
    if val:
        last = val[-1]
        at = " ".join(f"{last.get(f'top1_at_{j}', float('nan')):.2f}" for j in range(1, 9))
        print(
            f"held-out at step {last['step']}: top-1 agreement {last['top1']:.3f}, "
            f"KL (T=1) {last['kl']:.3f}; top-1 at generated positions 1..8: {at}"
        )
    path = run_dir / "samples.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    for row in [r for r in rows if r["step"] == rows[-1]["step"]] if rows else []:
        print(f"\n{row['prompt']}\n  [full] {row['full']!r}\n  [yoro] {row['yoro']!r}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            import yaml

            from train.config import to_dict

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        import jax

        from train.lock import lock_run_dir
        from train.trainer import train
        from yoro_jax.sharding import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        cfg.mesh.validate()  # before any teacher data is made: enough devices for the mesh

        run_dir = Path(cfg.run_dir)
        if jax.process_index() == 0:  # before --restart deletes anything
            lock_run_dir(run_dir)
        if args.restart:
            for name in ("checkpoints", "best", "export", "tb"):
                shutil.rmtree(run_dir / name, ignore_errors=True)
            for name in ("metrics.jsonl", "samples.jsonl", "loss.png"):
                (run_dir / name).unlink(missing_ok=True)
        result = train(cfg)
    except Preempted as stopped:
        print(str(stopped), file=sys.stderr)
        return PREEMPTED_EXIT
    except (ConfigError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    best = result["best"]
    print(f"done: {result['step']} optimizer steps; YORO nets in {run_dir / 'export'}")
    if best:
        print(
            f"best held-out KL {best['kl']:.4f} (top-1 {best['top1']:.3f}) at step "
            f"{best['step']}: {run_dir / 'best'}"
        )
    print_summary(run_dir)
    print(
        f"try it: python -m yoro_jax.generate --yoro {run_dir / 'export'} --compare --chat "
        "--prompt 'What is the capital of France?'"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
