"""``python -m yoro_jax.generate``: chat with the full model and/or trained YORO nets."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from typing import Any

from yoro_jax.generate import encode_prompt, generate_tokens, special_ids
from yoro_jax.models import make_decoders, resolve_model
from yoro_jax.sampling import SamplingConfig
from yoro_jax.speculative import DEFAULT_K


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m yoro_jax.generate",
        description="Generate text with a converted model (KV-cached, batched).",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="model directory from `python -m convert`, or 'smollm2' (the embedded default, "
        "fetched and converted on first use); default with --yoro: the base the YORO nets "
        "were trained on",
    )
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--no-stream", action="store_true", help="print only when finished")
    parser.add_argument(
        "--scan",
        action="store_true",
        help="keep the layers stacked under lax.scan: compiles the full model ~3x faster, "
        "but decodes ~10%% (full model) to ~35%% (YORO) slower on CPU (docs/DESIGN.md §8)",
    )
    parser.add_argument(
        "--yoro", default=None, help="trained YORO nets (a directory from training) to decode with"
    )
    parser.add_argument(
        "--compare", action="store_true", help="with --yoro: print full-model and YORO answers"
    )
    parser.add_argument(
        "--speculative",
        type=int,
        nargs="?",
        const=DEFAULT_K,
        default=None,
        metavar="K",
        help="with --yoro: the full model's exact output, YORO drafting K tokens per verify "
        f"pass (default K: {DEFAULT_K}; docs/DESIGN.md §7)",
    )
    return parser


def stream_printer(tokenizer: Any, file: Any = None) -> Callable[[list[list[int]]], None]:
    """An ``on_update`` callback that prints row 0's new text as it arrives."""
    printed = [""]

    def update(rows: list[list[int]]) -> None:
        text = tokenizer.decode(rows[0], skip_special_tokens=True)
        if text.startswith(printed[0]):
            out = file or sys.stdout
            out.write(text[len(printed[0]) :])
            out.flush()
            printed[0] = text

    return update


def _undecodable(text: str) -> tuple[int, int] | None:
    """(position, byte) of the first byte the OS could not decode as UTF-8: Python keeps
    such argv bytes as lone surrogates, which no tokenizer accepts."""
    for position, char in enumerate(text):
        if 0xDC80 <= ord(char) <= 0xDCFF:
            return position, ord(char) - 0xDC00
    return None


def main(argv: list[str] | None = None) -> int:
    from yoro_jax.checkpoint import CheckpointError, recorded_base, resolve_nets
    from yoro_jax.config import ConfigError

    args = build_parser().parse_args(argv)
    for flag, given in (("--compare", args.compare), ("--speculative", args.speculative)):
        if given is not None and given is not False and not args.yoro:
            print(f"error: {flag} needs --yoro (trained YORO nets)", file=sys.stderr)
            return 2
    if args.max_new_tokens < 1:
        print(f"error: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    if any(not p.strip() for p in args.prompt):
        print("error: --prompt is empty; give the text to answer", file=sys.stderr)
        return 2
    for number, text in enumerate(args.prompt, 1):
        bad = _undecodable(text)
        if bad is not None:
            print(
                f"error: --prompt {number} is not UTF-8 text (byte 0x{bad[1]:02x} at character "
                f"{bad[0]}); give it in UTF-8 (e.g. iconv -t utf-8)",
                file=sys.stderr,
            )
            return 2
    if args.speculative is not None and args.speculative < 1:
        print(f"error: --speculative K needs K >= 1, got {args.speculative}", file=sys.stderr)
        return 2
    if args.model is None and args.yoro is None:
        print("error: give --model DIR (or --yoro RUN/export to use its base)", file=sys.stderr)
        return 2
    try:
        if args.yoro is not None:  # nets, or a training run (its export/, as lm-eval does)
            args.yoro = resolve_nets(args.yoro)
        if args.model is None:
            args.model = recorded_base(args.yoro)
        model = resolve_model(args.model, dtype=args.dtype)
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
        decoders = make_decoders(
            model, args.yoro, args.compare, unscan=not args.scan, speculative=args.speculative
        )
        if not args.scan:  # the decoders hold their own copy: let the stack go
            model = dataclasses.replace(model, params=None)
    except (CheckpointError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if model.tokenizer is None:
        print(f"error: {args.model} has no tokenizer files", file=sys.stderr)
        return 2
    prompts = [encode_prompt(model.tokenizer, p, args.chat, args.system) for p in args.prompt]
    context = model.config.max_position_embeddings
    for number, ids in enumerate(prompts, 1):
        if len(ids) + args.max_new_tokens > context:  # before any cache is allocated
            print(
                f"error: prompt {number} is {len(ids)} tokens; with --max-new-tokens "
                f"{args.max_new_tokens} that passes the model's context of {context} tokens "
                "(shorten the prompt or ask for fewer new tokens)",
                file=sys.stderr,
            )
            return 2
    eos, pad = special_ids(model.config, model.tokenizer)
    stream = len(prompts) == 1 and len(decoders) == 1 and not args.no_stream
    answers = {}
    for label, (decoder, params, layers) in decoders.items():
        per = layers if isinstance(layers, str) else f"{layers} decoder layers per generated token"
        print(f"[{label}: {per}]", file=sys.stderr)
        stats: dict[str, Any] = {}
        answers[label] = generate_tokens(
            decoder,
            params,
            prompts,
            max_new_tokens=args.max_new_tokens,
            eos_ids=eos,
            pad_id=pad,
            sampling=sampling,
            seed=args.seed,
            tokenizer=model.tokenizer,
            stop=args.stop,
            on_update=stream_printer(model.tokenizer) if stream else None,
            stats=stats,
        )
        if stats:
            print(
                f"[{label}: {stats['tokens_per_verify']:.2f} tokens per verify pass, "
                f"{stats['acceptance_rate']:.0%} of drafts accepted, "
                f"{stats['verify_passes']} passes]",
                file=sys.stderr,
            )
        needed = [c.reasoning_layers for c in answers[label] if c.reasoning_layers is not None]
        if needed and label != "full":
            print(f"[{label}: reasoning layers run per prompt: {needed}]", file=sys.stderr)
    if stream:
        print()
        return 0
    for row, prompt in enumerate(args.prompt):
        print(f"### {prompt}")
        for label, completions in answers.items():
            prefix = f"[{label}] " if len(answers) > 1 else ""
            print(f"{prefix}{completions[row].text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
