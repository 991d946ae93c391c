#!/usr/bin/env bash
# Quality with the real stand-in SmolLM2-135M-Instruct: prep → train → merge → eval through the project's own
# jobs on ../shared's rows (configs/smollm2.yaml; base prompt variants and fine-tuned model on validation).
#   usage: [JOBS="prep train"] bench/quality_smollm2.sh SHARED OUT RUN_ID [--set k=v ...]
set -euo pipefail
shared=$1; out=$2; run_id=$3; shift 3
runs=/tmp/bench-quality
sets=(--set runs_dir=$runs --set run_id=$run_id --set data.source=$shared/data/sql-create-context "$@")
mkdir -p "$out"
for job in ${JOBS:-prep train merge eval}; do
  python -m jobs.cli $job --config configs/smollm2.yaml "${sets[@]}" 2>&1 | grep -vE 'it/s\]|s/it\]' | tail -n 25
done
run=$runs/$run_id
if [ -f $run/eval.done ]; then
  cp $run/eval/report.json $out/quality_report.json; cp $run/eval/report.md $out/quality_report.md
  cp $run/train.done $out/quality_train_done.json
  gzip -c $run/eval/predictions.jsonl > $out/quality_predictions.jsonl.gz  # to read what the failures say
fi
