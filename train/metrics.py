"""Held-out metrics (KL, top-1 agreement overall and by position, router layers), the
metrics log (jsonl + TensorBoard) and the loss plot."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import data as data_lib
from train.step import row_sums
from yoro_jax.llama import Params
from yoro_jax.router import layers_needed, layers_on
from yoro_jax.sharding import is_primary, shard_batch, to_host
from yoro_jax.yoro import Yoro

# Held-out top-1 agreement is also reported at each of the first generated positions.
AT_POSITIONS = 8


def to_device(batch: dict[str, Any], mesh: Any = None) -> tuple[dict[str, jax.Array], int]:
    """Batch arrays on device (split over the mesh's devices if given) + the static P."""
    prompt_len = int(batch["prompt_len"])
    arrays = shard_batch({k: v for k, v in batch.items() if k != "prompt_len"}, mesh)
    return arrays, prompt_len


@partial(jax.jit, static_argnames=("model", "prompt_len", "chunk"))
def eval_sums(
    model: Yoro,
    frozen: Params,
    trainable: Params,
    batch,
    prompt_len: int,
    chunk: int,
    keep: jax.Array | None = None,  # [R] fixed 0/1 gates for every row (static baselines)
):
    """Held-out metrics against the exact teacher (the full model's dense logits, T=1),
    with deterministic routing; also [B] reasoning layers each row needed and [B, R] which."""
    gates = (
        None if keep is None else jnp.broadcast_to(keep, (batch["tokens"].shape[0], *keep.shape))
    )
    rows, routing = row_sums(
        model,
        frozen,
        trainable,
        batch,
        prompt_len,
        online=True,
        temperature=1.0,
        ce_weight=1.0,
        chunk=chunk,
        gates=gates,
    )
    sums = {key: jnp.sum(value) for key, value in rows.items() if key != "agree_positions"}
    # agreement at generated positions 1..8: what a speculative decoder's drafts would see
    sums["top1_at"] = jnp.sum(rows["agree_positions"][:, :AT_POSITIONS], axis=0)
    sums["count_at"] = jnp.sum(batch["target_mask"][:, :AT_POSITIONS].astype(jnp.float32), axis=0)
    if routing is not None:
        sums |= {"layers": layers_needed(routing.gates), "layer_on": layers_on(routing.gates)}
    return sums


def heldout_metrics(
    model: Yoro,
    frozen: Params,
    trainable: Params,
    examples: list[dict[str, np.ndarray]],
    batch_size: int,
    pad_id: int,
    top_k: int,
    chunk: int,
    keep: np.ndarray | None = None,
) -> dict[str, Any]:
    """Per-token means over ``examples``: dense KL to the full model (T=1), top-1 agreement
    with it, and cross-entropy of the teacher's tokens. With a router (or fixed ``keep``
    gates): mean reasoning layers run per prompt and each layer's skip rate."""
    if not examples:
        return {}
    totals: dict[str, float] = {}
    layers, layer_on = [], []
    for batch in data_lib.batches(examples, batch_size, pad_id, top_k):
        arrays, prompt_len = to_device(batch)
        sums = eval_sums(
            model,
            frozen,
            trainable,
            arrays,
            prompt_len,
            chunk,
            None if keep is None else jnp.asarray(keep, jnp.float32),
        )
        for key in ("kl", "ce", "top1", "count"):
            totals[key] = totals.get(key, 0.0) + float(sums[key])
        for key in ("top1_at", "count_at"):
            totals[key] = totals.get(key, 0.0) + to_host(sums[key]).astype(np.float64)
        if "layers" in sums:
            layers.append(to_host(sums["layers"]))
            layer_on.append(to_host(sums["layer_on"]))
    count = max(totals["count"], 1.0)
    out = {key: totals[key] / count for key in ("kl", "top1", "ce")} | {"tokens": count}
    at = totals["top1_at"] / np.maximum(totals["count_at"], 1.0)
    out |= {f"top1_at_{j + 1}": float(a) for j, a in enumerate(at)}
    if layers:
        on = np.concatenate(layer_on).astype(np.float64)
        out |= {
            "reasoning_layers": float(np.concatenate(layers).mean()),
            "layer_skip_rate": (1.0 - on.mean(axis=0)).tolist(),
        }
    return out


def rewind_jsonl(path: Path, step: int) -> None:
    """Keep the rows of a JSON-lines log with ``"step" <= step`` (none for step 0)."""
    if not path.is_file():
        return
    rows = path.read_text().splitlines()
    keep = [r for r in rows if r and step > 0 and json.loads(r)["step"] <= step]
    if len(keep) < len(rows):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(r + "\n" for r in keep))
        tmp.replace(path)  # atomic: a kill here leaves the old file or the new one


class MetricsLog:
    """metrics.jsonl + TensorBoard scalars (multi-host: written by process 0 alone)."""

    def __init__(self, run_dir: Path):
        from tensorboardX import SummaryWriter

        self.path = run_dir / "metrics.jsonl"
        self.enabled = is_primary()
        self.tb = SummaryWriter(str(run_dir / "tb")) if self.enabled else None

    def rewind(self, step: int) -> None:
        """Drop the rows a resumed run will log again: those after ``step`` (the checkpoint
        it resumes from), or all of them when it starts over from step 0 — in
        metrics.jsonl and samples.jsonl alike."""
        if self.enabled:
            rewind_jsonl(self.path, step)
            rewind_jsonl(self.path.with_name("samples.jsonl"), step)

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": split, **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in values.items():
            self.tb.add_scalar(f"{split}/{key}", float(value), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------ plot
def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def plot_losses(run_dir: Path) -> Path | None:
    """RUN/loss.png: training loss and held-out KL against optimizer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, key, label in (
        ("train", "loss", "train loss (T_soft KL)"),
        ("val", "kl", "held-out KL to teacher (T=1)"),
    ):
        points = [(r["step"], r[key]) for r in rows if r["split"] == split and key in r]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if split == "val" else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL (nats / token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
