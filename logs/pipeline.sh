#!/usr/bin/env bash
# The measurement pipeline of this session (commands recorded in docs/RESULTS.md).
set -x
. .venv/bin/activate
export PYTHONUNBUFFERED=1
python -m benchmarks.train_step --steps 3 > logs/train_step.log 2>&1
python -m train.evaluate --run runs/smollm2-cpu --prompts ../shared/data/self_instruct_user_oriented.jsonl \
    --format self-instruct --limit 64 --generations 16 --samples 3 --out logs/evaluate-main.json > logs/evaluate-main.log 2>&1
python -m train.ablation --config configs/smollm2-cpu.yaml --teacher-from runs/smollm2-cpu \
    --out runs/ablation --steps 160 > logs/ablation.log 2>&1
# (the splits run, python -m train.splits ..., was dropped this session for time)
python -m benchmarks.feature_precision --run runs/smollm2-cpu --batches 4 > logs/feature_precision.log 2>&1
# (a rerun of benchmarks.train_step with the remat_logits rows was dropped for time)
