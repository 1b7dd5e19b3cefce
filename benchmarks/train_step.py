"""Training-step throughput: yoro-jax's jitted step (stored frozen features, and
recomputing them) vs a plain PyTorch/transformers step; teacher generation speed.

    python -m benchmarks.train_step [--batch 8] [--prompt-len 64] [--response-len 64]

All rows run the same YORO teacher-forcing step on SmolLM2 (float32, CPU, reference
split E2 C2 Lc2 La2 Lk1): forward over a left-padded prompt | right-padded response
batch, sparse top-k KL (T_soft = 3) over the response positions, backward into the
trainable nets only, AdamW update with global-norm clipping. "stored features" reads what
the frozen blocks compute (docs/DESIGN.md §4) from the batch, as training from teacher
shards with ``teacher.features: true`` does; "recompute" runs them every step. The
PyTorch side is written here for the benchmark (it is not part of the library):
transformers' own ``LlamaDecoderLayer`` modules for the frozen blocks and the
compensation layers. The default variant's step (preset "exact", stored features) and
the teacher's answer generation (recording the features) are timed too.
"""

from __future__ import annotations

import argparse
import copy
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import default_model_dir, markdown_table
from train.config import LossSection, RunConfig
from train.data import collate
from train.step import loss_options, make_optimizer, train_step
from yoro_jax.checkpoint import load_model
from yoro_jax.generate import RecordingDecoder, generate_tokens
from yoro_jax.yoro import Yoro, YoroConfig, init_trainable

YCFG = YoroConfig(2, 2, 2, 2, 1)
EXACT = YoroConfig.preset("exact")
TOP_K, TEMPERATURE = 10, 3.0


def synthetic_batch(batch: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    """Mixed real lengths (padding on both sides of the boundary), random teacher top-k."""
    rng = np.random.RandomState(seed)
    examples = []
    for row in range(batch):
        p = prompt_len - (row * prompt_len) // (2 * batch)
        r = response_len - (row * response_len) // (2 * batch)
        logp = np.sort(np.log(rng.dirichlet(np.ones(TOP_K) * 0.3, size=r)), -1)[:, ::-1]
        examples.append(
            {
                "prompt": rng.randint(10, vocab, p).astype(np.int32),
                "response": rng.randint(10, vocab, r).astype(np.int32),
                "top_ids": rng.randint(0, vocab, (r, TOP_K)).astype(np.int32),
                "top_logprobs": logp.astype(np.float32),
            }
        )
    return collate(examples, pad_id=0, top_k=TOP_K)


def time_steps(step, n: int) -> float:
    step()  # compile / warm up
    step()
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


# ------------------------------------------------------------------------------- JAX side
def jax_step_fn(model_dir, batch, ycfg=YCFG, features: bool = False, remat_logits=True):
    base = load_model(model_dir)
    cfg = RunConfig()
    cfg.loss.soft_temperature, cfg.loss.logits_chunk = TEMPERATURE, 32
    model = Yoro(base.config, ycfg, jnp.float32)
    trainable = init_trainable(ycfg, base.config, jax.random.key(0), base.params)
    tx = make_optimizer(cfg, total_steps=1000)
    state = {
        "trainable": trainable,
        "opt_state": tx.init(trainable),
        "step": jnp.int32(0),
        "rng": jax.random.key_data(jax.random.key(0)),
        "tokens_seen": jnp.int32(0),
    }
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if k != "prompt_len"}
    if features:  # what the teacher shards hold (computed once, outside the timed step)
        frozen_features = jax.jit(model.frozen_features, static_argnums=3)
        arrays |= frozen_features(
            base.params, arrays["tokens"], arrays["valid"], batch["prompt_len"]
        )
    opts = loss_options(
        LossSection(soft_temperature=TEMPERATURE, logits_chunk=32, remat_logits=remat_logits)
    )
    holder = {"state": state}

    def step():
        holder["state"], metrics = train_step(
            model,
            base.params,
            holder["state"],
            arrays,
            tx=tx,
            prompt_len=batch["prompt_len"],
            loss_opts=opts,
        )
        return float(metrics["loss"])

    return step


def teacher_prompts_per_s(model_dir, batch, new_tokens: int) -> float:
    """The teacher answering the batch's prompts (greedy, recording the features)."""
    base = load_model(model_dir)
    n = base.config.num_hidden_layers
    decoder = RecordingDecoder(base.config, jnp.float32, (2, 26, 27, 28, 29, n))
    prompts = [row[v].tolist() for row, v in zip(batch["tokens"], batch["valid"], strict=True)]
    prompts = [
        p[: len(p) - int(r)] for p, r in zip(prompts, batch["target_mask"].sum(1), strict=True)
    ]

    def run():
        generate_tokens(
            decoder,
            base.params,
            prompts,
            max_new_tokens=new_tokens,
            eos_ids=[],
            pad_id=0,
            record_top_k=TOP_K,
        )

    return len(prompts) / time_steps(run, 1)


# --------------------------------------------------------------------------- PyTorch side
def torch_step_fn(gguf, batch, threads: int):
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    hf.config._attn_implementation = "sdpa"
    hf.requires_grad_(False)
    layers, n = hf.model.layers, hf.config.num_hidden_layers
    d = hf.config.hidden_size
    torch.manual_seed(0)
    compensation = nn.ModuleList(copy.deepcopy(layers[i]) for i in range(YCFG.compensation_layers))
    for module in compensation.modules():  # fresh, trainable
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
    compensation.requires_grad_(True)

    def relu_mlp(depth):
        mlp = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(d, d), nn.ReLU())])
        for m in mlp:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
        return mlp

    adapt, concat = relu_mlp(YCFG.adaptation_layers), relu_mlp(YCFG.concatenation_layers)
    trainable = [*compensation.parameters(), *adapt.parameters(), *concat.parameters()]
    opt = torch.optim.AdamW(trainable, lr=3e-4, weight_decay=0.01)

    tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)
    valid = torch.as_tensor(batch["valid"])
    p = batch["prompt_len"]
    targets_mask = torch.as_tensor(batch["target_mask"]).float()
    top_ids = torch.as_tensor(batch["top_ids"], dtype=torch.long)
    top_logprobs = torch.as_tensor(batch["top_logprobs"])
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    t = tokens.shape[1]
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    allowed = causal[None] & valid[:, None, :]
    allowed |= torch.eye(t, dtype=torch.bool)[None]  # padded rows attend to themselves
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, -1e30)[:, None]
    rope = hf.model.rotary_emb(hf.model.embed_tokens.weight[:1][None], positions)
    rope_p = tuple(x[:, :p] for x in rope)
    mask_p = mask[:, :, :p, :p]

    def run(block, h, rope_, mask_, pos):
        for layer in block:
            out = layer(h, attention_mask=mask_, position_ids=pos, position_embeddings=rope_)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def step():
        x = hf.model.embed_tokens(tokens)
        e = run(layers[: YCFG.embedding_layers], x, rope, mask, positions)
        with torch.no_grad():
            r = run(
                layers[YCFG.embedding_layers : n - YCFG.coherence_layers],
                e[:, :p],
                rope_p,
                mask_p,
                positions[:, :p],
            )
        coherence = layers[n - YCFG.coherence_layers :]
        h_reason = run(coherence, r, rope_p, mask_p, positions[:, :p])
        comp = run(compensation, e, rope, mask, positions)
        zero = adapt(torch.zeros(1, 1, d)).expand(tokens.shape[0], t - p, d)
        z = concat(torch.cat([adapt(r), zero], 1) + comp)
        h_yoro = run(coherence, z, rope, mask, positions)[:, p:]
        r_len = top_ids.shape[1]
        hidden = torch.cat([h_reason[:, -1:], h_yoro], 1)[:, :r_len]
        logits = hf.lm_head(hf.model.norm(hidden))
        log_q = torch.log_softmax(logits, -1).gather(-1, top_ids)
        log_p = torch.log_softmax(top_logprobs / TEMPERATURE, -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        loss = (kl * targets_mask).sum() / targets_mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        return float(loss)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()

    from yoro_jax.convert.smollm2 import fetch_smollm2_gguf

    model_dir = default_model_dir()
    base_cfg = load_model(model_dir).config
    batch = synthetic_batch(args.batch, args.prompt_len, args.response_len, base_cfg.vocab_size)
    tokens = int(batch["valid"].sum())
    responses = int(batch["target_mask"].sum())
    rows = []
    for name, make in (
        ("yoro-jax, stored features", lambda: jax_step_fn(model_dir, batch, features=True)),
        ("yoro-jax, recompute", lambda: jax_step_fn(model_dir, batch)),
        (
            "PyTorch + transformers (recompute)",
            lambda: torch_step_fn(fetch_smollm2_gguf(), batch, args.threads),
        ),
        (
            "yoro-jax, preset exact, stored features",
            lambda: jax_step_fn(model_dir, batch, EXACT, features=True),
        ),
        (
            "yoro-jax, stored features, logits kept (remat_logits: false)",
            lambda: jax_step_fn(model_dir, batch, features=True, remat_logits=False),
        ),
        (
            "yoro-jax, preset exact, stored features, logits kept",
            lambda: jax_step_fn(model_dir, batch, EXACT, features=True, remat_logits=False),
        ),
    ):
        seconds = time_steps(make(), args.steps)
        rows.append([name, seconds * 1e3, tokens / seconds, responses / seconds])
    teacher = teacher_prompts_per_s(model_dir, batch, args.response_len)
    torch_ms = rows[2][1]
    print(
        f"SmolLM2-135M float32 CPU, {jax.device_count()} XLA device(s); batch {args.batch}, "
        f"bucketed layout [B={args.batch}, P={batch['prompt_len']}, "
        f"R={batch['targets'].shape[1]}], {tokens} real tokens ({responses} response "
        "positions) per step"
    )
    print(
        markdown_table(["implementation", "ms / step", "tokens / s", "training tokens / s"], rows)
    )
    print(
        f"\nteacher generation (batch {args.batch}, {args.response_len} new tokens, recording "
        f"features): {teacher:.2f} prompts/s"
    )
    print(
        f"result: stored_vs_torch={torch_ms / rows[0][1]:.2f} "
        f"recompute_vs_torch={torch_ms / rows[1][1]:.2f} "
        f"exact_stored_vs_torch={torch_ms / rows[3][1]:.2f} "
        f"stored_kept_vs_torch={torch_ms / rows[4][1]:.2f} "
        f"exact_stored_kept_vs_torch={torch_ms / rows[5][1]:.2f} "
        f"teacher_prompts_per_s={teacher:.2f}"
    )


if __name__ == "__main__":
    main()
