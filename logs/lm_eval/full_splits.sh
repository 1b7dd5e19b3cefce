#!/bin/bash
# The full standard splits, full model then YORO (the main job's nets), through the CLI.
# Run from the repo root with the venv active: bash logs/lm_eval/full_splits.sh
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
TASKS=offline_copa,offline_arc_challenge,offline_arc_easy,offline_openbookqa,offline_winogrande,offline_piqa,offline_boolq,offline_lambada_openai
for MODE in full yoro; do
  ARGS="model=smollm2"; [ $MODE = yoro ] && ARGS="yoro=runs/smollm2-cpu,mode=yoro"
  /usr/bin/time -v python -m yoro_jax.eval --model_args $ARGS --tasks $TASKS \
    --output_path logs/lm_eval/$MODE > logs/lm_eval/$MODE.log 2> logs/lm_eval/$MODE.err
done
