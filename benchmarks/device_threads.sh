#!/usr/bin/env bash
# Step times of the ONNX Runtime runner over compute-thread counts on a many-core host (not the
# 2-core machines the sittings run on): a random-weight model of SmolLM2-135M's shape (the demo
# tokenizer stands in), exported fp32 and q8_0 here, then `benchmarks.step_shapes` (1 decode,
# 16 decodes over 192 cached tokens, a 128-token prompt) at each count in THREADS, one after the other.
# Written for the device machine (16 cores, its own Python with torch / onnx / onnxruntime /
# transformers / tokenizers): carry build/models/demo, run `bash benchmarks/device_threads.sh`;
# summary.txt and the logs (four files) land in $OUT (or build/reports/threads).
# No GPU is used: the engine's GPU runner needs TensorRT, which that machine lacks.
set -u
OUT=${OUT:-build/reports/threads}
# NOTE: 1 thread is left out by default: with it the twelve runs did not fit one 10-minute device call.
THREADS=${THREADS:-"2 4 8 15 16"}
WORK=${WORK:-/tmp/lepton-threads}
PY=${PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
log() { echo "[threads $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/summary.txt"; }

log "host: $(nproc) cores; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
log "flags: $(grep -m1 '^flags' /proc/cpuinfo | grep -o -E 'avx512f|avx512_vnni|avx_vnni|avx512_bf16|amx_tile|amx_int8|amx_bf16' | sort -u | tr '\n' ' ')"
$PY -c 'import torch, onnx, onnxruntime, numpy; print("versions: torch", torch.__version__, "onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__)' | tee -a "$OUT/summary.txt"

$PY - "$WORK/model" <<'EOF' 2>&1 | tail -n 3
import sys
from pathlib import Path
from export.bench_runners import build_smollm_shaped
print(build_smollm_shaped(Path(sys.argv[1]), Path("build/models/demo")))
EOF
t0=$(date +%s)
$PY -m export onnx --model "$WORK/model" --out "$WORK/fp32" --skip-validation > "$OUT/export.log" 2>&1 \
  || $PY -m export onnx --model "$WORK/model" --out "$WORK/fp32" --skip-validation --exporter torchscript >> "$OUT/export.log" 2>&1 \
  || { log "export failed"; tail -n 30 "$OUT/export.log"; exit 1; }
log "fp32 export in $(( $(date +%s) - t0 )) s"
t0=$(date +%s)
$PY -m export quantize --export "$WORK/fp32" --out "$WORK/q8_0" --method q8_0 --no-quality-gate \
  --windows 2 --latency-steps 5 > "$OUT/quantize.log" 2>&1 || { log "q8_0 failed"; tail -n 30 "$OUT/quantize.log"; }
log "q8_0 export in $(( $(date +%s) - t0 )) s"

for variant in fp32 q8_0; do
  [ -f "$WORK/$variant/manifest.json" ] || continue
  for n in $THREADS; do
    log "$variant, $n threads"
    $PY -m benchmarks.step_shapes --model-dir "$WORK/$variant" --decodes 16 --context 192 --prefill 128 \
      --param runner=onnxruntime --param num_threads=$n --repeats 7 2>&1 | tee -a "$OUT/steps.log" \
      | grep -E '^ +(1 decode|16 decodes|1 prefill)' | tee -a "$OUT/summary.txt"
  done
done
log "done"
