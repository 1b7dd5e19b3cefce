"""Teacher-data generation speed: the full model answering a batch of real prompts while it
records the frozen features (as ``train.teacher`` does), with the layers as one stacked
``lax.scan`` against per-layer buffers (``decoders.unscanned``), timed in turn.

    python -m benchmarks.teacher --prompts 32 --new-tokens 48 --repeats 2
"""

from __future__ import annotations

import argparse
from functools import partial

from train.config import load_config
from train.data import load_prompts
from train.prepare import resolve_base
from train.teacher_data import feature_depths
from yoro_jax.decoders import unscanned
from yoro_jax.generate import RecordingDecoder, generate_tokens, special_ids
from yoro_jax.report import markdown_table, timed_in_turn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.teacher", description=__doc__)
    parser.add_argument("--config", default="configs/smollm2-cpu.yaml")
    parser.add_argument("--prompts", type=int, default=32, help="one teacher batch of them")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    cfg.data.prompts[0].limit = args.prompts
    base = resolve_base(cfg)
    prompts = load_prompts(cfg.data, base.tokenizer)[: args.prompts]
    decoder = RecordingDecoder(base.config, base.params["embed"].dtype, feature_depths(cfg, base))
    eos, pad = special_ids(base.config, base.tokenizer)
    layouts = {"stacked (scan)": base.params, "unscanned": unscanned(base.params)}
    options = {
        "max_new_tokens": args.new_tokens,
        "eos_ids": eos,
        "pad_id": pad,
        "record_top_k": cfg.teacher.top_k,
    }
    runs = {
        label: partial(generate_tokens, decoder, params, prompts, **options)
        for label, params in layouts.items()
    }
    best, outputs = timed_in_turn(runs, args.repeats)
    tokens = {label: [c.tokens for c in out] for label, out in outputs.items()}
    same = tokens["stacked (scan)"] == tokens["unscanned"]
    rows = [
        [label, f"{t:.2f}", f"{len(prompts) / t:.2f}", f"{best['stacked (scan)'] / t:.2f}x"]
        for label, t in best.items()
    ]
    header = ["layers", "s per batch", "prompts/s", "speed-up"]
    print(f"{len(prompts)} prompts, up to {args.new_tokens} new tokens, best of {args.repeats}")
    print(markdown_table(header, rows))
    speedup = best["stacked (scan)"] / best["unscanned"]
    print(f"result: unscanned_speedup={speedup:.2f} same_answers={same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
