"""One request must never hang, fail or stall the server (issue 12): each defect through a real server.

Each test names the defect it pins. The server is the session's demo-model tritonserver.
"""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from test_cancel import wait_idle
from tritonio import grpc_generate, http_post, make_inputs

pytestmark = pytest.mark.e2e

PROMPT_17 = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat"
SP = "sampling_parameters"


def http_generate_raw(server, body: dict) -> tuple[int, str]:
    return http_post(server.http_url, "/v2/models/lepton/generate", body, timeout=30)


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity (not JSON, though Python writes them)."""
    def refuse(name):
        raise ValueError(f"{name} in the reply: {text[:200]}")
    return json.loads(text, parse_constant=refuse)


def test_1_tiny_penalty_is_refused_and_a_retry_and_others_are_answered(server):
    """Defect 1: this request hung the engine; now it is refused and the retry is answered at once."""
    wait_idle(server)
    prompt_tokens = grpc_generate(server.grpc_url, {"text_input": PROMPT_17, "max_tokens": 1}).num_input_tokens
    assert prompt_tokens >= 17
    code, text = http_generate_raw(server, {"text_input": PROMPT_17, "max_tokens": 8,
                                            SP: json.dumps({"repetition_penalty": 1e-300, "top_k": 5})})
    assert code == 400 and "repetition_penalty" in strict_json(text)["error"], text
    started = time.monotonic()
    retry = grpc_generate(server.grpc_url, {"text_input": PROMPT_17, "max_tokens": 8, "ignore_eos": True, "exclude_input_in_output": True, "temperature": 0.0}, timeout=10)
    other = grpc_generate(server.grpc_url, {"text_input": "Hello", "max_tokens": 4, "ignore_eos": True}, timeout=10)
    assert retry.num_output_tokens == 8 and other.num_output_tokens == 4
    assert time.monotonic() - started < 10
    wait_idle(server)


@pytest.mark.parametrize("penalty", [0.01, 100.0])
def test_4_penalties_at_their_bounds_give_finite_logprobs(server, penalty):
    """Defect 4: the accepted range of repetition_penalty keeps the arithmetic finite."""
    code, text = http_generate_raw(server, {"text_input": PROMPT_17, "max_tokens": 6, "temperature": 1.0, "top_k": 5,
                                            SP: json.dumps({"repetition_penalty": penalty, "logprobs": 3})})
    assert code == 200, text
    reply = strict_json(text)
    assert reply["num_output_tokens"] == 6 or reply["finish_reason"] == "stop"


@pytest.mark.parametrize("value", [1e-300, 0.0, -1.0, 1e300, 0.009])
def test_4_out_of_range_penalty_is_refused(server, value):
    code, text = http_generate_raw(server, {"text_input": "Hi", SP: json.dumps({"repetition_penalty": value})})
    assert code == 400 and "repetition_penalty" in text and "0.01" in text or "100" in text, text


def long_stream(server, fields: dict):
    """Start a streamed request; returns (client, queue of (arrival time, result, error))."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((time.monotonic(), result, error)))
    client.async_stream_infer("lepton", make_inputs({**fields, "stream": True}), enable_empty_final_response=True)
    return client, responses


def drain(responses: queue.Queue, timeout: float = 120.0) -> tuple[list[float], object]:
    """Arrival times of the text responses until the final one; returns (times, last result)."""
    times, deadline = [], time.monotonic() + timeout
    while True:
        arrived, result, error = responses.get(timeout=max(0.1, deadline - time.monotonic()))
        assert error is None, error
        final = result.get_response().parameters["triton_final_response"].bool_param
        if result.as_numpy("text_output") is not None:
            times.append(arrived)
            last = result
        if final:
            return times, last


@pytest.mark.parametrize("bad", [{"skip_special_tokens": "no"}, {"skip_special_tokens": 0},
                                 {"ignore_eos": [0]}, {"include_stop_str_in_output": "maybe"}])
def test_2_a_bad_request_is_refused_while_the_victim_finishes(server, bad):
    """Defect 2: a bad request failed the whole step; now it gets its own 400 and the stream goes on."""
    wait_idle(server)
    client, responses = long_stream(server, {"text_input": "Once upon a time", "max_tokens": 300, "ignore_eos": True})
    try:
        responses_seen = []
        for _ in range(3):
            responses_seen.append(responses.get(timeout=30))
        code, text = http_generate_raw(server, {"text_input": "Hi", "max_tokens": 4, SP: json.dumps(bad)})
        field = next(iter(bad))
        assert code == 400 and field in strict_json(text)["error"], text
        for item in responses_seen:
            responses.put(item)
        _, last = drain(responses)
        assert last.as_numpy("finish_reason")[0].decode() == "length"
        assert int(last.as_numpy("num_output_tokens")[0]) == 300
    finally:
        client.stop_stream()
        client.close()
    wait_idle(server)


@pytest.mark.parametrize("field", ["include_stop_str_in_output", "ignore_eos", "skip_special_tokens"])
@pytest.mark.parametrize("value", ["no", [0], 0, 1, "", None, {"x": 1}])
def test_3_booleans_refuse_anything_but_booleans(server, field, value):
    code, text = http_generate_raw(server, {"text_input": "Hi", "max_tokens": 2, SP: json.dumps({field: value})})
    assert code == 400, text
    message = strict_json(text)["error"]
    assert message.startswith(f"{field}: must be true or false"), message


@pytest.mark.parametrize("value,expected", [(False, False), ("false", False), ("False", False),
                                            (True, True), ("true", True), ("TRUE", True)])
def test_3_booleans_and_their_strings_mean_what_they_say(server, value, expected):
    free = grpc_generate(server.grpc_url, {"text_input": PROMPT_17, "max_tokens": 6, "ignore_eos": True, "exclude_input_in_output": True, "temperature": 0.0})
    stop = free.text.strip()[:2]
    assert stop
    reply = grpc_generate(server.grpc_url, {"text_input": PROMPT_17, "max_tokens": 6, "ignore_eos": True, "exclude_input_in_output": True, "temperature": 0.0,
                                            SP: json.dumps({"stop": [stop], "include_stop_str_in_output": value})})
    assert reply.finish_reason == "stop"
    assert reply.text.endswith(stop) is expected, (reply.text, stop)


@pytest.mark.parametrize("raw", ['{"max_tokens": ' + "9" * 5000 + "}",
                                 '{"max_tokens": ' + "[" * 100_000 + "]" * 100_000 + "}",
                                 '{"stop": ' + "[" * 100_000 + "]" * 100_000 + "}",
                                 '{"temperature": 1e999999}',
                                 '{"seed": ' + "1" * 4000 + "}",
                                 '{"top_k": NaN}',
                                 '{"stop": ["' + "x" * 70_000 + '"]}'])
def test_5_no_traceback_leaks(server, raw):
    """Defect 5: huge numbers and deep nesting got a traceback with server paths; now `field: message`."""
    code, text = http_generate_raw(server, {"text_input": "Hi", SP: raw})
    assert code == 400, text[:300]
    message = strict_json(text)["error"]
    assert len(message) < 300, message[:400]
    assert "Traceback" not in message and ".py" not in message and "At:" not in message, message
    assert message.split(":")[0] in ("sampling_parameters", "max_tokens", "temperature", "seed", "top_k", "stop")


def test_6_rejected_huge_prompts_do_not_stall_a_stream(server):
    """Defect 6: tokenizing 1 MiB prompts on the engine thread stretched another stream's gaps to 1.3 s."""
    wait_idle(server)
    client, responses = long_stream(server, {"text_input": "Once upon a time", "max_tokens": 400, "ignore_eos": True})
    try:
        responses.put(responses.get(timeout=30))
        huge = ("lorem ipsum dolor sit amet " * 40_000)[: (1 << 20) - 16]
        errors = []

        def send_huge():
            code, text = http_generate_raw(server, {"text_input": huge, "max_tokens": 4})
            errors.append((code, text[:200]))

        senders = [threading.Thread(target=send_huge) for _ in range(4)]
        for thread in senders:
            thread.start()
        for thread in senders:
            thread.join(120)
        times, _ = drain(responses)
    finally:
        client.stop_stream()
        client.close()
    assert all(code == 400 and "context" in text for code, text in errors) and len(errors) == 4, errors
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    # NOTE: 8 ms typical; the defect made it 1.3 s on a quiet machine. 0.6 s leaves room for noise.
    assert gaps[-1] < 0.6, f"largest gap between tokens {gaps[-1]:.3f} s (median {gaps[len(gaps) // 2]:.4f} s)"
    wait_idle(server)


def test_7_stop_token_ids_are_capped(server):
    """Defect 7: 140,000 stop ids slowed every other stream; now a request carries at most 64."""
    code, text = http_generate_raw(server, {"text_input": "Hi", "max_tokens": 8,
                                            SP: json.dumps({"stop_token_ids": list(range(140_000)), "min_tokens": 6})})
    assert code == 400 and strict_json(text)["error"].startswith("sampling_parameters: at most 65536 bytes"), text
    code, text = http_generate_raw(server, {"text_input": "Hi", "max_tokens": 8,
                                            SP: json.dumps({"stop_token_ids": list(range(5_000)), "min_tokens": 6})})
    assert code == 400 and strict_json(text)["error"] == "stop_token_ids: at most 64 ids, got 5000", text
    reply = grpc_generate(server.grpc_url, {"text_input": "Hi", "max_tokens": 8,
                                            SP: json.dumps({"stop_token_ids": list(range(60_000, 60_064)), "min_tokens": 6})})
    assert reply.num_output_tokens >= 6


def test_8_min_tokens_holds_back_stop_strings(server):
    free = grpc_generate(server.grpc_url, {"text_input": PROMPT_17, "max_tokens": 8, "ignore_eos": True, "exclude_input_in_output": True, "temperature": 0.0})
    stop = free.text.strip()[:2]
    stopped = grpc_generate(server.grpc_url, {"text_input": PROMPT_17, "max_tokens": 8, "ignore_eos": True, "exclude_input_in_output": True, "temperature": 0.0, "stop": [stop]})
    held = grpc_generate(server.grpc_url, {"text_input": PROMPT_17, "max_tokens": 8, "ignore_eos": True, "exclude_input_in_output": True, "temperature": 0.0,
                                           "stop": [stop], "min_tokens": 5})
    assert stopped.finish_reason == "stop" and stopped.num_output_tokens < 5
    assert held.num_output_tokens >= 5
    assert held.text.startswith(free.text[: len(stopped.text)])


def test_grpc_bad_request_in_sampling_parameters_names_the_field(server):
    with pytest.raises(InferenceServerException) as info:
        grpc_generate(server.grpc_url, {"text_input": "Hi", SP: json.dumps({"ignore_eos": "no"})})
    assert "ignore_eos: must be true or false" in str(info.value)
