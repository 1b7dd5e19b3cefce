"""What bfloat16 storage of the frozen features does to the training loss, on real data.

    python -m benchmarks.feature_precision --run runs/smollm2-cpu [--batches 4]

For batches of a run's own teacher shards (features stored in bfloat16), the loss terms
from the stored features vs recomputing the frozen blocks from the tokens in float32, for
the run's initial nets and its final nets (``RUN/export``). The stored features also come
from another program (recorded during cached generation), so the difference includes that
float32 noise as well as the bfloat16 rounding.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import markdown_table
from train import data as data_lib
from train.config import load_config
from train.prepare import initial_trainable, prepare_run
from train.step import loss_sums
from train.trainer import Trainer
from yoro_jax.checkpoint import load_yoro


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    run_dir = Path(args.run)
    prepared = prepare_run(load_config(run_dir / "config.yaml"))
    trainer, cfg = Trainer(prepared), prepared.cfg
    records = data_lib.TeacherRecords(prepared.shards["train"])
    opts = dict(trainer.loss_opts)
    loss = jax.jit(
        lambda t, b, p: loss_sums(trainer.model, trainer.frozen, t, b, p, **opts), static_argnums=2
    )
    nets = {
        "initial nets": initial_trainable(cfg, trainer.base),
        "final nets (export)": load_yoro(run_dir / "export", trainer.base)[1],
    }
    rows, worst = [], 0.0
    size = cfg.train.batch_size
    for name, trainable in nets.items():
        diffs = {"kl": [], "hidden": [], "loss": []}
        for index in range(args.batches):
            examples = [records[i] for i in range(index * size, (index + 1) * size)]
            batch = data_lib.collate(examples, trainer.pad_id, cfg.teacher.top_k)
            prompt_len = batch.pop("prompt_len")
            stored = {k: jnp.asarray(v) for k, v in batch.items()}
            recompute = {k: v for k, v in stored.items() if k not in data_lib.FEATURES}
            a, b = loss(trainable, stored, prompt_len), loss(trainable, recompute, prompt_len)
            for key in ("kl", "hidden"):
                diffs[key].append(abs(float(a[key]) - float(b[key])) / abs(float(b[key])))
            total = [float(x["kl"] + cfg.loss.hidden_weight * x["hidden"]) for x in (a, b)]
            diffs["loss"].append(abs(total[0] - total[1]) / abs(total[1]))
        rows.append([name, *(f"{np.mean(v):.2e} (max {np.max(v):.2e})" for v in diffs.values())])
        worst = max(worst, max(diffs["loss"]))
    print(
        f"{run_dir}: {args.batches} batches of {size} from its teacher shards "
        f"(features in {cfg.teacher.feature_dtype}); relative difference stored vs recompute"
    )
    print(markdown_table(["nets", "KL term", "hidden term", "loss"], rows))
    print(f"result: bf16_loss_rel_diff_max={worst:.2e}")


if __name__ == "__main__":
    main()
