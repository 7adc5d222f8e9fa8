#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain from NVIDIA's Python wheels into DIR (default
# `target/cuda-toolchain`) and prints the environment a `--features cuda` build needs:
#
#     eval "$(scripts/cuda-toolchain.sh)" && cargo build --release --features cuda
#
# Works on a machine with no GPU and no NVIDIA driver: the driver library (libcuda) is
# replaced at link time by a stub with the same soname and symbols, so the binaries link
# here and load the real `libcuda.so.1` on a machine that has one. Only CUDA 13.0 wheels:
# the device machines' driver (R580) runs CUDA 13.0 code, not newer.
set -euo pipefail
DIR=${1:-"$(cd "$(dirname "$0")/.." && pwd)/target/cuda-toolchain"}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
PY="$DIR/venv/bin/python"

if ! [ -x "$DIR/venv/bin/python" ]; then
  python3 -m venv "$DIR/venv" >&2
fi
if ! compgen -G "$DIR/venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc" >/dev/null; then
  "$DIR/venv/bin/pip" install -q --disable-pip-version-check \
    'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-crt==13.0.*' \
    'nvidia-nvvm==13.0.*' 'nvidia-cuda-nvrtc==13.0.*' 'nvidia-cublas==13.0.*' \
    'nvidia-curand' 'nvidia-cuda-cccl==13.0.*' >&2
fi
ROOT=$("$PY" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')

# Unversioned names for the linker.
for lib in cudart cublas cublasLt curand nvrtc; do
  so=$(ls "$ROOT/lib/lib$lib.so."* 2>/dev/null | grep -v builtins | head -1)
  [ -n "$so" ] || { echo "lib$lib missing under $ROOT/lib" >&2; exit 1; }
  ln -sf "$(basename "$so")" "$ROOT/lib/lib$lib.so"
done

# The driver stub: every `cu*` entry point cudarc declares, each returning
# CUDA_ERROR_NO_DEVICE (100). Never loaded where a real driver is installed.
STUBS="$ROOT/lib/stubs"
if ! [ -f "$STUBS/libcuda.so" ]; then
  mkdir -p "$STUBS"
  cudarc() { ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1; }
  [ -n "$(cudarc)" ] || cargo fetch --manifest-path "$(dirname "$0")/../Cargo.toml" >&2
  CUDARC=$(cudarc)
  [ -n "$CUDARC" ] || { echo "cudarc's sources are not in the cargo registry" >&2; exit 1; }
  grep -ohP '^\s+(pub )?fn \Kcu\w+(?=\()' "$CUDARC/src/driver/sys/mod.rs" | sort -u >"$STUBS/symbols"
  { echo "int cuda_stub_no_device(void) { return 100; }"
    sed 's/.*/int &(void) { return 100; }/' "$STUBS/symbols"; } >"$STUBS/cuda_stub.c"
  cc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so" "$STUBS/cuda_stub.c"
  ln -sf libcuda.so "$STUBS/libcuda.so.1"
fi

cat <<EOF
export CUDA_ROOT="$ROOT"
export CUDA_PATH="$ROOT"
export PATH="$ROOT/bin:\$PATH"
export LIBRARY_PATH="$ROOT/lib:$STUBS\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export NVCC_PREPEND_FLAGS="-I$ROOT/include -I$ROOT/include/cccl"
EOF
