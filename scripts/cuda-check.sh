#!/usr/bin/env bash
# Compiles every target of the workspace with `--features cuda` (no GPU needed), in its own
# target directory so that the CPU build's artifacts stay valid. CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/cuda-toolchain.sh)"
nvcc --version | tail -1
CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-target/cuda} \
  cargo check --release --workspace --all-targets --features cuda
echo "CUDA build: compiles"
