#!/usr/bin/env bash
# The issue-14 measurements of this session, one after another on a quiet machine:
# the splits table, then the longer CPU config, then held-out evaluation of its nets.
set -uo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export PYTHONUNBUFFERED=1
python -m train.splits --config configs/smollm2-cpu.yaml --splits 2,2,2 2,2,4 4,4,2 \
    --prompts 320 --steps 120 --out runs/splits > logs/splits.log 2> logs/splits.err
echo "splits rc=$?" >> logs/issue14_runs.status
/usr/bin/time -v python -m train --config configs/smollm2-cpu-long.yaml \
    > logs/long-run.log 2> logs/long-run.err
echo "long rc=$?" >> logs/issue14_runs.status
python -m train.evaluate --run runs/smollm2-cpu-long \
    --prompts ../shared/data/self_instruct_user_oriented.jsonl --format self-instruct \
    --limit 64 --generations 16 --samples 3 --out logs/evaluate-long.json \
    > logs/evaluate-long.log 2> logs/evaluate-long.err
echo "evaluate rc=$?" >> logs/issue14_runs.status
