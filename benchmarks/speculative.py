"""Self-speculative decoding on SmolLM2 with trained nets: full vs YORO vs speculative.

    python -m benchmarks.speculative [--yoro runs/smollm2-cpu/export] [--ks 1 2 3 4 6]

Greedy chat answers to the 8 benchmark prompts (never in any training set), layers
unscanned (the generation default), one process:

1. per-step costs at batch 1: a full decode step, a YORO draft step and a verify pass over
   T = k + 1 tokens (all N layers and the LM head; jitted, best of 20), relative to the
   full step;
2. for each k at batch 1 (and ``--ks-batched``, the default and the best k at batch 8):
   tokens/s of the full model, YORO and speculative decoding, tokens kept per verify pass (tau), the
   per-token acceptance alpha that explains tau ((1 - alpha^(k+1)) / (1 - alpha) = tau),
   the cost model of docs/DESIGN.md §7 (speed-up = tau / (k c_draft + c_verify(k+1)))
   next to the measured speed-up, and the alpha the 1.5x goal would need at that k;
3. what a cache slot per row costs (batch 8 decode step, per-row slots / one slot);
4. whether the speculative output is the full model's, token for token (where a row
   differs, the full model's top-2 logit gap at the first difference is printed: a gap
   below float tolerance is a summation-order tie, anything else a bug).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import PROMPTS, best_of, default_model_dir, markdown_table
from yoro_jax import llama
from yoro_jax.batch import left_pad
from yoro_jax.checkpoint import load_model, load_yoro
from yoro_jax.decoders import LlamaDecoder, YoroDecoder, step, unscanned
from yoro_jax.generate import encode_prompt, generate_tokens, special_ids
from yoro_jax.speculative import DEFAULT_K, SpeculativeDecoder
from yoro_jax.yoro import Yoro

GOAL = 1.5  # speculative / full tokens/s at batch 1


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens kept per verify pass when each proposal survives with probability alpha."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def alpha_for(tau: float, k: int) -> float:
    """The per-token acceptance that gives ``tau`` tokens per pass (bisection)."""
    if tau >= k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < tau else (lo, mid)
    return (lo + hi) / 2


def step_costs(cfg, frozen, yoro_params, model, prompt, ks, repeats=20):
    """Seconds of one full decode step, one YORO draft step, and a verify of T tokens."""
    tokens, valid = left_pad([prompt], 64, 0)
    width = 64 + 64
    kv_valid = jnp.zeros((1, width), bool).at[:, :64].set(jnp.asarray(valid))
    full, draft = LlamaDecoder(cfg), YoroDecoder(model)
    _, full_caches = jax.jit(full.prefill)(frozen, tokens, valid, kv_valid)
    _, draft_caches = jax.jit(draft.prefill)(yoro_params, tokens, valid, kv_valid)
    position = jnp.asarray(valid.sum(1))[:, None]

    def timed(fn, *args):
        return best_of(lambda: jax.block_until_ready(fn(*args)), repeats)

    one = jnp.ones((1, 1), jnp.int32) * 5
    valid1 = kv_valid.at[:, 64].set(True)
    decode = jax.jit(functools.partial(step, full))
    drafting = jax.jit(functools.partial(step, draft))
    costs = {
        "full": timed(decode, frozen, full_caches, one, position, valid1, 64),
        "draft": timed(drafting, yoro_params, draft_caches, one, position, valid1, 64),
    }

    @jax.jit
    def extend(params, caches, tokens, positions, kv_valid, slot):  # a verify pass: + head
        hidden, caches = full.extend(params, caches, tokens, positions, kv_valid, slot)
        return full.head(params, hidden), caches

    for k in ks:
        t = k + 1
        valid_t = kv_valid.at[:, 64 : 64 + t].set(True)
        toks = jnp.full((1, t), 5, jnp.int32)
        positions = position + jnp.arange(t)[None]
        costs[f"verify{t}"] = timed(extend, frozen, full_caches, toks, positions, valid_t, 64)
    return costs


def per_row_slot_cost(cfg, frozen, prompt, batch=8, repeats=20) -> float:
    """A full decode step at batch ``batch`` with one cache slot per row (what speculative
    decoding runs: rows advance by different counts) over the same step with one slot for
    the batch."""
    tokens, valid = left_pad([prompt] * batch, 64, 0)
    kv_valid = jnp.zeros((batch, 128), bool).at[:, :64].set(jnp.asarray(valid)).at[:, 64].set(True)
    full = LlamaDecoder(cfg)
    _, caches = jax.jit(full.prefill)(frozen, tokens, valid, kv_valid.at[:, 64].set(False))
    position = jnp.asarray(valid.sum(1))[:, None]
    one = jnp.full((batch, 1), 5, jnp.int32)
    decode = jax.jit(functools.partial(step, full))
    times = {
        name: best_of(
            lambda slot=slot: jax.block_until_ready(
                decode(frozen, caches, one, position, kv_valid, slot)
            ),
            repeats,
        )
        for name, slot in (
            ("shared", jnp.int32(64)),
            ("per row", jnp.full((batch,), 64, jnp.int32)),
        )
    }
    return times["per row"] / times["shared"]


def identity_report(cfg, frozen, prompts, full_out, spec_out) -> tuple[bool, list[str]]:
    """Whether every row is identical; for rows that are not, the top-2 gap at the first
    difference under the full model (teacher forcing on the shared prefix)."""
    notes, identical = [], True
    forward = jax.jit(llama.forward, static_argnums=0)
    for row, (a, b) in enumerate(zip(full_out, spec_out, strict=True)):
        if a == b:
            continue
        identical = False
        i = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        if i is None:
            notes.append(f"row {row}: same tokens, lengths {len(a)} vs {len(b)}")
            continue
        seq = np.asarray([list(prompts[row]) + a[:i]], np.int32)
        logits = np.asarray(forward(cfg, frozen, seq, np.ones_like(seq, bool)))[0, -1]
        gap = float(logits[a[i]] - logits[b[i]])
        notes.append(f"row {row}: first difference at token {i}, full-model logit gap {gap:.2e}")
    return identical, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--yoro", default="runs/smollm2-cpu/export", help="trained nets")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--ks-batched", type=int, nargs="+", default=[1, 4], help="k at batch > 1 (+ best k)"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if not (Path(args.yoro) / "yoro_config.json").is_file():
        parser.error(
            f"--yoro {args.yoro}: no trained nets there; run the README's main job first "
            "(it writes runs/smollm2-cpu/export)"
        )

    base = load_model(default_model_dir())
    cfg, tok = base.config, base.tokenizer
    ycfg, trainable, _ = load_yoro(args.yoro, base=base)
    model = Yoro(cfg, ycfg)
    frozen, trainable = unscanned((base.params, trainable))
    params = (frozen, trainable)
    eos, pad = special_ids(cfg, tok)
    prompts = [encode_prompt(tok, p, chat=True) for p in PROMPTS]
    opts = dict(max_new_tokens=args.new_tokens, eos_ids=eos, pad_id=pad)

    costs = step_costs(cfg, frozen, params, model, prompts[0], args.ks)
    c_draft = costs["draft"] / costs["full"]
    print(
        f"\nSmolLM2-135M-Instruct float32, nets {args.yoro} ({ycfg.prompt_context} context, "
        f"{ycfg.nets} nets), {args.new_tokens} new tokens, greedy; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}\n"
    )
    cost_rows = [["full decode step", f"{costs['full'] * 1e3:.1f}", "1.00"]]
    cost_rows.append(["YORO draft step", f"{costs['draft'] * 1e3:.1f}", f"{c_draft:.2f}"])
    for k in args.ks:
        t = costs[f"verify{k + 1}"]
        cost_rows.append([f"verify pass, T={k + 1}", f"{t * 1e3:.1f}", f"{t / costs['full']:.2f}"])
    print(markdown_table(["batch 1, one call", "ms", "x full step"], cost_rows))
    row_slot_cost = per_row_slot_cost(cfg, frozen, prompts[0])
    print(f"\nfull decode step at batch 8, a cache slot per row / one slot: {row_slot_cost:.2f}")

    full = LlamaDecoder(cfg)

    def run(decoder, rows, stats=None):
        own = frozen if decoder is full else params
        return [c.tokens for c in generate_tokens(decoder, own, rows, **opts, stats=stats)]

    rows_out, headline, identical_all, notes_all = [], {}, True, []
    best_k = DEFAULT_K
    for batch in args.batch:
        rows = prompts[:batch]
        full_tokens = run(full, rows)
        n_tokens = sum(map(len, full_tokens))
        full_s = best_of(lambda rows=rows: run(full, rows), args.repeats)
        yoro_tokens = run(YoroDecoder(model), rows)
        yoro_s = best_of(lambda rows=rows: run(YoroDecoder(model), rows), args.repeats)
        yoro_tps = sum(map(len, yoro_tokens)) / yoro_s
        full_tps = n_tokens / full_s
        ks = args.ks if batch == 1 else sorted({DEFAULT_K, best_k, *args.ks_batched})
        measured = {}
        for k in ks:
            spec = SpeculativeDecoder(YoroDecoder(model), k=k)
            stats: dict = {}
            spec_tokens = run(spec, rows, stats)
            identical, notes = identity_report(cfg, frozen, rows, full_tokens, spec_tokens)
            identical_all &= identical
            notes_all += [f"bs {batch}, k {k}: {n}" for n in notes]
            spec_s = best_of(lambda spec=spec, rows=rows: run(spec, rows), args.repeats)
            speedup = (sum(map(len, spec_tokens)) / spec_s) / full_tps
            tau = stats["tokens_per_verify"]
            c_verify = costs[f"verify{k + 1}"] / costs["full"] if f"verify{k + 1}" in costs else 1
            predicted = tau / (k * c_draft + c_verify)
            need = GOAL * (k * c_draft + c_verify)
            alpha_needed = alpha_for(need, k) if need <= k + 1 else float("nan")
            measured[k] = speedup
            rows_out.append(
                [
                    batch,
                    k,
                    f"{full_tps:.1f}",
                    f"{yoro_tps:.1f}",
                    f"{speedup * full_tps:.1f}",
                    f"{speedup:.2f}",
                    f"{predicted:.2f}" if batch == 1 else "",
                    f"{tau:.2f}",
                    f"{alpha_for(tau, k):.2f}",
                    f"{alpha_needed:.2f}" if batch == 1 else "",
                    "yes" if identical else "NO",
                ]
            )
            if batch == 1 and k == DEFAULT_K:
                headline = {"speedup": speedup, "tau": tau}
        if batch == 1:
            best_k = max(measured, key=measured.get)
            headline["best_k"], headline["best"] = best_k, measured[best_k]
        elif DEFAULT_K in measured:
            headline[f"bs{batch}"] = measured[DEFAULT_K]
    print()
    print(
        markdown_table(
            [
                "batch",
                "k",
                "full tok/s",
                "YORO tok/s",
                "speculative tok/s",
                "speculative / full",
                "cost model",
                "tokens per verify",
                "alpha",
                f"alpha for {GOAL}x",
                "output = full",
            ],
            rows_out,
        )
    )
    for note in notes_all:
        print(f"  {note}")
    print(
        "\n(cost model: tau / (k c_draft + c_verify(k+1)) with the step costs above; tokens "
        "per verify pass per row; alpha: the per-token acceptance explaining tau)"
    )
    batches = "".join(
        f"speculative_vs_full_{key}={value:.2f} "
        for key, value in headline.items()
        if key.startswith("bs")
    )
    line = (
        f"result: speculative_vs_full_bs1={headline.get('speedup', float('nan')):.2f} "
        f"accept_len={headline.get('tau', float('nan')):.2f} best_k={headline.get('best_k')} "
        f"best_vs_full_bs1={headline.get('best', float('nan')):.2f} {batches}"
        f"draft_cost={c_draft:.2f} per_row_slot_cost={row_slot_cost:.2f} "
        f"identical={'yes' if identical_all else 'no'}"
    )
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
