#!/usr/bin/env bash
# Idempotent set-up shared by `make serve` and `make test`: virtual environment with the pinned
# packages (one pip call), Lepton's native operators, libb64 for perf_analyzer, the Python backend stub, and a start check.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
step() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')

stamp="$VENV/.lepton-requirements"
if ! cmp -s requirements.txt "$stamp"; then
  step "installing pinned packages from requirements.txt (one pip call, a few minutes on a fresh machine)"
  "$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt
  cp requirements.txt "$stamp"
else
  step "packages already installed ($VENV)"
fi

# NOTE: Lepton's ONNX Runtime operators (the slot runner's attention); skipped without a C compiler.
bash scripts/build_native.sh

if ! ldconfig -p | grep -q 'libb64.so.0d'; then
  step "installing libb64-0d (perf_analyzer links libb64.so.0d)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libb64-0d >/dev/null
fi

# NOTE: nginx and envsubst (the scale-out test's load balancer) and docker-compose (validates docker-compose.yml);
# --no-install-recommends keeps Docker's engine out: nothing here runs containers.
DEPLOY_TOOLS=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || DEPLOY_TOOLS+=(nginx-light)
command -v docker-compose >/dev/null || DEPLOY_TOOLS+=(docker-compose)
command -v envsubst >/dev/null || DEPLOY_TOOLS+=(gettext-base)  # deploy/nginx/render.sh
if [ ${#DEPLOY_TOOLS[@]} -gt 0 ]; then
  step "installing ${DEPLOY_TOOLS[*]} (deployment checks: tests/e2e/test_scale_out.py, tests/deploy)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${DEPLOY_TOOLS[@]}" >/dev/null
fi

TRITON=$("$PY" -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent / "tritonserver")')
STUB_SRC="$TRITON/python_backend_stubs/$PYVER/triton_python_backend_stub"
STUB_DST="$TRITON/backends/python/triton_python_backend_stub"
if ! cmp -s "$STUB_SRC" "$STUB_DST"; then
  step "placing the Python $PYVER backend stub in $TRITON/backends/python"
  cp "$STUB_SRC" "$STUB_DST"
fi

LIBDIR=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
CUDART=$("$PY" -c 'import nvidia.cuda_runtime, pathlib; print(pathlib.Path(nvidia.cuda_runtime.__path__[0]) / "lib")')
# NOTE: `tritonserver --help` exits 1 after printing its usage; the usage text is the check.
USAGE=$(LD_LIBRARY_PATH="$LIBDIR" "$TRITON/bin/tritonserver" --help 2>&1 || true)
grep -q -- '--model-repository' <<<"$USAGE" || { echo "[setup] tritonserver does not start: $USAGE" >&2; exit 1; }
PA_VERSION=$(set -o pipefail; LD_LIBRARY_PATH="$CUDART" "$VENV/bin/perf_analyzer" --version 2>&1 | head -n 1) \
  || { echo "[setup] perf_analyzer does not start: $PA_VERSION" >&2; exit 1; }
step "ok: tritonserver starts; $PA_VERSION"
