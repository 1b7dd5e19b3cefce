"""Compile time: layers under ``lax.scan`` (this tree) vs the unrolled Python layer loop
(the last commit before the scan), same run, same machine.

    python -m benchmarks.compile_time [--baseline 15f0b28] [--skip-cold]

For each source tree (alternating, ``--rounds`` times; best of the rounds) a fresh Python
process (cold JAX, no persistent compilation cache)
loads SmolLM2 (float32) and calls each program once — the first call traces, lowers,
compiles and runs — then again for the steady time; compile ≈ first − steady:

- the YORO train step (preset "exact", stored frozen features, batch 8 x (64 + 64));
- YORO prefill (``generate.start``) and the YORO decode loop (``generate.advance``);
- the full model's decode loop;
- one lm-eval scoring shape (full model, 4 contexts x 64, 16 continuations x 16);
- in this tree, generation again with the layers *unscanned* (``decoders.unscanned``: a
  tuple of per-layer buffers, what the generate CLI runs by default), against the same
  baseline programs. "default" totals count what the tools run: train step and scoring on
  the stack, generation unscanned.

Then the cold command-to-first-token time of ``python -m yoro_jax.generate --model ...
--max-new-tokens 1`` for both trees (this one also with ``--scan``), next to transformers'
``generate`` in a cold process (loading the same weights from safetensors). The baseline
tree is ``git archive``d from the repository, so nothing of this checkout changes. The
workers use only APIs both trees share.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "15f0b28"  # the last commit with the unrolled layer loop
PROMPT = "Explain in two sentences why the sky is blue."


# ------------------------------------------------------------------------ worker process
def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def worker(model_dir: str) -> dict[str, float]:
    """Runs inside the tree under test (its yoro_jax / train first on sys.path)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from train.config import LossSection, RunConfig
    from train.data import collate

    tree = Path(sys.path[0]).resolve()
    # where the names live in each tree (by file: an editable install of the other tree
    # would answer an import that this tree cannot)
    if (tree / "train" / "step.py").is_file():
        from train.step import loss_options, make_optimizer, train_step
    else:
        from train.trainer import loss_options, make_optimizer, train_step
    from yoro_jax import generate
    from yoro_jax.checkpoint import load_model
    from yoro_jax.eval.scoring import score_continuations
    from yoro_jax.generate import LlamaDecoder
    from yoro_jax.sampling import SamplingConfig
    from yoro_jax.yoro import Yoro, YoroConfig, init_trainable

    if (tree / "yoro_jax" / "decoders.py").is_file():
        from yoro_jax.decoders import YoroDecoder
    else:
        from yoro_jax.yoro import YoroDecoder

    for module in (generate, YoroDecoder, train_step, score_continuations, load_model):
        source = Path(
            sys.modules[module.__module__].__file__
            if not hasattr(module, "__file__")
            else module.__file__
        ).resolve()
        if not source.is_relative_to(tree):
            raise RuntimeError(f"worker for {tree} imported {source}")
    base = load_model(model_dir)
    cfg, frozen = base.config, base.params
    out: dict[str, float] = {}

    def measure(name, call, repeats=3):
        jax.block_until_ready(call())  # first call: trace + lower + compile + run
        first = time.perf_counter() - t0[0]
        steady = []
        for _ in range(repeats):
            _, seconds = _timed(lambda: jax.block_until_ready(call()))
            steady.append(seconds)
        out[f"{name}_first_s"], out[f"{name}_steady_s"] = first, min(steady)
        out[f"{name}_compile_s"] = max(first - min(steady), 0.0)

    t0 = [0.0]

    def start_clock():
        t0[0] = time.perf_counter()

    # ---- the YORO train step (exact preset, stored features)
    ycfg = YoroConfig.preset("exact")
    model = Yoro(cfg, ycfg, jnp.float32)
    trainable = init_trainable(ycfg, cfg, jax.random.key(0), frozen)
    rng = np.random.RandomState(0)
    examples = []
    for row in range(8):
        p, r = 64 - 4 * row, 64 - 4 * row
        logp = np.sort(np.log(rng.dirichlet(np.ones(10) * 0.3, size=r)), -1)[:, ::-1]
        examples.append(
            {
                "prompt": rng.randint(10, cfg.vocab_size, p).astype(np.int32),
                "response": rng.randint(10, cfg.vocab_size, r).astype(np.int32),
                "top_ids": rng.randint(0, cfg.vocab_size, (r, 10)).astype(np.int32),
                "top_logprobs": logp.astype(np.float32),
            }
        )
    batch = collate(examples, pad_id=0, top_k=10)
    prompt_len = batch["prompt_len"]
    arrays = {k: jnp.asarray(v) for k, v in batch.items() if k != "prompt_len"}
    features = jax.jit(model.frozen_features, static_argnums=3)
    arrays |= features(frozen, arrays["tokens"], arrays["valid"], prompt_len)
    run_cfg = RunConfig()
    tx = make_optimizer(run_cfg, total_steps=1000)
    state = {
        "trainable": trainable,
        "opt_state": tx.init(trainable),
        "step": jnp.int32(0),
        "rng": jax.random.key_data(jax.random.key(0)),
        "tokens_seen": jnp.int32(0),
    }
    opts = loss_options(LossSection(soft_temperature=3.0, logits_chunk=32, hidden_weight=1.0))
    holder = {"state": state}

    def train():
        holder["state"], metrics = train_step(
            model, frozen, holder["state"], arrays, tx=tx, prompt_len=prompt_len, loss_opts=opts
        )
        return metrics["loss"]

    start_clock()
    measure("train_step", train)
    trainable = holder["state"]["trainable"]  # the step donated the initial buffers

    # ---- generation: prefill and the decode loop (batch 1, 32 new tokens)
    prompt = jnp.asarray(rng.randint(10, cfg.vocab_size, (1, 32)), jnp.int32)
    valid = jnp.ones((1, 32), bool)
    statics = {"sampling": SamplingConfig(), "eos_ids": (), "pad_id": 0, "record_top_k": 0}

    def generation(name, decoder, params, steps=32):
        def prefill():
            return generate.start(
                decoder,
                params,
                prompt,
                valid,
                jax.random.key(0),
                jnp.int32(steps + 1),
                out_len=64,
                **statics,
            )

        start_clock()
        measure(f"{name}_prefill", prefill)
        state0 = prefill()

        def decode():  # the state is donated: decode from a fresh copy each time
            state = jax.tree.map(jnp.copy, state0)
            return generate.advance(decoder, params, state, n_steps=steps, **statics)["out"]

        start_clock()
        measure(f"{name}_decode", decode)
        out[f"{name}_decode_tokens_per_s"] = steps / out[f"{name}_decode_steady_s"]

    generation("yoro", YoroDecoder(model), (frozen, trainable))
    generation("full", LlamaDecoder(cfg), frozen)
    if (tree / "yoro_jax" / "decoders.py").is_file():
        from yoro_jax import decoders

        if hasattr(decoders, "unscanned"):  # the layout generation uses by default
            loose = decoders.unscanned((frozen, trainable))
            generation("yoro_unscanned", YoroDecoder(model), loose)
            generation("full_unscanned", LlamaDecoder(cfg), loose[0])
            del loose

    # ---- one lm-eval scoring shape (full model)
    ctx = jnp.asarray(rng.randint(10, cfg.vocab_size, (4, 64)), jnp.int32)
    conts = jnp.asarray(rng.randint(10, cfg.vocab_size, (16, 16)), jnp.int32)
    owner = jnp.repeat(jnp.arange(4), 4)

    def score():
        return score_continuations(
            LlamaDecoder(cfg),
            frozen,
            ctx,
            jnp.ones((4, 64), bool),
            owner,
            conts,
            jnp.ones((16, 16), bool),
        )[0]

    start_clock()
    measure("scoring", score)
    return out


# ------------------------------------------------------------------------ parent process
def export_tree(commit: str, into: Path) -> Path:
    """The baseline's source tree, from ``git archive`` (this checkout is left alone)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def clean_env(tree: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def run_worker(tree: Path, model_dir: Path) -> dict[str, float]:
    code = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); "
        f"sys.path.insert(1, {str(REPO / 'benchmarks')!r}); import json, compile_time; "
        f"print('RESULT ' + json.dumps(compile_time.worker({str(model_dir)!r})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=clean_env(tree), capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(f"worker in {tree} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def cold_first_token(tree: Path, model_dir: Path, extra: list[str] = ()) -> float:
    """Wall time of a cold ``python -m yoro_jax.generate ... --max-new-tokens 1``."""
    cmd = [
        sys.executable,
        "-m",
        "yoro_jax.generate",
        "--model",
        str(model_dir),
        "--chat",
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "1",
        *extra,
    ]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=clean_env(tree), check=True, capture_output=True)
    return time.perf_counter() - start


def cold_transformers(hf_dir: Path) -> float:
    code = (
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        f"tok = AutoTokenizer.from_pretrained({str(hf_dir)!r}); "
        f"m = AutoModelForCausalLM.from_pretrained({str(hf_dir)!r}, dtype=torch.float32); "
        f"ids = tok.apply_chat_template([{{'role': 'user', 'content': {PROMPT!r}}}], "
        "add_generation_prompt=True, return_tensors='pt'); "
        "ids = ids['input_ids'] if hasattr(ids, 'keys') else ids; "
        "m.generate(ids, max_new_tokens=1, do_sample=False)"
    )
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
    )
    return time.perf_counter() - start


def export_hf(model_dir: Path, out: Path) -> Path:
    """The same weights as a transformers safetensors directory (set-up, not timed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from yoro_jax.convert.smollm2 import fetch_smollm2_gguf

    gguf = fetch_smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):  # a GGUF load is marked "quantized"
        del config.quantization_config
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    hf.load_state_dict(loaded.state_dict())
    hf.save_pretrained(out)
    for name in model_dir.iterdir():  # the tokenizer files saved with the model
        if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (out / name.name).write_bytes(name.read_bytes())
    return out


# (program, its key in this tree, the baseline's key for the same program)
ROWS = [
    ("YORO train step (exact, stored features)", "train_step", "train_step"),
    ("YORO prefill", "yoro_prefill", "yoro_prefill"),
    ("YORO decode loop", "yoro_decode", "yoro_decode"),
    ("full-model decode loop", "full_decode", "full_decode"),
    ("lm-eval scoring shape", "scoring", "scoring"),
]
# generation with unscanned layers (``decoders.unscanned``, the generate CLI's default)
UNSCANNED_ROWS = [
    ("YORO prefill, unscanned", "yoro_unscanned_prefill", "yoro_prefill"),
    ("YORO decode loop, unscanned", "yoro_unscanned_decode", "yoro_decode"),
    ("full-model decode loop, unscanned", "full_unscanned_decode", "full_decode"),
]
# what the tools run: train step and scoring on the stack, generation unscanned
DEFAULT_ROWS = [ROWS[0], *UNSCANNED_ROWS, ROWS[4]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="commit with the unrolled loop")
    parser.add_argument("--skip-cold", action="store_true", help="no cold-process timings")
    parser.add_argument("--rounds", type=int, default=2, help="worker runs per tree")
    args = parser.parse_args(argv)

    from benchmarks.common import default_model_dir, markdown_table

    model_dir = default_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = export_tree(args.baseline, Path(tmp) / "baseline")
        # the trees alternate, ``--rounds`` times each; each number is the best of its
        # rounds (this machine's speed drifts between processes by up to ~1.5x)
        results: dict[str, dict[str, float]] = {}
        for _ in range(args.rounds):
            for name, tree in (("scan", REPO), ("unrolled", old_tree)):
                run = run_worker(tree, model_dir)
                print(f"{name}: " + json.dumps(run), file=sys.stderr)
                best = results.setdefault(name, run)
                for key, value in run.items():
                    pick = max if key.endswith("tokens_per_s") else min
                    best[key] = pick(best[key], value)
        cold = {}
        if not args.skip_cold:
            hf_dir = export_hf(model_dir, Path(tmp) / "hf")
            cold = {
                "this_tree": cold_first_token(REPO, model_dir),
                "this_tree_scan": cold_first_token(REPO, model_dir, ["--scan"]),
                "unrolled": cold_first_token(old_tree, model_dir),
                "transformers": cold_transformers(hf_dir),
            }

    scan, old = results["scan"], results["unrolled"]
    rows = []
    for label, key, old_key in ROWS + [r for r in UNSCANNED_ROWS if f"{r[1]}_compile_s" in scan]:
        c_old, c_new = old[f"{old_key}_compile_s"], scan[f"{key}_compile_s"]
        rows.append(
            [
                label,
                f"{c_old:.2f}",
                f"{c_new:.2f}",
                f"{c_old / c_new:.2f}x",
                f"{old[f'{old_key}_steady_s'] * 1e3:.1f}",
                f"{scan[f'{key}_steady_s'] * 1e3:.1f}",
                f"{old[f'{old_key}_steady_s'] / scan[f'{key}_steady_s']:.2f}",
            ]
        )
    print(
        markdown_table(
            [
                "program",
                "compile unrolled (s)",
                "compile this tree (s)",
                "compile speed-up",
                "run unrolled (ms)",
                "run this tree (ms)",
                "run speed ratio",
            ],
            rows,
        )
    )
    print()
    layouts = [("full", "full"), ("yoro", "yoro")]
    if "full_unscanned_decode_tokens_per_s" in scan:
        layouts += [("full_unscanned", "full"), ("yoro_unscanned", "yoro")]
    tps = {
        name: scan[f"{name}_decode_tokens_per_s"] / old[f"{old_name}_decode_tokens_per_s"]
        for name, old_name in layouts
    }
    print(
        markdown_table(
            ["decode bs 1", "unrolled tok/s", "this tree tok/s", "ratio"],
            [
                [
                    name,
                    f"{old[f'{old_name}_decode_tokens_per_s']:.1f}",
                    f"{scan[f'{name}_decode_tokens_per_s']:.1f}",
                    f"{tps[name]:.2f}",
                ]
                for name, old_name in layouts
            ],
        )
    )
    if cold:
        print()
        print(
            markdown_table(
                ["cold process, command to first token", "seconds"],
                [[k, f"{v:.1f}"] for k, v in cold.items()],
            )
        )

    def total_speedup(rows):
        return sum(old[f"{o}_compile_s"] for _, _, o in rows) / sum(
            scan[f"{k}_compile_s"] for _, k, _ in rows
        )

    step_ratio = old["train_step_steady_s"] / scan["train_step_steady_s"]
    line = (
        f"result: compile_speedup={total_speedup(ROWS):.2f} "
        f"train_compile_speedup={old['train_step_compile_s'] / scan['train_step_compile_s']:.2f} "
        f"decode_ratio={tps['full']:.2f} yoro_decode_ratio={tps['yoro']:.2f} "
        f"train_step_ratio={step_ratio:.2f}"
    )
    if "full_unscanned" in tps:
        line += (
            f" default_compile_speedup={total_speedup(DEFAULT_ROWS):.2f}"
            f" unscanned_decode_ratio={tps['full_unscanned']:.2f}"
            f" unscanned_yoro_decode_ratio={tps['yoro_unscanned']:.2f}"
        )
    if cold:
        line += " " + " ".join(f"first_token_s_{k}={v:.1f}" for k, v in cold.items())
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
