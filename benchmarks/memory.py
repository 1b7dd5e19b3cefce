"""Training memory for the TinyLlama-1.1B target: hand estimate vs XLA's compiled analysis.

    python -m benchmarks.memory [--batch 4] [--prompt 256] [--response 256] [--remat]

Compiles (does not run) the real YORO train step for TinyLlama-1.1B shapes from abstract
arrays, and prints the estimate per item next to ``compiled.memory_analysis()``:
arguments (frozen weights, trainable nets, optimizer state, batch), outputs, and the
temporaries XLA plans (activations kept for the backward pass, gradients, logits chunks).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

from benchmarks.common import markdown_table, tree_bytes
from train.config import LossSection
from train.step import loss_options, train_step
from yoro_jax.config import LlamaConfig
from yoro_jax.llama import init_params
from yoro_jax.yoro import Yoro, YoroConfig, init_trainable

TINYLLAMA = LlamaConfig(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
GiB = 2**30


def activation_estimate(
    cfg: LlamaConfig,
    ycfg: YoroConfig,
    batch: int,
    prompt: int,
    response: int,
    dtype_bytes: int,
    remat: bool,
    chunk: int,
) -> int:
    """Bytes kept for the backward pass of the trainable path (frozen blocks need none).

    Per layer and token: inputs of the 7 projections and 2 norms, SwiGLU intermediates,
    plus f32 attention scores and probabilities [H, T]; with remat only each layer's input.
    Layers on the gradient path: compensation (Lc) + YORO-path coherence (C), over all T
    tokens; plus the MLPs' activations and one [B, chunk, V] f32 logits chunk (and its
    gradient) under the chunked, rematerialised loss.
    """
    d, f, h, kv = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        (cfg.num_key_value_heads * cfg.head_dim),
    )
    tokens = batch * (prompt + response)
    t = prompt + response
    per_token_layer = dtype_bytes * (6 * d + 2 * kv + 4 * f) + 4 * 2 * h * t
    layers = ycfg.compensation_layers + ycfg.coherence_layers
    kept = tokens * dtype_bytes * d * layers if remat else tokens * per_token_layer * layers
    mlps = tokens * dtype_bytes * d * 2 * (ycfg.adaptation_layers + ycfg.concatenation_layers)
    logits = 2 * batch * chunk * cfg.vocab_size * 4
    return kept + mlps + logits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)

    cfg, ycfg = TINYLLAMA, YoroConfig()  # the reference split E2 C2 Lc2 La2 Lk1
    dtype = jnp.dtype(args.dtype)
    model = Yoro(cfg, ycfg, dtype, remat=args.remat)
    tx = optax.adamw(1e-4)
    frozen = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))
    trainable = jax.eval_shape(lambda: init_trainable(ycfg, cfg, jax.random.key(0)))
    state = {
        "trainable": trainable,
        "opt_state": jax.eval_shape(tx.init, trainable),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        "tokens_seen": jax.ShapeDtypeStruct((), jnp.int32),
    }
    b, p, r, k = args.batch, args.prompt, args.response, 8
    sds = jax.ShapeDtypeStruct
    batch = {
        "tokens": sds((b, p + r), jnp.int32),
        "valid": sds((b, p + r), bool),
        "targets": sds((b, r), jnp.int32),
        "target_mask": sds((b, r), bool),
        "top_ids": sds((b, r, k), jnp.int32),
        "top_logprobs": sds((b, r, k), jnp.float32),
    }
    loss_opts = loss_options(LossSection(soft_temperature=1.0, logits_chunk=args.chunk))
    lowered = train_step.lower(
        model, frozen, state, batch, tx=tx, prompt_len=p, loss_opts=loss_opts
    )
    analysis = lowered.compile().memory_analysis()

    frozen_b, trainable_b = tree_bytes(frozen), tree_bytes(trainable)
    opt_b, batch_b = tree_bytes(state["opt_state"]), tree_bytes(batch)
    act_b = activation_estimate(cfg, ycfg, b, p, r, dtype.itemsize, args.remat, args.chunk)
    grads_b = trainable_b  # f32 gradients of the trainable pytree
    rows = [
        ["frozen base weights", f"{frozen_b / GiB:.3f}", ""],
        ["trainable nets (f32 master)", f"{trainable_b / GiB:.3f}", ""],
        ["optimizer state (AdamW mu, nu)", f"{opt_b / GiB:.3f}", ""],
        ["batch", f"{batch_b / GiB:.4f}", ""],
        [
            "**arguments**",
            f"{(frozen_b + trainable_b + opt_b + batch_b) / GiB:.3f}",
            f"{analysis.argument_size_in_bytes / GiB:.3f}",
        ],
        [
            "**outputs** (new trainable + optimizer state; donated)",
            f"{(trainable_b + opt_b) / GiB:.3f}",
            f"{analysis.output_size_in_bytes / GiB:.3f}",
        ],
        ["activations kept for backward (estimate)", f"{act_b / GiB:.3f}", ""],
        ["gradients", f"{grads_b / GiB:.3f}", ""],
        [
            "**temporaries**",
            f"{(act_b + grads_b) / GiB:.3f}",
            f"{analysis.temp_size_in_bytes / GiB:.3f}",
        ],
        ["activations per token (estimate, MiB)", f"{act_b / (b * (p + r)) / 2**20:.3f}", ""],
    ]
    print(
        f"\nTinyLlama-1.1B YORO train step, {args.dtype} compute, batch {b}, prompt {p}, "
        f"response {r}, remat {args.remat}, logits chunk {args.chunk} "
        f"(compiled for {jax.devices()[0].platform}, not run)\n"
    )
    print(markdown_table(["item", "estimate GiB", "XLA memory_analysis GiB"], rows))


if __name__ == "__main__":
    main()
