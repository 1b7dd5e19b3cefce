"""Decode throughput: yoro-jax KV-cached generation vs transformers' generate, same run.

    python -m benchmarks.decode [--model DIR] [--new-tokens 128] [--batch 1 8]

Prints a markdown table: tokens/s for both, the ratio, and the memory-bandwidth roofline
(bytes of weights read per decode step / measured read bandwidth) at batch 1.
"""

from __future__ import annotations

import argparse
import platform

import jax

from benchmarks.common import (
    PROMPTS,
    best_of,
    default_model_dir,
    markdown_table,
    read_bandwidth_gbs,
    tree_bytes,
)
from yoro_jax.checkpoint import load_model
from yoro_jax.generate import LlamaDecoder, encode_prompt, generate_tokens


def hf_tokens_per_s(model_dir, gguf, prompts, new_tokens, repeats) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # left padding, as generate expects
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1

    def run():
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        assert out.shape[1] == width + new_tokens

    return len(prompts) * new_tokens / best_of(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model dir (default: SmolLM2, fetched)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()

    from yoro_jax.convert.smollm2 import fetch_smollm2_gguf

    model_dir = args.model or default_model_dir()
    model = load_model(model_dir)
    cfg, params = model.config, model.params
    decoder = LlamaDecoder(cfg, params["embed"].dtype)
    weight_bytes = tree_bytes(params)
    bandwidth = read_bandwidth_gbs()
    roofline = bandwidth * 1e9 / weight_bytes  # tokens/s at batch 1 if weights dominate
    rows = []
    for batch in args.batch:
        prompts = [encode_prompt(model.tokenizer, p, chat=True) for p in PROMPTS[:batch]]

        def ours(prompts=prompts):
            out = generate_tokens(
                decoder, params, prompts, max_new_tokens=args.new_tokens, eos_ids=[], pad_id=0
            )
            assert all(len(c.tokens) == args.new_tokens for c in out)

        ours_tps = batch * args.new_tokens / best_of(ours, args.repeats)
        hf_tps = (
            float("nan")
            if args.skip_hf
            else hf_tokens_per_s(
                model_dir, fetch_smollm2_gguf(), prompts, args.new_tokens, args.repeats
            )
        )
        of_roofline = f"{100 * ours_tps / roofline:.0f}%" if batch == 1 else "-"
        rows.append([batch, ours_tps, hf_tps, ours_tps / hf_tps, of_roofline])
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"devices {jax.devices()}"
    )
    print(
        f"weights read per decode step: {weight_bytes / 1e6:.1f} MB; "
        f"measured read bandwidth: {bandwidth:.1f} GB/s; "
        f"batch-1 roofline: {roofline:.1f} tokens/s"
    )
    print(f"{args.new_tokens} new tokens per sequence (prefill included), best of {args.repeats}\n")
    headers = ["batch", "yoro-jax tok/s", "transformers tok/s", "ratio", "of roofline"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
