"""Small tritonclient wrappers the end-to-end tests share (real gRPC / HTTP calls, no stand-ins)."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

MODEL = "lepton"
# NOTE: config.pbtxt dtypes of the optional tensor inputs.
DTYPES = {
    "max_tokens": np.int32, "top_k": np.int32, "min_tokens": np.int32,
    "temperature": np.float32, "top_p": np.float32, "seed": np.uint64,
    "ignore_eos": np.bool_, "stream": np.bool_, "exclude_input_in_output": np.bool_,
}


@dataclass
class Reply:
    texts: list[str]  # text_output of each response, in order
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int
    logprobs: list = field(default_factory=list)  # entries of the `logprobs` output, when requested

    @property
    def text(self) -> str:
        return "".join(self.texts)


def make_inputs(fields: dict, protocol=grpcclient) -> list:
    """Tensors for a request: strings become BYTES, the rest use the config.pbtxt dtypes."""
    tensors = []
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            array = value
        elif isinstance(value, (str, bytes)) or (isinstance(value, list) and name == "stop"):
            items = value if isinstance(value, list) else [value]
            array = np.array([v.encode() if isinstance(v, str) else v for v in items], dtype=np.object_)
        else:
            array = np.array([value], dtype=DTYPES[name])
        tensor = protocol.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def grpc_generate(url: str, fields: dict, model: str = MODEL, timeout: float = 60.0) -> Reply:
    """One request over a gRPC stream; collects responses until the final one; raises on error."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, make_inputs(fields), enable_empty_final_response=True)
        texts, last, logprobs = [], None, []
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise error
            final = result.get_response().parameters["triton_final_response"].bool_param
            if result.as_numpy("text_output") is not None:
                texts.append(result.as_numpy("text_output")[0].decode())
                last = result
            if result.as_numpy("logprobs") is not None:
                logprobs += json.loads(result.as_numpy("logprobs")[0])
            if final:
                break
        return Reply(
            texts, last.as_numpy("finish_reason")[0].decode(),
            int(last.as_numpy("num_input_tokens")[0]), int(last.as_numpy("num_output_tokens")[0]), logprobs,
        )
    finally:
        client.stop_stream()
        client.close()


def http_post(url: str, path: str, body: dict, timeout: float = 60.0) -> tuple[int, str]:
    """POST JSON; returns (status, body text) for success and HTTP errors alike."""
    request = urllib.request.Request(
        f"http://{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def http_generate(url: str, fields: dict) -> Reply:
    status, text = http_post(url, f"/v2/models/{MODEL}/generate", fields)
    if status != 200:
        raise InferenceServerException(f"HTTP {status}: {text}")
    data = json.loads(text)
    return Reply([data["text_output"]], data["finish_reason"], data["num_input_tokens"], data["num_output_tokens"])


def http_generate_stream(url: str, fields: dict) -> Reply:
    status, text = http_post(url, f"/v2/models/{MODEL}/generate_stream", fields)
    if status != 200:
        raise InferenceServerException(f"HTTP {status}: {text}")
    events = [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
    if "error" in events[-1]:
        raise InferenceServerException(events[-1]["error"])
    last = events[-1]
    return Reply(
        [e["text_output"] for e in events], last["finish_reason"], last["num_input_tokens"], last["num_output_tokens"]
    )
