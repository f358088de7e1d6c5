"""Triton request tensors <-> engine requests: pure functions, no Triton import.

Two request styles are accepted, as real clients send them:
- vLLM-backend style (genai-perf `--backend vllm`): `text_input`, `stream`,
  `sampling_parameters` (a JSON object as a string), `exclude_input_in_output`;
- tensor style (TensorRT-LLM ensemble): `max_tokens`, `temperature`, `top_p`, `top_k`, `seed`,
  `stop`, `min_tokens`, `ignore_eos` as tensors of their own.
Precedence: a field given as its own tensor overrides the same key in `sampling_parameters`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from lepton.chat import ChatPrompt, parse_messages
from lepton.config import LimitsConfig
from lepton.errors import InvalidRequest
from lepton.sampling_params import BOOL_FIELDS, FIELD_NAMES, MAX_STOP_STRINGS, SamplingParams, show_keys, show_value

MAX_PROMPT_BYTES = 1 << 20
MAX_PROMPT_TOKENS = 1 << 20  # NOTE: input_ids; the engine refuses any prompt past the model's context
PROMPT_INPUTS = ("text_input", "messages", "input_ids")
MAX_SAMPLING_PARAMETERS_BYTES = 64 << 10
# NOTE: tensor-style inputs and the SamplingParams field each one sets.
TENSOR_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "min_tokens", "ignore_eos",
                 "repetition_penalty", "presence_penalty", "frequency_penalty")
# NOTE: TensorRT-LLM's names for the same fields (genai-perf --backend tensorrtllm sends min_length).
TENSOR_ALIASES = {"min_length": "min_tokens", "random_seed": "seed"}
INT_FIELDS = {"max_tokens", "top_k", "seed", "min_tokens", "logprobs", "priority"}
FLOAT_FIELDS = {"temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"}
TUPLE_FIELDS = {"stop", "stop_token_ids"}


@dataclass(frozen=True)
class GenerateRequest:
    """A parsed, validated request, ready for the engine."""

    prompt: str | ChatPrompt | list[int]  # text_input, the `messages` conversation, or input_ids
    params: SamplingParams
    stream: bool
    exclude_input_in_output: bool


def convert_request(
    inputs: Mapping[str, np.ndarray], default_max_tokens: int, parameters: Mapping[str, object] | None = None,
    limits: LimitsConfig = LimitsConfig(),
) -> GenerateRequest:
    """Parse input tensors (name -> numpy array) into a GenerateRequest or raise InvalidRequest;
    `parameters` are the request's Triton parameters, refused (see refuse_parameters); `limits` are
    the server's (request size, max_tokens, stop strings, logprobs; the prompt's tokens are the engine's)."""
    refuse_parameters(parameters or {})
    check_size(inputs, limits.max_request_bytes)
    given = [name for name in PROMPT_INPUTS if name in inputs]
    if len(given) > 1:
        raise InvalidRequest(given[-1], f"give one of {', '.join(PROMPT_INPUTS)}, not {' and '.join(given)}")
    if not given:
        raise InvalidRequest("text_input", "required input is missing (or give messages or input_ids)")
    prompt = read_text(inputs, "text_input")
    if prompt is not None and not prompt.strip():
        raise InvalidRequest("text_input", "the prompt is empty")
    if prompt is None:
        prompt = read_messages(inputs) if given[0] == "messages" else read_token_ids(inputs["input_ids"])
    fields = _sampling_parameters(inputs.get("sampling_parameters"))
    for name, field in (*((n, n) for n in TENSOR_FIELDS), *TENSOR_ALIASES.items()):
        if name in inputs:
            fields[field] = _tensor_value(field, inputs[name])
    fields.setdefault("max_tokens", default_max_tokens)
    params = SamplingParams(**fields)
    limits.check(params)
    return GenerateRequest(
        prompt=prompt,
        params=params,
        stream=_bool(inputs, "stream", False),
        exclude_input_in_output=_bool(inputs, "exclude_input_in_output", False),
    )


def check_size(inputs: Mapping[str, np.ndarray], limit: int) -> None:
    """Raise InvalidRequest, naming the largest input, when the inputs together exceed limit bytes."""
    sizes = {name: _nbytes(array) for name, array in inputs.items()}
    total = sum(sizes.values())
    if total > limit:
        largest = max(sizes, key=sizes.get)
        raise InvalidRequest(largest, f"the request's inputs are {total} bytes, at most {limit} (max_request_bytes); "
                                      f"{largest} is {sizes[largest]}")


def _nbytes(array: np.ndarray) -> int:
    if array.dtype != np.object_:
        return int(array.nbytes)
    return sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in array.reshape(-1))


def refuse_parameters(parameters: Mapping[str, object]) -> None:
    """Raise InvalidRequest naming the first request parameter: none is taken, and none is dropped."""
    # NOTE: Triton's HTTP `generate` turns every JSON key that is not an input into a request
    # parameter, so a misspelled field ("max_token") or a sampling key beside the inputs ("min_p")
    # would otherwise be ignored without a word.
    if not parameters:
        return
    names = sorted(parameters)
    field = names[0] if _PLAIN_NAME.fullmatch(names[0]) else "parameters"
    raise InvalidRequest(field, f"not an input of this model (unknown parameter(s) {show_keys(names)}); "
                                "sampling fields without an input of their own go in sampling_parameters")


_PLAIN_NAME = re.compile(r"[A-Za-z_][\w.-]{0,63}", re.ASCII)


def read_text(inputs: Mapping[str, np.ndarray], name: str) -> str | None:
    """The one UTF-8 string of input name (None when absent), at most MAX_PROMPT_BYTES."""
    if name not in inputs:
        return None
    values = inputs[name].reshape(-1)
    if values.size != 1:
        raise InvalidRequest(name, f"expected exactly one string, got {values.size}")
    raw = values[0]
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_PROMPT_BYTES:
        raise InvalidRequest(name, f"at most {MAX_PROMPT_BYTES} bytes, got {len(raw)}")
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(name, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def read_messages(inputs: Mapping[str, np.ndarray]) -> ChatPrompt | None:
    """The `messages` input (a JSON list of {role, content}) parsed, or None when absent."""
    text = read_text(inputs, "messages")
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest("messages", f"invalid JSON: {exc.msg} at char {exc.pos}") from None
    except (ValueError, RecursionError):
        raise InvalidRequest("messages", "invalid JSON: a number too long or nesting too deep") from None
    return parse_messages(data)


def read_token_ids(array: np.ndarray, name: str = "input_ids") -> list[int]:
    """One sequence of token ids ([L] or [1, L], any integer dtype), each >= 0; the vocab is checked later."""
    if array.dtype.kind not in "iu":
        raise InvalidRequest(name, f"expected INT32 or INT64 token ids, got {array.dtype}")
    if array.ndim > 1 and array.shape[0] != 1:
        raise InvalidRequest(name, f"expected one sequence of token ids, got shape {list(array.shape)}")
    ids = array.reshape(-1)
    if ids.size == 0:
        raise InvalidRequest(name, "the prompt is empty")
    if ids.size > MAX_PROMPT_TOKENS:
        raise InvalidRequest(name, f"at most {MAX_PROMPT_TOKENS} token ids, got {ids.size}")
    if ids.min() < 0:
        raise InvalidRequest(name, f"token ids must be >= 0, got {int(ids.min())}")
    return ids.astype(np.int64).tolist()


def _bool(inputs: Mapping[str, np.ndarray], name: str, default: bool) -> bool:
    if name not in inputs:
        return default
    values = inputs[name].reshape(-1)
    if values.size != 1 or values.dtype != np.bool_:
        raise InvalidRequest(name, "expected one BOOL value")
    return bool(values[0])


def _sampling_parameters(array: np.ndarray | None) -> dict:
    if array is None:
        return {}
    text = read_text({"sampling_parameters": array}, "sampling_parameters")
    if len(text) > MAX_SAMPLING_PARAMETERS_BYTES:
        raise InvalidRequest(
            "sampling_parameters", f"at most {MAX_SAMPLING_PARAMETERS_BYTES} bytes, got {len(text)}"
        )
    try:
        data = json.loads(text) if text and text.strip() else {}
    except json.JSONDecodeError as exc:
        raise InvalidRequest("sampling_parameters", f"invalid JSON: {exc.msg} at char {exc.pos}") from None
    except ValueError:  # NOTE: an integer past Python's digit limit (4,300)
        raise InvalidRequest("sampling_parameters", "invalid JSON: a number is too long") from None
    except RecursionError:
        raise InvalidRequest("sampling_parameters", "invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("sampling_parameters", "must be a JSON object")
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise InvalidRequest(
            "sampling_parameters",
            f"unknown key(s) {show_keys(unknown)}; allowed: {', '.join(sorted(FIELD_NAMES))}",
        )
    return {key: _json_value(key, value) for key, value in data.items()}


def _json_value(key: str, value):
    # NOTE: JSON numbers are checked by SamplingParams; only shapes are normalized here.
    if key == "stop" and isinstance(value, str):
        return (value,)
    if key in TUPLE_FIELDS:
        if not isinstance(value, list):
            raise InvalidRequest(key, "must be a list")
        return tuple(value)
    if key in FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 64:
        return float(value)
    if key in BOOL_FIELDS:
        return _json_bool(key, value)
    if isinstance(value, str) and key in INT_FIELDS | FLOAT_FIELDS:
        return _numeric_string(key, value)
    return value


_INT_STRING = re.compile(r"[+-]?\d{1,20}")
_FLOAT_STRING = re.compile(r"[+-]?(\d{1,40}(\.\d{0,40})?|\.\d{1,40})([eE][+-]?\d{1,3})?")


def _numeric_string(key: str, value: str):
    # NOTE: Triton's vLLM backend (and genai-perf --backend vllm, which sends {"max_tokens": "64"})
    # takes numbers as strings for its numeric keys; anything else stays a string and is refused
    # by SamplingParams with the usual "must be an integer / a number" message.
    text = value.strip()
    if _INT_STRING.fullmatch(text):
        return int(text) if key in INT_FIELDS else float(text)
    if key in FLOAT_FIELDS and _FLOAT_STRING.fullmatch(text):
        return float(text)
    return value


def _json_bool(key: str, value) -> bool:
    # NOTE: JSON true/false, and the strings "true"/"false" that Triton's vLLM backend also takes.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidRequest(key, f"must be true or false, got {show_value(value)}")


def _tensor_value(name: str, array: np.ndarray):
    values = array.reshape(-1)
    if name == "stop":
        if values.size > MAX_STOP_STRINGS:
            raise InvalidRequest(name, f"at most {MAX_STOP_STRINGS} stop strings, got {values.size}")
        return tuple(read_text({name: np.array([v], dtype=object)}, name) for v in values)
    if values.size != 1:
        raise InvalidRequest(name, f"expected exactly one value, got {values.size}")
    value = values[0].item() if hasattr(values[0], "item") else values[0]
    if name in INT_FIELDS and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if name in FLOAT_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


MIN_LOGPROB = -9999.0  # NOTE: -inf is not JSON; masked tokens report this (as vLLM does)


def logprobs_json(per_token: list) -> list[dict]:
    """Sampler logprobs ([(sampled id, lp)] + top-n [(id, lp)] per token) as JSON-ready dicts."""
    def clamp(value: float) -> float:
        value = float(value)
        return value if value >= MIN_LOGPROB else MIN_LOGPROB  # NOTE: NaN too: JSON has no NaN

    return [
        {"token_id": entries[0][0], "logprob": clamp(entries[0][1]),
         "top_logprobs": [[token, clamp(lp)] for token, lp in entries[1:]]}
        for entries in per_token
    ]
