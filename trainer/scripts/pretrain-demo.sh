#!/usr/bin/env bash
# Builds the demo base model in models/demo from nothing, with the project's own tools:
# synthetic task data, a tokenizer and random weights, then full-parameter pretraining with
# DeepSeek's load-balancing loss so the experts do not collapse:
#   stage 1: the three general domains (pretrain.jsonl), STEPS steps;
#   stage 2: the same plus `repeat` (copying text from every domain), STEPS2 steps, so the
#            base has produced the downstream tasks' vocabulary (JSON, velan words,
#            "article N") without ever seeing a downstream task.
#
#   trainer/scripts/pretrain-demo.sh [WORK_DIR]      (default: target/demo-work)
#
# About 35 minutes on 2 CPU cores. The downstream tasks (intent, translation, law) are not
# part of pretraining; trainer/scripts/reproduce.sh fine-tunes on them.
# Knobs (environment): STEPS (2000), STEPS2 (400), LR (2e-3), LR2 (5e-4), ALPHA (0.01),
# SEED (0).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-target/demo-work}
STEPS=${STEPS:-2000}
STEPS2=${STEPS2:-400}
LR=${LR:-2e-3}
LR2=${LR2:-5e-4}
ALPHA=${ALPHA:-0.01}
SEED=${SEED:-0}

[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --workspace --bins
TRAIN=target/release/esft-train
mkdir -p "$WORK" models

echo "== synthetic data -> $WORK/data"
$TRAIN synth --out "$WORK/data" --seed "$SEED"

if [ ! -f "$WORK/init/model.safetensors" ]; then
  echo "== tokenizer and random weights -> $WORK/init"
  $TRAIN init --config config/demo-model.json --corpus "$WORK/data" --out "$WORK/init" --seed "$SEED"
fi

if [ ! -f "$WORK/stage1/model.safetensors" ]; then
  echo "== stage 1: general domains ($STEPS steps) -> $WORK/stage1"
  $TRAIN train --model "$WORK/init" --data "$WORK/data/pretrain.jsonl" --experts all \
    --out "$WORK/stage1" --steps "$STEPS" --lr "$LR" --warmup 100 --schedule cosine \
    --batch 8 --seq-len 256 --aux-loss-alpha "$ALPHA" --eval-split 0.005 --eval-every 250 \
    --save-every 250 --resume --seed "$SEED" --json | tee -a "$WORK/stage1.log.jsonl"
fi

echo "== stage 2: general domains + repeat ($STEPS2 steps) -> models/demo"
cat "$WORK/data/pretrain.jsonl" "$WORK/data/repeat/train.jsonl" > "$WORK/stage2.jsonl"
rm -rf models/demo
$TRAIN train --model "$WORK/stage1" --data "$WORK/stage2.jsonl" --experts all \
  --out models/demo --steps "$STEPS2" --lr "$LR2" --warmup 20 --schedule cosine \
  --batch 8 --seq-len 256 --aux-loss-alpha "$ALPHA" --eval-split 0.005 --eval-every 100 \
  --save-every 100 --resume --seed "$SEED" --json | tee -a "$WORK/stage2.log.jsonl"
chmod 644 models/demo/*

echo "== general-domain exact match of models/demo"
for d in grammar arithmetic programs; do
  printf '%s: ' "$d"
  $TRAIN eval --model models/demo --data "$WORK/data/$d/eval.jsonl" --batch 64 --max-tokens 48
done
