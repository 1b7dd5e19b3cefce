#!/bin/bash
# The full standard splits through the CLI, one task per process (each result is kept as
# it finishes), smallest first; full model, then YORO with the main job's nets.
# Run from the repo root with the venv active: [TASKS="..."] bash logs/lm_eval/full_splits.sh [full|yoro]
set -uo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
TASKS="${TASKS:-offline_copa offline_arc_challenge offline_openbookqa offline_winogrande offline_arc_easy offline_piqa offline_lambada_openai offline_boolq}"
for MODE in ${@:-full yoro}; do
  ARGS="model=smollm2"; [ "$MODE" = yoro ] && ARGS="yoro=runs/smollm2-cpu,mode=yoro"
  for TASK in $TASKS; do
    start=$(date +%s)
    python -m yoro_jax.eval --model_args $ARGS --tasks $TASK --output_path logs/lm_eval/$MODE \
      > logs/lm_eval/$MODE-$TASK.log 2> logs/lm_eval/$MODE-$TASK.err
    echo "$MODE $TASK rc=$? $(( $(date +%s) - start )) s" >> logs/lm_eval/timings.txt
  done
done
