"""Does a gated-off reasoning layer cost nothing? Time of the one reasoning pass vs the
number of reasoning layers some prompt of the batch needs (docs/DESIGN.md §5).

    python -m benchmarks.router_skip [--model DIR] [--batch 8] [--prompt-len 128]

One compiled program per mode, gates as a run-time input (as a router gives them):
``skip`` runs a layer only if some row's gate is on (``lax.cond``); ``mask`` computes
every layer and multiplies by the gate (what a training-time mix costs at inference).
Ratios are measured side by side in one process.
"""

from __future__ import annotations

import argparse
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import best_of, default_model_dir, markdown_table
from yoro_jax import llama
from yoro_jax.checkpoint import load_model
from yoro_jax.yoro import Yoro, YoroConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = load_model(args.model or default_model_dir())
    cfg, frozen = model.config, model.params
    yoro = Yoro(cfg, YoroConfig(2, 2, 2, 2, 1), frozen["embed"].dtype)
    num = yoro.ycfg.num_reasoning_layers(cfg)
    e = jax.random.normal(jax.random.key(0), (args.batch, args.prompt_len, cfg.hidden_size))
    valid = jnp.ones(e.shape[:2], bool)
    rope = llama.rope_tables(cfg, llama.positions_from_valid(valid))
    mask = llama.attention_mask(valid, 0, args.prompt_len)
    programs = {
        skip: partial(
            jax.jit(partial(yoro.reason, skip=skip)), frozen, e, rope, mask
        )  # arrays as arguments, not constants folded into the program
        for skip in (True, False)
    }
    rng = np.random.RandomState(0)
    rows, base = [], {}
    for needed in sorted({num, 3 * num // 4, num // 2, num // 4, 0}, reverse=True):
        # the batch needs `needed` layers: each row takes a random subset of them
        layers = rng.permutation(num)[:needed]
        gates = np.zeros((args.batch, num), np.float32)
        for row in range(args.batch):
            gates[row, layers] = rng.rand(needed) < 0.7
        gates[0, layers] = 1.0  # row 0 needs them all: the batch needs exactly `needed`
        device_gates = jnp.asarray(gates)
        times = {
            skip: best_of(lambda p=p, g=device_gates: p(g)[0].block_until_ready(), args.repeats)
            for skip, p in programs.items()
        }
        base = base or times
        rows.append(
            [
                needed,
                f"{num}",
                f"{1e3 * times[True]:.1f}",
                f"{1e3 * times[False]:.1f}",
                f"{times[True] / base[True]:.2f}",
                f"{needed / num:.2f}",
            ]
        )
    print(
        f"\nreasoning pass of {num} layers, batch {args.batch} x {args.prompt_len} prompt "
        f"tokens, {frozen['embed'].dtype}; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}; best of {args.repeats}"
    )
    print(
        markdown_table(
            [
                "layers the batch needs",
                "of",
                "skip: ms",
                "mask: ms",
                "skip time / all layers",
                "ideal",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
