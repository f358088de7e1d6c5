#!/usr/bin/env bash
# Compile Lepton's ONNX Runtime operators (lepton/native/*.c: SlotAttention, MatMulQ8, MatMulQ4, MatMulBF16, MatMulF32, TopKRescore) and the slot
# runner's K/V copy (called through ctypes) into lepton/native/liblepton_ops.so when the library is
# missing or older than a source. Hot loops are
# compiled for AVX-512, AVX2 + FMA and plain x86-64 (target_clones, or one function per instruction
# set picked at load): the processor it runs on decides. Without a C compiler nothing is built and the
# runners keep ONNX Runtime's own operators. Usage: scripts/build_native.sh [SOURCE_DIR OUT];
# EXTRA_CFLAGS are added (the tests build one-target copies with -DLEPTON_ONE_TARGET -march=...).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=${1:-$ROOT/lepton/native}
OUT=${2:-$ROOT/lepton/native/liblepton_ops.so}
CC=${CC:-cc}
if [ -f "$OUT" ] && [ -z "$(find "$SRC" -maxdepth 1 \( -name '*.c' -o -name '*.h' \) -newer "$OUT")" ]; then exit 0; fi
if ! command -v "$CC" >/dev/null; then
  echo "[native] no C compiler ($CC): the runners keep ONNX Runtime's own operators" >&2
  exit 0
fi
echo "[native] compiling $SRC/*.c -> $OUT"
# shellcheck disable=SC2086  # NOTE: EXTRA_CFLAGS is a list of flags
"$CC" -O3 -std=gnu11 -fPIC -shared -pthread -fopenmp-simd -fvisibility=hidden -Wall -Wextra -Wno-psabi ${EXTRA_CFLAGS:-} \
  -o "$OUT.tmp" "$SRC"/*.c
mv "$OUT.tmp" "$OUT"
