"""What a full-model decode step costs by how the layer weights are held, one process:

    python -m benchmarks.scan_copy [--rounds 3]

- ``scan``: ``llama.run_layers`` — one ``lax.scan`` over the stacked weights (the code);
- ``static slices``: a Python loop over ``stack[i]`` (static slices of the same stack);
- ``separate arrays``: a Python loop over one array per layer (the storage before the scan).

SmolLM2, batch 1, one token at slot 5 of a 96-slot cache, best of 10 calls per round. On
XLA:CPU each layer's slice of a stack is materialised before its matmuls, which is what the
first two rows pay for (docs/RESULTS.md, issue 18).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks.common import default_model_dir, markdown_table
from yoro_jax import llama
from yoro_jax.checkpoint import load_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    base = load_model(default_model_dir())
    cfg, stack = base.config, base.params["layers"]
    separate = [jax.tree.map(jnp.array, layer) for layer in llama.unstack_layers(stack)]
    batch, slots, n = 1, 96, cfg.num_hidden_layers
    x = jnp.ones((batch, 1, cfg.hidden_size))
    rope = llama.rope_tables(cfg, jnp.zeros((batch, 1), jnp.int32))
    mask = jnp.ones((batch, 1, slots), bool)
    caches = llama.init_cache(cfg, n, batch, slots)

    def loop(layers, x, caches):
        out = []
        for i in range(n):
            cache = jax.tree.map(lambda a, i=i: a[i], caches)
            x, cache = llama.apply_layer(cfg, layers[i], x, rope, mask, cache, 5)
            out.append(cache)
        return x, llama.stack_layers(out)

    variants = {
        "scan": (jax.jit(lambda s, x, c: llama.run_layers(cfg, s, x, rope, mask, c, 5)), stack),
        "static slices": (jax.jit(lambda s, x, c: loop(llama.unstack_layers(s), x, c)), stack),
        "separate arrays": (jax.jit(loop), separate),
    }
    best = {}
    for fn, layers in variants.values():
        jax.block_until_ready(fn(layers, x, caches))
    for _ in range(args.rounds):
        for name, (fn, layers) in variants.items():
            for _ in range(10):
                start = time.perf_counter()
                jax.block_until_ready(fn(layers, x, caches))
                seconds = time.perf_counter() - start
                best[name] = min(best.get(name, seconds), seconds)
    sep = best["separate arrays"]
    rows = [[name, f"{t * 1e3:.1f}", f"{t / sep:.2f}"] for name, t in best.items()]
    print(markdown_table(["weights held as", "decode step (ms)", "vs separate arrays"], rows))
    print(
        f"result: scan_vs_separate={best['scan'] / sep:.2f} "
        f"static_vs_separate={best['static slices'] / sep:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
