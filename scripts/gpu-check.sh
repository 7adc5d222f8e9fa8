#!/usr/bin/env bash
# The GPU check, in two halves:
#
#   scripts/gpu-check.sh build   Here, on any Linux machine (no GPU needed): installs the
#                                CUDA 13.0 toolchain (scripts/cuda-toolchain.sh), builds the
#                                GPU-relevant test binaries and the GPU benchmark with
#                                `--features cuda`, and packs them into
#                                target/gpu-check.tar.xz (carry that one file).
#   scripts/gpu-check.sh run     On the machine with the GPU (no Rust toolchain needed), in
#                                the repository root: unpacks the binaries and runs, on
#                                cuda:0, the parity tests on every fixture, batch invariance,
#                                expert slots, adapter == merged checkpoint, the mixed-batch
#                                scheduler tests, three ESFT training steps against the CPU,
#                                and the benchmark. Writes $OUT/gpu-check.log and
#                                $OUT/gpu-check.json (OUT defaults to target/gpu-check-out).
#
# Each check runs under its own time limit and the run goes on after a failure, so one run
# reports everything; the exit status is non-zero if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUNDLE=target/gpu-check.tar.xz
TESTS_ESFT="parity batch_invariance expert_slots adapters scheduler"
TESTS_TRAINER="device_step"

build() {
  set -e
  eval "$(scripts/cuda-toolchain.sh)"
  local target=${CARGO_TARGET_DIR:-target}
  local json=target/gpu-check-build.json
  mkdir -p target
  local args=()
  for t in $TESTS_ESFT; do args+=(--test "$t"); done
  cargo test --release -p esft --features cuda "${args[@]}" --no-run --message-format=json >"$json"
  cargo test --release -p esft-train --features cuda --test "$TESTS_TRAINER" --no-run \
    --message-format=json >>"$json"
  cargo bench -p esft --features cuda --bench gpu --no-run --message-format=json >>"$json"
  rm -rf target/gpu-check && mkdir -p target/gpu-check/bin
  python3 - "$json" target/gpu-check/bin $TESTS_ESFT $TESTS_TRAINER gpu <<'EOF'
import json, shutil, sys
src, dst, wanted = sys.argv[1], sys.argv[2], set(sys.argv[3:])
found = {}
for line in open(src):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        name = m["target"]["name"]
        if name in wanted:
            found[name] = m["executable"]
missing = wanted - set(found)
if missing:
    sys.exit(f"not built: {sorted(missing)}")
for name, exe in found.items():
    shutil.copy(exe, f"{dst}/{name}")
EOF
  strip target/gpu-check/bin/*
  # The test binaries find the fixtures through the path they were built in.
  echo "$ROOT" >target/gpu-check/built_in
  # The binaries share ~40 MB of candle's PTX each: a dictionary larger than all of them
  # stores it once (~10 MB in all instead of ~46 MB; the device tool carries 64 MiB).
  tar -C target/gpu-check -cf - bin built_in | xz -6 --lzma2=preset=6,dict=384MiB >"$BUNDLE"
  ls -l "$BUNDLE"
  echo "carry $BUNDLE; on the GPU machine: scripts/gpu-check.sh run"
}

# Directories holding the CUDA 13 runtime libraries the binaries link (libcublas.so.13 ...),
# from a PyTorch/NVIDIA wheel install or a CUDA toolkit.
cuda_lib_dirs() {
  {
    python3 - <<'EOF' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for r in roots:
    for p in glob.glob(os.path.join(r, "nvidia", "**", "lib*.so*"), recursive=True):
        print(os.path.dirname(p))
EOF
    ls -d /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/lib/x86_64-linux-gnu 2>/dev/null
  } | sort -u | tr '\n' ':'
}

run() {
  local out=${OUT:-target/gpu-check-out}
  mkdir -p "$out"
  local log="$out/gpu-check.log" results="$out/gpu-check.results"
  : >"$log"
  : >"$results"
  local dir=target/gpu-check
  rm -rf "$dir" && mkdir -p "$dir" && tar -C "$dir" -xJf "$BUNDLE" || {
    echo "no $BUNDLE: run 'scripts/gpu-check.sh build' and carry it" | tee -a "$log"
    return 1
  }
  local built_in
  built_in=$(cat "$dir/built_in")
  if [ "$built_in" != "$ROOT" ] && ! [ -e "$built_in" ]; then
    mkdir -p "$(dirname "$built_in")" && ln -s "$ROOT" "$built_in"
  fi
  export LD_LIBRARY_PATH="$(cuda_lib_dirs)${LD_LIBRARY_PATH:-}"
  {
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
    nvidia-smi | head -5 || true
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$dir/bin/parity" | grep -E "cuda|cublas|curand|nvrtc|not found"
  } >>"$log" 2>&1
  if ldd "$dir/bin/parity" | grep -q "not found"; then
    echo "CUDA libraries missing (see $log)" | tee -a "$log"
  fi

  export ESFT_TEST_DEVICE=${ESFT_TEST_DEVICE:-cuda:0}
  check() { # name limit_s command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*" >>"$log"
    local t0 rc
    t0=$(date +%s.%N)
    timeout "$limit" "$@" >>"$log" 2>&1
    rc=$?
    local secs
    secs=$(python3 -c "import time; print(round(time.time() - $t0, 2))")
    echo "=== $name: exit $rc in $secs s" >>"$log"
    echo "$name $rc $secs" >>"$results"
    echo "$name: exit $rc in $secs s"
  }
  local t
  for t in $TESTS_ESFT; do
    check "$t" 120 "$dir/bin/$t" --test-threads=1
  done
  check device_step 180 "$dir/bin/device_step" --test-threads=1 --nocapture
  GPU_BENCH_JSON="$out/gpu-bench.json" check bench 300 "$dir/bin/gpu"

  python3 - "$results" "$out/gpu-bench.json" "$out/gpu-check.json" <<'EOF'
import json, os, sys
results, bench, dst = sys.argv[1:4]
checks = []
for line in open(results):
    name, rc, secs = line.split()
    checks.append({"check": name, "exit": int(rc), "seconds": float(secs)})
doc = {"checks": checks, "passed": all(c["exit"] == 0 for c in checks)}
if os.path.exists(bench):
    doc["bench"] = json.load(open(bench))
json.dump(doc, open(dst, "w"), indent=1)
print(json.dumps(doc["checks"]))
EOF
  ! grep -qv " 0 " "$results"
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
