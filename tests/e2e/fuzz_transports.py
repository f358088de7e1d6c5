"""How the fuzzer sends a case: gRPC streaming, HTTP generate / generate_stream (SSE), HTTP infer.

Every answer comes back as an Outcome: the reply's fields, or the error message as the client saw it.
"""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from fuzzing import Case, ModelInputs, Outcome, RawJSON


def to_array(name: str, value, spec: ModelInputs) -> np.ndarray:
    """The tensor for a value, in the dtype the model declares (gRPC, HTTP infer)."""
    if isinstance(value, np.ndarray):
        return value
    dtype = spec.dtypes.get(name, np.int32)
    if dtype == np.object_:
        items = value if isinstance(value, list) else [value]
        return np.array([v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v for v in items], dtype=np.object_)
    return np.array([value], dtype=dtype)


def send_grpc(url: str, case: Case, spec: ModelInputs, timeout: float = 60.0) -> Outcome:
    """One request on a gRPC stream of its own; every response until the final one."""
    from tritonclient.utils import InferenceServerException

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        tensors = []
        for name, value in case.fields.items():
            array = to_array(name, value, spec)
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        client.async_stream_infer(spec.model, tensors, enable_empty_final_response=True)
        texts_seen, last = [], None
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                return Outcome(error=error.message() if isinstance(error, InferenceServerException) else str(error))
            if result.as_numpy("text_output") is not None:
                texts_seen.append(result.as_numpy("text_output")[0].decode())
                last = result
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        return Outcome(None, last.as_numpy("finish_reason")[0].decode(), "".join(texts_seen),
                       int(last.as_numpy("num_input_tokens")[0]), int(last.as_numpy("num_output_tokens")[0]))
    finally:
        client.stop_stream()
        client.close()


def json_bytes(value) -> bytes:
    """JSON for value, where bytes go into a string literal as they are (invalid UTF-8 included)."""
    if isinstance(value, RawJSON):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes):
        return b'"' + b"".join(json.dumps(chr(b))[1:-1].encode() if b < 0x80 else bytes([b]) for b in value) + b'"'
    if isinstance(value, np.ndarray):
        return json_bytes([v.item() if hasattr(v, "item") else v for v in value.reshape(-1)])
    if isinstance(value, dict):
        return b"{" + b",".join(json_bytes(str(k)) + b":" + json_bytes(v) for k, v in value.items()) + b"}"
    if isinstance(value, (list, tuple)):
        return b"[" + b",".join(json_bytes(v) for v in value) + b"]"
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    return json.dumps(value).encode()  # NOTE: NaN and Infinity as Python writes them; Triton takes them


def generate_body(case: Case) -> bytes:
    return case.body if case.body is not None else json_bytes(case.fields)


def infer_body(case: Case, spec: ModelInputs) -> bytes:
    if case.body is not None:
        return case.body
    inputs = []
    for name, value in case.fields.items():
        array = to_array(name, value, spec) if not case.json_types or name != case.target else None
        if array is None:  # NOTE: a value of any JSON type, sent with the declared datatype
            datatype = np_to_triton_dtype(np.dtype(spec.dtypes.get(name, np.int32)))
            inputs.append({"name": name, "shape": [1], "datatype": datatype, "data": [value]})
            continue
        inputs.append({"name": name, "shape": list(array.shape), "datatype": np_to_triton_dtype(array.dtype),
                       "data": [v.item() if hasattr(v, "item") else v for v in array.reshape(-1)]})
    return json_bytes({"inputs": inputs})


def post(url: str, path: str, body: bytes, timeout: float = 60.0) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{url}{path}", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def send_http(url: str, case: Case, spec: ModelInputs, transport: str) -> Outcome:
    """HTTP generate, generate_stream (SSE) or infer (lepton_infer); errors as Outcome(error=...)."""
    if transport == "infer":
        status, text = post(url, f"/v2/models/{spec.model}/infer", infer_body(case, spec))
        data = _strict_json(text)
        if status != 200:
            return Outcome(error=_error_of(status, data, text))
        out = {o["name"]: o["data"][0] for o in data["outputs"]}
        return Outcome(None, out["finish_reason"], out["text_output"], out["num_input_tokens"], out["num_output_tokens"])
    status, text = post(url, f"/v2/models/{spec.model}/{transport}", generate_body(case))
    if transport == "generate":
        data = _strict_json(text)
        if status != 200:
            return Outcome(error=_error_of(status, data, text))
        return Outcome(None, data["finish_reason"], data["text_output"], data["num_input_tokens"], data["num_output_tokens"])
    events = [_strict_json(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
    if status != 200 and not events:
        return Outcome(error=_error_of(status, _strict_json(text), text))
    assert events, f"generate_stream answered {status} with no event: {text[:300]!r}"
    if "error" in events[-1]:
        assert status == 400 or len(events) > 1, f"an error event with status {status}: {text[:300]!r}"
        return Outcome(error=events[-1]["error"])
    last = events[-1]
    return Outcome(None, last["finish_reason"], "".join(e["text_output"] for e in events),
                   last["num_input_tokens"], last["num_output_tokens"])


def _error_of(status: int, data, text: str) -> str:
    assert 400 <= status < 600 and isinstance(data, dict) and isinstance(data.get("error"), str), (status, text[:300])
    return data["error"]


def _strict_json(text: str):
    """json.loads that refuses NaN and Infinity (not JSON) in the server's answer."""
    def refuse(name):
        raise AssertionError(f"{name} in the reply: {text[:200]}")
    return json.loads(text, parse_constant=refuse)
