#!/usr/bin/env bash
# Quality with the real stand-in SmolLM2-135M-Instruct: base (three prompt variants) vs fine-tuned, through
# prep → train → merge → eval on ../shared's rows, then batched vs one-at-a-time eval throughput.
#   usage: bench/quality_smollm2.sh SHARED OUT [--set k=v ...]
set -euo pipefail
shared=$1; out=$2; shift 2
runs=/tmp/bench-quality
sets=(--set runs_dir=$runs --set data.source=$shared/data/sql-create-context "$@")
for job in prep train merge eval; do
  python -m jobs.cli $job --config configs/smollm2.yaml "${sets[@]}" 2>&1 | grep -vE 'it/s\]|s/it\]' | tail -n 25
done
run=$runs/smollm2
cp $run/eval/report.json $out/quality_report.json; cp $run/eval/report.md $out/quality_report.md
cp $run/train.done $out/quality_train_done.json
python bench/eval_throughput.py --model $run/merged --rows $run/data/validation.jsonl --out $out
