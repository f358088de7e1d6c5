#!/usr/bin/env bash
# Idempotent build of the peers `make bench-peers` compares Lepton with, all under build/peers/
# (never into the project's .venv):
#   build/peers/venv       onnxruntime-genai (pinned) in its own venv; the project's packages are
#                          visible through a .pth file (torch, transformers for its model builder)
#   build/peers/llama.cpp  llama-server and llama-quantize, built from the llama.cpp that PyPI's
#                          llama-cpp-python source package vendors (convert_hf_to_gguf.py beside them)
# About 6 minutes on 2 cores the first time, a second afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PEERS=build/peers
ORT_GENAI_VERSION=${ORT_GENAI_VERSION:-0.18.0}
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-$(nproc)}
step() { printf '[peers] %s\n' "$*"; }
mkdir -p "$PEERS"

# --- onnxruntime-genai in its own venv -------------------------------------------------------
PEER_PY="$PEERS/venv/bin/python"
if [ ! -x "$PEER_PY" ]; then
  BASE=$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)')/bin/python3
  step "creating $PEERS/venv with $("$BASE" --version)"
  "$BASE" -m venv "$PEERS/venv"
  # NOTE: the project's site-packages go last on sys.path, so what this venv installs wins.
  "$PEER_PY" - "$VENV" <<'EOF'
import pathlib, site, subprocess, sys
project = subprocess.check_output([sys.argv[1] + "/bin/python", "-c",
                                   "import site; print(site.getsitepackages()[0])"], text=True).strip()
pathlib.Path(site.getsitepackages()[0], "lepton_project.pth").write_text(project + "\n")
EOF
fi
stamp="$PEERS/venv/.onnxruntime-genai-$ORT_GENAI_VERSION"
if [ ! -f "$stamp" ]; then
  step "installing onnxruntime-genai==$ORT_GENAI_VERSION into $PEERS/venv"
  # NOTE: numpy<2 and protobuf<5 keep the project's packages (seen through the .pth) importable.
  "$PEER_PY" -m pip install --quiet --disable-pip-version-check \
    "onnxruntime-genai==$ORT_GENAI_VERSION" onnx_ir sentencepiece "numpy<2" "protobuf>=4.25.8,<5"
  touch "$stamp"
else
  step "onnxruntime-genai $ORT_GENAI_VERSION already installed"
fi

# --- llama.cpp from llama-cpp-python's source package ----------------------------------------
SRC="$PEERS/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION"
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
  step "downloading llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION (source package, ~77 MB)"
  mkdir -p "$PEERS/src"
  "$PEER_PY" -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
    -d "$PEERS/src" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  tar -xzf "$PEERS/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$PEERS/src"
fi
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  step "installing cmake and build-essential"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq cmake build-essential >/dev/null
fi
OUT="$PEERS/llama.cpp"
if [ ! -x "$OUT/bin/llama-server" ] || [ ! -x "$OUT/bin/llama-quantize" ]; then
  FLAGS=()
  # NOTE: llama.cpp's AMX path died with an illegal instruction on a Xeon VM (PLATFORM.md):
  # build natively but without AMX wherever the processor reports it.
  if grep -q ' amx' /proc/cpuinfo; then
    step "processor reports AMX: building without it"
    FLAGS+=(-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
            -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
  fi
  step "building llama-server, llama-quantize ($JOBS jobs; about 6 minutes on 2 cores)"
  cmake -S "$SRC/vendor/llama.cpp" -B "$OUT/cmake-build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "${FLAGS[@]}" >/dev/null
  cmake --build "$OUT/cmake-build" --config Release -j "$JOBS" --target llama-server llama-quantize >/dev/null
  mkdir -p "$OUT/bin"
  cp "$OUT/cmake-build/bin/llama-server" "$OUT/cmake-build/bin/llama-quantize" "$OUT/bin/"
else
  step "llama-server and llama-quantize already built"
fi
# The converter (with its conversion/ package and gguf-py) travels with the build, so nothing later
# reads the source tree.
if [ ! -f "$OUT/convert/convert_hf_to_gguf.py" ]; then
  mkdir -p "$OUT/convert"
  cp -r "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" "$SRC/vendor/llama.cpp/conversion" \
    "$SRC/vendor/llama.cpp/gguf-py" "$OUT/convert/"
fi
"$OUT/bin/llama-server" --version 2>&1 | grep -m1 -i version | sed 's/^/[peers] ok: llama-server /'
"$PEER_PY" -c 'import onnxruntime_genai as og; print("[peers] ok: onnxruntime-genai", og.__version__)'
