#!/bin/bash
# Session of 2026-12-02 (issue 17), run after the README main job (whose nets YORO uses):
# the speed/parity benchmark alone on the machine, then whole splits, full model and YORO.
set -uo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m benchmarks.lm_eval_speed --limit 200 > logs/lm_eval_speed.log 2> logs/lm_eval_speed.err
echo "lm_eval_speed rc=$?" >> logs/lm_eval/timings.txt
TASKS="offline_piqa offline_arc_easy" bash logs/lm_eval/full_splits.sh full yoro
TASKS="offline_lambada_openai offline_boolq" bash logs/lm_eval/full_splits.sh full yoro
