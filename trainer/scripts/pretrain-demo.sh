#!/usr/bin/env bash
# Builds the demo base model in models/demo from nothing, with the project's own tools:
# synthetic task data, a tokenizer and random weights, then full-parameter pretraining with
# DeepSeek's load-balancing loss so the experts do not collapse. The corpus
# (pretrain.jsonl) is the three general domains plus `repeat` (copying text of every
# domain, so the base has produced the downstream tasks' vocabulary - JSON, velan words,
# "article N" - without ever seeing a downstream task), as plain text: every token is
# learned, questions included, as in any language-model pretraining.
#
#   trainer/scripts/pretrain-demo.sh [WORK_DIR]      (default: target/demo-work)
#
# About 35 minutes on 2 CPU cores. The downstream tasks (intent, translation, law) are not
# part of pretraining; trainer/scripts/reproduce.sh fine-tunes on them.
# Knobs (environment): STEPS (2400), LR (2e-3), ALPHA (0.001, DeepSeek-V2-Lite's
# aux_loss_alpha), SEED (0).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-target/demo-work}
STEPS=${STEPS:-2400}
LR=${LR:-2e-3}
ALPHA=${ALPHA:-0.001}
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

echo "== pretraining ($STEPS steps) -> models/demo"
rm -rf models/demo
$TRAIN train --model "$WORK/init" --data "$WORK/data/pretrain.jsonl" --experts all \
  --out models/demo --steps "$STEPS" --lr "$LR" --warmup 100 --schedule cosine \
  --batch 8 --seq-len 256 --aux-loss-alpha "$ALPHA" --eval-split 0.005 --eval-every 250 \
  --save-every 250 --resume --seed "$SEED" --json | tee -a "$WORK/pretrain.log.jsonl"
chmod 644 models/demo/*

echo "== general-domain exact match of models/demo"
for d in grammar arithmetic programs; do
  printf '%s: ' "$d"
  $TRAIN eval --model models/demo --data "$WORK/data/$d/eval.jsonl" --batch 64 --max-tokens 48
done
