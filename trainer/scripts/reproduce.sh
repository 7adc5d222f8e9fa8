#!/usr/bin/env bash
# Reproduces docs/reproduction.md end to end from the shipped demo base (models/demo):
# synthetic task data, expert scores on six domains, the paper's figures, and for each
# downstream task (intent, translation, law) four fine-tunings - FFT, ESFT-Token (p = 0.2),
# ESFT-Gate (p = 0.1) and ESFT with as many random experts per layer as ESFT-Token -
# each evaluated by exact match on its task and on the three general domains.
#
#   trainer/scripts/reproduce.sh [WORK_DIR]        (default: target/reproduction)
#
# About 30-40 minutes on 2 CPU cores. Writes WORK_DIR/report.md (the tables),
# WORK_DIR/results.jsonl, WORK_DIR/runs.jsonl and WORK_DIR/plots/. With INSTALL=1 the
# ESFT-Token adapters are copied into adapters/ (that is how the shipped ones were made).
# Knobs (environment): STEPS (300), LR (FFT's learning rate, 1e-3), ESFT_LR (the ESFT
# variants', 5e-3: they train a few experts, which tolerate and need a higher rate, as
# adapters usually do), SEED (0), BASE (models/demo), LIMIT (eval items per domain;
# default all).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-target/reproduction}
STEPS=${STEPS:-300}
LR=${LR:-1e-3}
ESFT_LR=${ESFT_LR:-5e-3}
SEED=${SEED:-0}
BASE=${BASE:-models/demo}
LIMIT=${LIMIT:+--limit $LIMIT}
TASKS="intent translation law"
GENERAL="grammar arithmetic programs"

[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --workspace --bins
TRAIN=target/release/esft-train
rm -rf "$WORK/runs" "$WORK/results.jsonl" "$WORK/runs.jsonl" "$WORK/base_loss.jsonl"
mkdir -p "$WORK"/{scores,configs,runs,evals}
: > "$WORK/results.jsonl"
: > "$WORK/runs.jsonl"
START=$(date +%s)

echo "== synthetic data (the same seed as the base's pretraining data)"
$TRAIN synth --out "$WORK/data" --seed "$SEED" > /dev/null

echo "== expert scores on every domain"
for d in $GENERAL $TASKS; do
  $TRAIN score --model "$BASE" --data "$WORK/data/$d/train.jsonl" --tokens 32768 \
    --seed "$SEED" --out "$WORK/scores/$d.json" --json > /dev/null
  # A second random sample of the same domain: how far two samples of one domain route
  # apart is the floor against which differences between domains are measured.
  $TRAIN score --model "$BASE" --data "$WORK/data/$d/train.jsonl" --tokens 32768 \
    --seed "$((SEED + 1))" --out "$WORK/scores/$d.resample.json" --json > /dev/null
done

echo "== expert selection"
for t in $TASKS; do
  $TRAIN select --scores "$WORK/scores/$t.json" --score-function token --top-p 0.2 \
    --out "$WORK/configs/token-$t.json"
  $TRAIN select --scores "$WORK/scores/$t.json" --score-function gate --top-p 0.1 \
    --out "$WORK/configs/gate-$t.json"
  $TRAIN select --scores "$WORK/scores/$t.json" --random-like "$WORK/configs/token-$t.json" \
    --seed "$SEED" --out "$WORK/configs/random-$t.json"
done

echo "== figures and routing statistics"
args=()
for d in $GENERAL $TASKS; do args+=(--scores "$d=$WORK/scores/$d.json"); done
for t in $TASKS; do args+=(--configs "$t=$WORK/configs/token-$t.json"); done
$TRAIN plot "${args[@]}" --out "$WORK/plots"

# evaluate METHOD TASK MODEL [ADAPTER]: exact match on TASK's eval set and on every
# general domain, appended to results.jsonl.
evaluate() {
  local method=$1 task=$2 model=$3 adapter=${4:-}
  local domains="$GENERAL"
  [ "$task" != "-" ] && domains="$task $GENERAL"
  [ "$method" = base ] && domains="$TASKS $GENERAL"
  for d in $domains; do
    local extra=()
    [ -n "$adapter" ] && extra=(--adapter "$adapter")
    local r
    r=$($TRAIN eval --model "$model" "${extra[@]}" --data "$WORK/data/$d/eval.jsonl" \
      --batch 64 --max-tokens 48 $LIMIT --predictions "$WORK/evals/$method-$task-$d.jsonl")
    echo "{\"method\": \"$method\", \"task\": \"$task\", \"domain\": \"$d\", \"result\": $r}" \
      >> "$WORK/results.jsonl"
    echo "   $method/$task on $d: $r"
  done
}

echo "== base model"
evaluate base - "$BASE"
for t in $TASKS; do
  r=$($TRAIN eval --model "$BASE" --data "$WORK/data/$t/eval.jsonl" --metric loss $LIMIT)
  echo "{\"method\": \"base\", \"task\": \"$t\", \"loss\": $r}" >> "$WORK/base_loss.jsonl"
  echo "   base held-out loss on $t: $r"
done

for t in $TASKS; do
  for method in fft token gate random; do
    out="$WORK/runs/$method/$t"
    mkdir -p "$WORK/runs/$method"
    experts="$WORK/configs/$method-$t.json"
    lr=$ESFT_LR
    [ "$method" = fft ] && experts=all && lr=$LR
    echo "== $method on $t"
    $TRAIN train --model "$BASE" --data "$WORK/data/$t/train.jsonl" --experts "$experts" \
      --out "$out" --steps "$STEPS" --lr "$lr" --warmup 10 --schedule cosine \
      --batch 8 --seq-len 256 --eval-split 0.02 --eval-every 100 --seed "$SEED" --json \
      > "$WORK/runs/$method-$t.log.jsonl"
    bytes=$(du -sb "$out" | cut -f1)
    python3 - "$WORK/runs/$method-$t.log.jsonl" "$method" "$t" "$bytes" >> "$WORK/runs.jsonl" <<'PY'
import json, sys
log, method, task, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ev = [json.loads(l) for l in open(log) if l.startswith("{")]
start = next(e for e in ev if e.get("event") == "start")
done = next(e for e in ev if e.get("event") == "done")
print(json.dumps({"method": method, "task": task, "trainable_params": start["trainable_params"],
                  "seconds": done["seconds"], "bytes": size,
                  "best_eval_loss": done.get("best_eval_loss")}))
PY
    if [ "$method" = fft ]; then
      evaluate "$method" "$t" "$out"
    else
      evaluate "$method" "$t" "$BASE" "$out"
    fi
  done
done

python3 trainer/scripts/report.py "$WORK" "$BASE" > "$WORK/report.md"
echo "== done in $(( $(date +%s) - START )) s; tables in $WORK/report.md"

if [ "${INSTALL:-0}" = 1 ]; then
  for t in $TASKS; do
    rm -rf "adapters/$t"
    cp -r "$WORK/runs/token/$t" "adapters/$t"
  done
  echo "installed the ESFT-Token adapters into adapters/"
fi
