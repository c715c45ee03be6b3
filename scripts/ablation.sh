#!/usr/bin/env bash
# The small-scale ablation: distil each variant (one run per seed), fine-tune it on the Wikipedia topics, then
# one report with 95 % intervals and the differences to the triple loss that the intervals resolve.
#   bash scripts/ablation.sh                      one seed (56); about 2 hours on 2 CPU cores
#   SEEDS="56 57 58" bash scripts/ablation.sh     three seeds per variant: intervals across seeds
#   PYTHON=python bash scripts/ablation.sh        use this Python as it is (a GPU machine's CUDA torch): the
#                                                 CPU set-up (scripts/setup.sh, which pins CPU torch) is skipped
# Resumable: finished runs are kept and skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh
SEEDS=${SEEDS:-56}
run="$PYTHON distill/run.py"
args=()
for v in triple no-ce no-cos no-mlm random-init; do
  distilled=() finetuned=()
  for s in $SEEDS; do
    out="runs/ablation/$v-seed$s"
    [ -d "$out/student" ] || $run "recipes/ablation/$v.yaml" "output_dir=$out" "train.seed=$s"
    [ -f "$out-topics/results.json" ] || $run recipes/finetune/wiki-topics.yaml \
        "model=$out/student" "output_dir=$out-topics" "train.seed=$s"
    distilled+=("$out") finetuned+=("$out-topics")
  done
  args+=(--ablation "$v=$(IFS=+; echo "${distilled[*]}"),$(IFS=+; echo "${finetuned[*]}")")
done
first=$(echo "$SEEDS" | awk '{print $1}')
base="runs/ablation/triple-seed$first"
[ -f runs/ablation/teacher-topics/results.json ] || $run recipes/finetune/wiki-topics.yaml \
    "model=$base/teacher" output_dir=runs/ablation/teacher-topics
$PYTHON -m distill.downstream.report --teacher "$base/teacher" --student "$base/student" \
  --distill-run "$base" --teacher-finetune runs/ablation/teacher-topics \
  --student-finetune "$base-topics" "${args[@]}" --output runs/ablation/report
