"""YORO vs full-model decode throughput, next to the bytes-read prediction (docs/DESIGN.md §3).

    python -m benchmarks.yoro_decode [--model DIR] [--new-tokens 128] [--batch 1 8]

Table 1: tokens/s of KV-cached generation, full model vs YORO (randomly initialised nets:
speed does not depend on their values) for several splits; predicted speedup = bytes of
weights read per step (full) / (YORO); realised / predicted.

Table 2 (the original's own comparison): one teacher-forcing pass over prompt + N tokens
vs generating N tokens token by token (YORO, cached) vs the full model, N = 1..200.
"""

from __future__ import annotations

import argparse

import jax

from benchmarks.common import PROMPTS, best_of, default_model_dir, markdown_table
from yoro_jax.batch import prompt_response_layout
from yoro_jax.checkpoint import load_model
from yoro_jax.decoders import YoroDecoder
from yoro_jax.generate import LlamaDecoder, bucket, encode_prompt, generate_tokens
from yoro_jax.yoro import Yoro, YoroConfig, init_trainable, param_summary

SPLITS = {
    "E2 C2 Lc2 (reference)": YoroConfig(2, 2, 2, 2, 1),
    "E4 C4 Lc2": YoroConfig(4, 4, 2, 2, 1),
    "E1 C1 Lc1": YoroConfig(1, 1, 1, 2, 1),
}


def tokens_per_s(decoder, params, prompts, new_tokens, repeats) -> float:
    def run():
        out = generate_tokens(
            decoder, params, prompts, max_new_tokens=new_tokens, eos_ids=[], pad_id=0
        )
        assert all(len(c.tokens) == new_tokens for c in out)

    return len(prompts) * new_tokens / best_of(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-tokens", type=int, nargs="+", default=[1, 10, 50, 100, 200])
    args = parser.parse_args()

    model = load_model(args.model or default_model_dir())
    cfg, frozen, tok = model.config, model.params, model.tokenizer
    dtype = frozen["embed"].dtype
    bytes_per_param = frozen["embed"].dtype.itemsize
    full = LlamaDecoder(cfg, dtype)
    yoros = {}
    for name, ycfg in SPLITS.items():
        yoro = Yoro(cfg, ycfg, dtype)
        trainable = init_trainable(ycfg, cfg, jax.random.key(0))
        yoros[name] = (yoro, trainable, param_summary(yoro, frozen, trainable))

    rows = []
    for batch in args.batch:
        prompts = [encode_prompt(tok, p, chat=True) for p in PROMPTS[:batch]]
        full_tps = tokens_per_s(full, frozen, prompts, args.new_tokens, args.repeats)
        for name, (yoro, trainable, summary) in yoros.items():
            yoro_tps = tokens_per_s(
                YoroDecoder(yoro), (frozen, trainable), prompts, args.new_tokens, args.repeats
            )
            predicted = summary["executed_per_token_full"] / summary["executed_per_token_yoro"]
            realised = yoro_tps / full_tps
            rows.append(
                [
                    batch,
                    name,
                    full_tps,
                    yoro_tps,
                    realised,
                    predicted,
                    f"{100 * realised / predicted:.0f}%",
                ]
            )
    platform = jax.devices()[0].platform
    print(
        f"\nSmolLM2-135M-Instruct, {dtype}, {args.new_tokens} new tokens, prefill included, "
        f"best of {args.repeats}; jax {jax.__version__} on {platform}"
    )
    for name, (_, _, s) in yoros.items():
        print(
            f"  {name}: {s['executed_per_token_full'] * bytes_per_param / 1e6:.1f} MB vs "
            f"{s['executed_per_token_yoro'] * bytes_per_param / 1e6:.1f} MB of weights "
            f"read per step; trainable params {s['trainable'] / 1e6:.2f} M"
        )
    print()
    print(
        markdown_table(
            [
                "batch",
                "split",
                "full tok/s",
                "YORO tok/s",
                "realised ×",
                "predicted ×",
                "realised/predicted",
            ],
            rows,
        )
    )

    # The original's comparison: parallel teacher forcing vs token-by-token generation.
    yoro, trainable, _ = yoros["E2 C2 Lc2 (reference)"]
    prompt = encode_prompt(tok, PROMPTS[0], chat=True)
    boundary = bucket(len(prompt))
    forward = jax.jit(yoro.forward, static_argnums=4)
    loop_rows = []
    for n in args.loop_tokens:
        tokens, valid, _ = prompt_response_layout(
            [prompt], [[1] * n], boundary, boundary + bucket(n), 0
        )

        def teacher_forcing(tokens=tokens, valid=valid):
            forward(frozen, trainable, tokens, valid, boundary).block_until_ready()

        tf = best_of(teacher_forcing, args.repeats)
        cached = best_of(
            lambda n=n: generate_tokens(
                YoroDecoder(yoro),
                (frozen, trainable),
                [prompt],
                max_new_tokens=n,
                eos_ids=[],
                pad_id=0,
            ),
            args.repeats,
        )
        full_time = best_of(
            lambda n=n: generate_tokens(
                full, frozen, [prompt], max_new_tokens=n, eos_ids=[], pad_id=0
            ),
            args.repeats,
        )
        loop_rows.append([n, tf * 1e3, cached * 1e3, full_time * 1e3, full_time / cached])
    print("\nTeacher forcing (one parallel pass) vs token-by-token generation, batch 1:\n")
    print(
        markdown_table(
            [
                "new tokens",
                "TF pass ms",
                "YORO generate ms",
                "full generate ms",
                "full/YORO generate",
            ],
            loop_rows,
        )
    )


if __name__ == "__main__":
    main()
