"""Property-based fuzzing of the live server (Hypothesis; issue 11, item 1).

Random and adversarial requests over gRPC streaming and HTTP `generate` / `generate_stream` to
`lepton`, and HTTP `infer` to `lepton_infer` (fuzzing.py says what a case is and what the oracle
accepts). After every example the server must answer a health check and hold no request or KV
block; after the module its thread count must be back where it was.

CI runs a fixed budget with derandomize=True (the same examples every run, about a minute in all).
`LEPTON_FUZZ_EXAMPLES=5000 make fuzz` runs 5,000 random examples per transport instead; a failure
prints the example and a `@reproduce_failure` blob.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections import Counter

import pytest
import tokenizers
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, event, given, settings

from benchmarks.machine import process_tree_usage
from benchmarks.workload import PromptFactory
from client.metrics import wait_idle
from fuzz_transports import send_grpc, send_http
from fuzzing import ModelInputs, cases, check, model_inputs
from tritonio import grpc_generate

pytestmark = pytest.mark.e2e

LONG_RUN_EXAMPLES = int(os.environ.get("LEPTON_FUZZ_EXAMPLES", "0"))
CI_EXAMPLES = {"grpc": 150, "generate": 120, "generate_stream": 100, "infer": 120}
# NOTE: Triton's gRPC and HTTP front ends keep thread pools that may grow a little with connections
# (the stubs' own threads are fixed); a thread per request left behind would pass this bound at once.
THREAD_SLACK = 8


def fuzz_settings(transport: str) -> settings:
    return settings(max_examples=LONG_RUN_EXAMPLES or CI_EXAMPLES[transport], derandomize=not LONG_RUN_EXAMPLES,
                    deadline=None, database=None, print_blob=True, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def specs(server, demo_model_dir) -> dict[str, ModelInputs]:
    """Both models' inputs as the server reports them, and prompts around the demo model's context."""
    context = json.loads((demo_model_dir / "config.json").read_text())["max_position_embeddings"]
    factory = PromptFactory(tokenizers.Tokenizer.from_file(str(demo_model_dir / "tokenizer.json")), seed=0)
    prompts = {n: factory.make(n) for n in (context - 6, context - 2, context - 1, context, context + 1)}
    client = grpcclient.InferenceServerClient(server.grpc_url)
    return {name: model_inputs(client.get_model_config(name, as_json=True)["config"], context, prompts)
            for name in ("lepton", "lepton_infer")}


@pytest.fixture(scope="module")
def threads_before(server) -> int:
    """The server tree's thread count before the first example; checked again after the last."""
    assert_healthy(server)
    before = process_tree_usage(server.process.pid).threads
    yield before
    wait_idle(server.metrics_url, timeout=30)
    after = process_tree_usage(server.process.pid)
    assert after.threads <= before + THREAD_SLACK, f"{before} threads before the fuzzing, {after.threads} after: {after}"


def assert_healthy(server) -> None:
    """Ready, answers a one-token request, and holds nothing afterwards."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10) as response:
        assert response.status == 200
    reply = grpc_generate(server.grpc_url, {"text_input": "Hello", "max_tokens": 1, "ignore_eos": True}, timeout=30)
    assert reply.num_output_tokens == 1
    wait_idle(server.metrics_url, timeout=10, poll_s=0.02)


@pytest.mark.parametrize("transport", ["grpc", "generate", "generate_stream", "infer"])
def test_any_request_gets_an_answer_or_an_error_naming_its_field(server, specs, threads_before, transport):
    spec = specs["lepton_infer" if transport == "infer" else "lepton"]
    outcomes: Counter = Counter()

    @fuzz_settings(transport)
    @given(case=cases(spec, transport))
    def run(case):
        if transport == "grpc":
            outcome = send_grpc(server.grpc_url, case, spec)
        else:
            outcome = send_http(server.http_url, case, spec, transport)
        kind = "ok" if outcome.error is None else "error"
        event(f"{case.target or 'valid'}: {kind}")
        check(case, outcome)
        outcomes[kind] += 1
        assert_healthy(server)

    run()
    # NOTE: a fuzzer whose every request failed (or passed) would test one path only.
    assert outcomes["ok"] >= 5 and outcomes["error"] >= 5, outcomes
