#!/usr/bin/env bash
# The small-scale ablation and the comparison of objectives: distil each variant (recipes/ablation/<variant>.yaml,
# 150 steps; one run per seed), fine-tune it on the Wikipedia topics, then one report with 95 % intervals and the
# differences to the triple loss that the intervals resolve (held-out MLM differences paired token by token).
#   bash scripts/ablation.sh                      all variants, one seed (56); about 4 hours on 2 CPU cores
#   SEEDS="56 57 58" bash scripts/ablation.sh     three seeds per variant: intervals across seeds
#   VARIANTS="triple jsd" bash scripts/ablation.sh   a subset (the first is the baseline of the differences)
#   FINETUNE=0 bash scripts/ablation.sh           distillation and held-out MLM only (no topic fine-tunes)
#   EPOCHS=2 bash scripts/ablation.sh             fine-tune for 2 epochs (default: the fine-tuning recipe's)
#   RUNS=DIR bash scripts/ablation.sh             the runs and the report under DIR (default runs/ablation)
#   PYTHON=python bash scripts/ablation.sh        use this Python as it is (a GPU machine's CUDA torch): the
#                                                 CPU set-up (scripts/setup.sh, which pins CPU torch) is skipped
# Resumable: finished runs are kept and skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/python.sh
SEEDS=${SEEDS:-56}
VARIANTS=${VARIANTS:-"triple no-ce no-cos no-mlm random-init reverse-kl jsd hidden-mse attn-kl minilmv2"}
FINETUNE=${FINETUNE:-1}
RUNS=${RUNS:-runs/ablation}
finetune=(recipes/finetune/wiki-topics.yaml ${EPOCHS:+"train.epochs=$EPOCHS"})
run="$PYTHON distill/run.py"
args=()
for v in $VARIANTS; do
  distilled=() finetuned=()
  for s in $SEEDS; do
    out="$RUNS/$v-seed$s"
    [ -d "$out/student" ] || $run "recipes/ablation/$v.yaml" "output_dir=$out" "train.seed=$s"
    if [ "$FINETUNE" = 1 ]; then
      [ -f "$out-topics/results.json" ] || $run "${finetune[@]}" "model=$out/student" "output_dir=$out-topics" \
          "train.seed=$s"
      finetuned+=("$out-topics")
    fi
    distilled+=("$out")
  done
  spec="$v=$(IFS=+; echo "${distilled[*]}")"
  [ "$FINETUNE" = 1 ] && spec+=",$(IFS=+; echo "${finetuned[*]}")"
  args+=(--ablation "$spec")
done
first_variant=$(echo "$VARIANTS" | awk '{print $1}')
first_seed=$(echo "$SEEDS" | awk '{print $1}')
base="$RUNS/$first_variant-seed$first_seed"
topics=()
if [ "$FINETUNE" = 1 ]; then
  [ -f "$RUNS/teacher-topics/results.json" ] || $run "${finetune[@]}" "model=$base/teacher" \
      "output_dir=$RUNS/teacher-topics"
  topics=(--teacher-finetune "$RUNS/teacher-topics" --student-finetune "$base-topics")
fi
$PYTHON -m distill.downstream.report --teacher "$base/teacher" --student "$base/student" \
  --distill-run "$base" "${topics[@]}" "${args[@]}" --output "$RUNS/report"
