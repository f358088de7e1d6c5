"""genai-perf itself against the server: both request styles, unchanged.

--backend vllm sends numbers as strings in sampling_parameters; --backend tensorrtllm sends
TensorRT-LLM's tensor names (min_length for min_tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent


def genai_perf_env() -> dict[str, str]:
    import nvidia.cuda_runtime

    # NOTE: perf_analyzer links libcudart even without a GPU; the wheel's copy is enough.
    cudart = Path(list(nvidia.cuda_runtime.__path__)[0]) / "lib"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(cudart), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


@pytest.mark.parametrize("backend", ["vllm", "tensorrtllm"])
def test_genai_perf_profiles_the_server(server, demo_model_dir, tmp_path, backend):
    command = [
        str(VENV_BIN / "genai-perf"), "profile", "-m", "lepton", "--backend", backend, "--endpoint-type", "kserve",
        "--streaming", "-u", server.grpc_url, "--tokenizer", str(demo_model_dir),
        "--num-prompts", "4", "--synthetic-input-tokens-mean", "24", "--output-tokens-mean", "8",
        "--output-tokens-mean-deterministic", "--concurrency", "2", "--request-count", "6",
        "--artifact-dir", str(tmp_path),
    ]
    result = subprocess.run(command, env=genai_perf_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    export = next(tmp_path.rglob("profile_export_genai_perf.json"))
    stats = json.loads(export.read_text())
    # NOTE: --warmup-request-count is left out: perf_analyzer 2.51 then never stops sending.
    assert stats["request_count"]["avg"] >= 6
    assert stats["output_token_throughput"]["avg"] > 0
    assert stats["time_to_first_token"]["avg"] > 0
