#!/bin/sh
# Entrypoint of the GPU image: write the served model repository the way lepton.server does (the
# engine parameters into config.pbtxt), with one engine instance on this container's GPU, then
# exec the image's own tritonserver. Environment:
#   MODEL        engine folder to serve (default: the TensorRT plan the build job writes)
#   RUNNER       engine runner (default tensorrt)
#   LEPTON_PARAMS  extra engine parameters, "key=value key=value" (docs/configuration.md)
set -eu
MODEL=${MODEL:-/artifacts/trt/smollm2}
RUNNER=${RUNNER:-tensorrt}
WORK=${LEPTON_WORK_DIR:-/app/build/triton}
python3 - "$MODEL" "$RUNNER" "$WORK" ${LEPTON_PARAMS:-} <<'PY'
import sys
from pathlib import Path

from lepton.server import ServerOptions, prepare_repository

model, runner, work, *extra = sys.argv[1:]
params = {"runner": runner, **dict(item.split("=", 1) for item in extra)}
repo = prepare_repository(ServerOptions(model_dir=Path(model), engine_parameters=params, work_dir=Path(work)))
config = repo / "lepton" / "config.pbtxt"
text = config.read_text()
# NOTE: KIND_GPU with count 1 is one engine instance per visible GPU; the container sees one GPU.
assert "KIND_CPU" in text, f"{config}: no KIND_CPU instance group to turn into KIND_GPU"
config.write_text(text.replace("KIND_CPU", "KIND_GPU"))
PY
exec tritonserver --model-repository="$WORK/model_repository" \
    --http-port=8000 --grpc-port=8001 --metrics-port=8002 \
    --exit-on-error=true --exit-timeout-secs=8 "$@"
