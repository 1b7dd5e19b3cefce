#!/bin/bash
# The one-command comparison (full / YORO / speculative) on the standard group's tasks,
# 100 documents each (MMLU left out: 57 subjects x 100 is an hour per mode on 2 cores).
# Run from the repo root with the venv active: bash logs/lm_eval/compare.sh
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m yoro_jax.eval.compare --yoro runs/smollm2-cpu --limit 100 --out logs/lm_eval/compare \
  --tasks offline_copa offline_arc_easy offline_arc_challenge offline_piqa offline_winogrande \
          offline_openbookqa offline_boolq offline_hellaswag offline_lambada_openai \
  > logs/lm_eval/compare.log 2> logs/lm_eval/compare.err
echo "compare rc=$?" >> logs/lm_eval/timings.txt
