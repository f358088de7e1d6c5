#!/usr/bin/env bash
# Compile Lepton's ONNX Runtime operators (lepton/native/slot_attention.c) into
# lepton/native/liblepton_ops.so when the library is missing or older than its source. The hot loops
# are compiled for AVX-512, AVX2 + FMA and plain x86-64 (target_clones): the loader picks one for the
# processor it runs on. Without a C compiler nothing is built and the slot runner keeps ONNX Runtime's
# GroupQueryAttention. Usage: scripts/build_native.sh [SOURCE OUT]; EXTRA_CFLAGS are added (the tests
# build one-target copies with -DLEPTON_ONE_TARGET -march=...).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=${1:-$ROOT/lepton/native/slot_attention.c}
OUT=${2:-$ROOT/lepton/native/liblepton_ops.so}
CC=${CC:-cc}
if [ -f "$OUT" ] && [ "$OUT" -nt "$SRC" ]; then exit 0; fi
if ! command -v "$CC" >/dev/null; then
  echo "[native] no C compiler ($CC): the slot runner keeps ONNX Runtime's GroupQueryAttention" >&2
  exit 0
fi
echo "[native] compiling $SRC -> $OUT"
# shellcheck disable=SC2086  # NOTE: EXTRA_CFLAGS is a list of flags
"$CC" -O3 -std=gnu11 -fPIC -shared -fopenmp-simd -fvisibility=hidden -Wall -Wextra -Wno-psabi ${EXTRA_CFLAGS:-} \
  -o "$OUT.tmp" "$SRC"
mv "$OUT.tmp" "$OUT"
