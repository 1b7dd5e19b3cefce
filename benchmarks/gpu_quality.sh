#!/usr/bin/env bash
# The method's quality at scale (issue 14): configs/smollm2-gpu.yaml (SmolLM2, bf16, the
# whole ShareGPT pool) on one GPU, about 10 minutes, then held-out agreement.
#
# The device machine reaches no network and takes at most 64 MiB per call, while the
# SmolLM2 GGUF alone is 94 MiB: the inputs go in two halves, in two calls made back to back
# (the machine stays warm 30 s after a call), and are staged outside the repo there.
#
#   here:          bash benchmarks/gpu_quality.sh prepare        # -> .gpu/a, .gpu/b (ignored)
#   device call 1: bash benchmarks/gpu_quality.sh stage a        carry [".gpu/a"]
#   device call 2: bash benchmarks/gpu_quality.sh run            carry [".gpu/b"], timeout 600
#
# `run` stages .gpu/b, installs the carried wheels (the device image has jax, flax, optax,
# orbax, transformers; not grain, array-record, gguf, tensorboardX), trains under a
# 520 s limit (a run cut there still has its validation metrics) and writes to $OUT:
# train.log, metrics.jsonl. Untested on a GPU so far (none was lent).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/yoro-gpu

prepare() {
    local cache="${YORO_JAX_CACHE:-$HOME/.cache/yoro_jax}"
    local gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
    local prompts="$cache/sharegpt_first_turns.jsonl"
    [[ -f $gguf && -f $prompts ]] || {
        echo "prepare: run the main job once first (it fetches $gguf and $prompts)" >&2
        exit 1
    }
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >>.git/info/exclude
    rm -rf .gpu && mkdir -p .gpu/a/whl .gpu/a/cache .gpu/b
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/a/whl \
        grain==0.2.18 array-record==0.8.6 gguf==0.19.0 tensorboardX==2.6.5 portpicker==1.6.0
    gzip -c "$prompts" >.gpu/a/cache/sharegpt_first_turns.jsonl.gz
    split -n 2 -d "$gguf" .gpu/gguf.part
    mv .gpu/gguf.part00 .gpu/a/cache/ && mv .gpu/gguf.part01 .gpu/b/
    sha256sum "$gguf" | cut -d' ' -f1 >.gpu/b/gguf.sha256
    du -sh .gpu/a .gpu/b
}

stage() {
    mkdir -p "$STAGE" && cp -r ".gpu/$1/." "$STAGE/" && ls -la "$STAGE"
}

run() {
    stage b || exit 1
    local cache="$STAGE/cache"
    cat "$cache/gguf.part00" "$STAGE/gguf.part01" >"$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "$(cat "$STAGE/gguf.sha256")  $cache/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 1
    gunzip -kf "$cache/sharegpt_first_turns.jsonl.gz"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$STAGE"/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD YORO_JAX_CACHE=$cache PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv
    python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, jax.devices())"
    local out="${OUT:-runs}" start=$SECONDS
    timeout 520 python3 -m train --config configs/smollm2-gpu.yaml 2>&1 \
        | tr '\r' '\n' | grep -v '^train: \|^teacher responses: ' | tee "$out/train.log"
    echo "train: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$out/train.log"
    cp runs/smollm2-gpu/metrics.jsonl "$out/" 2>/dev/null
    python3 - runs/smollm2-gpu/metrics.jsonl <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
val = [r for r in rows if r["split"] == "val"]
for r in val:
    print(f"step {r['step']:.0f}: tokens {r.get('tokens_seen', 0):.0f} top-1 {r['top1']:.3f} KL {r['kl']:.3f}")
if val:
    last = val[-1]
    print(f"result: step={last['step']:.0f} val_top1={last['top1']:.3f} val_kl={last['kl']:.3f}")
EOF
}

case "${1:-}" in
    prepare) prepare ;;
    stage) stage "${2:?stage a|b}" ;;
    run) run ;;
    *) echo "usage: $0 prepare | stage a|b | run" >&2; exit 2 ;;
esac
