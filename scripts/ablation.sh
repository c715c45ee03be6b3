#!/usr/bin/env bash
# The small-scale ablation: distil each variant, fine-tune it on the Wikipedia topics, then one report.
#   bash scripts/ablation.sh            (about 2 hours on 2 CPU cores; resumable: finished steps are kept)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
run=".venv/bin/python distill/run.py"
args=()
for v in triple no-ce no-cos no-mlm random-init; do
  [ -d "runs/ablation/$v/student" ] || $run "recipes/ablation/$v.yaml"
  [ -f "runs/ablation/$v-topics/results.json" ] || $run recipes/finetune/wiki-topics.yaml \
      "model=runs/ablation/$v/student" "output_dir=runs/ablation/$v-topics"
  args+=(--ablation "$v=runs/ablation/$v,runs/ablation/$v-topics")
done
[ -f runs/ablation/teacher-topics/results.json ] || $run recipes/finetune/wiki-topics.yaml \
    model=runs/ablation/triple/teacher output_dir=runs/ablation/teacher-topics
.venv/bin/python -m distill.report --teacher runs/ablation/triple/teacher --student runs/ablation/triple/student \
  --distill-run runs/ablation/triple --teacher-finetune runs/ablation/teacher-topics \
  --student-finetune runs/ablation/triple-topics "${args[@]}" --output runs/ablation/report
