"""Hypothesis strategies for adversarial requests, and the oracle that judges the answers.

A case is a valid base request with at most one thing broken (the "target"): one field's value,
dtype or shape, the prompt, `sampling_parameters` or `messages`, an unknown input, or (HTTP only)
the JSON body itself (fuzz_transports.py sends it). The oracle: either a valid answer, or an error
that is short, carries no traceback or file path, and names the target (`target: ...` from Lepton,
`'target'` from Triton).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

DTYPES = {"TYPE_STRING": np.object_, "TYPE_BOOL": np.bool_, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64,
          "TYPE_UINT64": np.uint64, "TYPE_FP32": np.float32}
INT_RANGES = {np.int32: (-(1 << 31), (1 << 31) - 1), np.int64: (-(1 << 63), (1 << 63) - 1), np.uint64: (0, (1 << 64) - 1)}
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed", "stop", "stop_token_ids", "include_stop_str_in_output", "min_tokens",
                 "ignore_eos", "logprobs", "skip_special_tokens", "priority")
ALIASES = {"min_length": "min_tokens", "random_seed": "seed", "min_tokens": "min_length", "seed": "random_seed"}
# NOTE: Triton's HTTP front end parses the JSON body before any model sees it; these are its own
# messages for a value of the wrong JSON type or a body it cannot parse, and name no field.
TRITON_JSON_ERRORS = re.compile(
    r"^(Unable to parse '(data|shape)'|Unable to parse JSON bytes array|failed to parse the request JSON buffer"
    r"|attempt to get members for non-object|generate expects model to produce exactly 1 response)"
)
MAX_MESSAGE_CHARS = 400
LEAKS = ("Traceback", ".py", "At:", "internal error", "Failed to process the request", "<class ")


class RawJSON(str):
    """JSON text sent verbatim (a number too big for a double, deep nesting)."""


@dataclass(frozen=True)
class Case:
    """One request: its fields, what was broken, and what may come back."""

    fields: dict  # input name -> Python value, numpy array (gRPC / infer) or RawJSON
    target: str  # "" for the unbroken base request
    targets: frozenset[str]  # names an error may name
    expect: str  # "ok", "error" or "either"
    max_tokens: int | None  # None when broken
    body: bytes | None = None  # HTTP: this body instead of the fields (a broken body)
    json_types: bool = False  # a value of any JSON type: Triton's own parse errors are fine too


@dataclass(frozen=True)
class Outcome:
    """What the server answered: an error message, or the reply's fields."""

    error: str | None = None
    finish_reason: str = ""
    text: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0


# --- values -----------------------------------------------------------------------------------

def texts(max_size: int = 24):
    """Short text, control characters and odd Unicode (NUL, BOM, RTL, emoji, line separators) included."""
    odd = st.sampled_from(["\x00", "\x01", "\x7f", "\ufeff", "\u202e", "\u2028", "\U0001F600", "\t", "\r\n", "é", "字"])
    return st.lists(st.one_of(st.characters(codec="utf-8"), odd), max_size=max_size).map("".join)


def prompts():
    """Valid prompts: some non-blank text."""
    return st.tuples(texts(16), st.text("abcdefgh XYZ.", min_size=1, max_size=24).filter(str.strip), texts(8)).map("".join)


def bad_prompts():
    """(value, expect): empty, blank, invalid UTF-8, lone surrogates, odd but valid text."""
    return st.one_of(
        st.just(("", "error")),
        st.text(" \t\n\r\u3000\u2028\u00a0", min_size=1, max_size=8).map(lambda s: (s, "error")),
        st.binary(min_size=1, max_size=16).filter(lambda b: not _is_utf8(b)).map(lambda b: (b"ok " + b, "error")),
        st.sampled_from(["\ud800", "a\udfffb", "\udbff\udc00x\ud800"]).map(lambda s: (s, "error")),
        texts(32).filter(str.strip).map(lambda s: (s, "ok")),
    )


def json_values():
    """Any JSON value, nested a little; numbers include NaN, infinities and huge integers."""
    leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=1 << 64, max_value=1 << 200),
                       st.floats(allow_nan=True, allow_infinity=True), texts(12),
                       st.sampled_from(["64", "1e999", "nan", "true", "\ud800", " 7 ", "0x10", "-0"]))
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(texts(6), inner, max_size=3)), max_leaves=6)


def wire_ints(dtype):
    """Integers the dtype can carry on the wire, boundaries first."""
    low, high = INT_RANGES[dtype]
    edges = [v for v in (low, high, -1, 0, 1, 2, 1023, 1024, 1025, 1 << 20, (1 << 20) + 1, (1 << 63) - 1)
             if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def wire_floats():
    return st.one_of(st.sampled_from([0.0, -0.0, 1e-45, 1.0, 2.0, 100.0, 100.01, -2.0, math.nan, math.inf, -math.inf]),
                     st.floats(width=32, allow_nan=True, allow_infinity=True))


def stop_lists():
    """(stop strings, expect): at and past the count and length limits, empty strings, bad text."""
    one = st.one_of(st.text("abc xyz", min_size=1, max_size=4), st.sampled_from(["x" * 256, "y" * 257, "", "\ud800"]),
                    st.binary(min_size=1, max_size=4).filter(lambda b: not _is_utf8(b)))
    return st.one_of(st.lists(one, max_size=6), st.integers(15, 18).map(lambda n: ["s"] * n))


def sampling_parameters():
    """(JSON text, keys in it): valid and broken objects, malformed text, deep nesting, huge input."""
    keys = st.one_of(st.sampled_from(SAMPLING_KEYS), texts(8), st.sampled_from(["\ud800", "k" * 5000, "max_token"]))
    objects = st.dictionaries(keys, json_values(), max_size=4).map(lambda d: (_dumps(d), frozenset(d)))
    nested = st.sampled_from([10, 1000, 100_000]).map(
        lambda n: ('{"stop": ' + "[" * n + "]" * n + "}", frozenset({"stop"})))
    raw = st.one_of(st.sampled_from(['{"temperature": 1e999}', '{"top_k": NaN}', '{"seed": ' + "9" * 5000 + "}",
                                     "null", "[]", "{", '{"max_tokens": 4,}', '{"stop": ["' + "x" * 70_000 + '"]}']),
                    texts(20)).map(lambda s: (s, frozenset({"stop", "seed", "top_k", "temperature", "max_tokens"})))
    return st.one_of(objects, nested, raw)


def messages_values():
    """(messages JSON text, expect): chats, with roles, contents and shapes valid or not."""
    role = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer"]), json_values())
    content = st.one_of(texts(16), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts(8)}), max_size=2),
                        json_values())
    message = st.one_of(st.fixed_dictionaries({"role": role, "content": content}),
                        st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls"]), json_values(),
                                        max_size=3))
    return st.one_of(st.lists(message, max_size=3).map(_dumps), json_values().map(_dumps),
                     st.sampled_from(["[" * 5000 + "]" * 5000, "[{", '[{"role": "user", "content": "\\ud800"}]']))


def _dumps(value) -> str:
    return json.dumps(value)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# --- cases ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInputs:
    """A model's inputs as its config declares them, and what the fuzzer needs of the model."""

    model: str
    dtypes: dict  # input name -> numpy dtype
    dims: dict  # input name -> declared dims
    context: int  # the model's context, prompt + max_tokens
    context_prompts: dict = field(repr=False)  # prompt token count -> a text_input of exactly that many tokens


    def _repr_pretty_(self, printer, cycle) -> None:  # NOTE: Hypothesis prints the strategy's arguments
        printer.text(f"ModelInputs({self.model!r})")


def model_inputs(config: dict, context: int, context_prompts: dict) -> ModelInputs:
    """From tritonclient's get_model_config(..., as_json=True)["config"]."""
    inputs = config["input"]
    return ModelInputs(config["name"], {i["name"]: DTYPES[i["data_type"]] for i in inputs},
                       {i["name"]: [int(d) for d in i["dims"]] for i in inputs}, context, context_prompts)


@st.composite
def cases(draw, spec: ModelInputs, transport: str) -> Case:
    """A valid base request, then at most one thing broken (see the module docstring)."""
    max_tokens = draw(st.integers(1, 6))
    fields = {"text_input": draw(prompts()), "max_tokens": max_tokens}
    extras = {
        "temperature": st.floats(0.0, 2.0, width=32), "top_p": st.floats(0.0625, 1.0, width=32),
        "top_k": st.integers(0, 50), "seed": st.integers(0, (1 << 63) - 1), "ignore_eos": st.booleans(),
        "exclude_input_in_output": st.booleans(),
        "stop": st.lists(st.text("abc xyz", min_size=1, max_size=3), min_size=1, max_size=3),
        "repetition_penalty": st.floats(0.5, 2.0, width=32), "frequency_penalty": st.floats(-2.0, 2.0, width=32),
        "sampling_parameters": st.fixed_dictionaries({}, optional={
            "min_p": st.floats(0.0, 1.0), "logprobs": st.integers(0, 5), "skip_special_tokens": st.booleans(),
            "include_stop_str_in_output": st.sampled_from([True, False, "true", "False"])}).map(_dumps),
    }
    for name in draw(st.lists(st.sampled_from(sorted(extras)), max_size=4, unique=True)):
        if name in spec.dtypes:
            fields[name] = draw(extras[name])
    if "stream" in spec.dtypes:
        fields["stream"] = {"grpc": draw(st.booleans()), "generate": False, "generate_stream": True}[transport]
    kinds = ["none", "prompt", "missing_prompt", "context", "value", "value", "value", "unknown_input"]
    kinds += ["messages"] if "messages" in spec.dtypes else []
    kinds += ["dtype", "shape"] if transport in ("grpc", "infer") else []
    kinds += ["body"] if transport != "grpc" else []
    kind = draw(st.sampled_from(kinds))
    return _break(draw, kind, fields, spec, transport)


def _break(draw, kind: str, fields: dict, spec: ModelInputs, transport: str) -> Case:
    max_tokens = fields["max_tokens"]
    if kind == "none":
        return Case(fields, "", frozenset(), "ok", max_tokens)
    if kind == "prompt":
        fields["text_input"], expect = draw(bad_prompts())
        return Case(fields, "text_input", frozenset({"text_input"}), expect, max_tokens)
    if kind == "missing_prompt":
        del fields["text_input"]
        return Case(fields, "text_input", frozenset({"text_input"}), "error", max_tokens)
    if kind == "context":
        num_tokens = draw(st.sampled_from(sorted(spec.context_prompts)))
        fields["text_input"] = spec.context_prompts[num_tokens]
        expect = "ok" if num_tokens + max_tokens <= spec.context else "error"
        return Case(fields, "max_tokens", frozenset({"max_tokens", "text_input"}), expect, max_tokens)
    if kind == "messages":
        both = draw(st.booleans()) and draw(st.booleans())
        if not both:
            del fields["text_input"]
        fields["messages"] = draw(messages_values())
        return Case(fields, "messages", frozenset({"messages", "text_input"}), "error" if both else "either", max_tokens)
    if kind == "unknown_input":
        name = draw(st.one_of(st.from_regex(r"[a-z_][a-z0-9_]{0,15}", fullmatch=True),
                              st.sampled_from(["max_token", "min_p", "x" * 80])))
        if name in spec.dtypes:
            return Case(fields, "", frozenset(), "ok", max_tokens)
        fields[name] = draw(json_values()) if transport.startswith("generate") else np.array([1], np.int32)
        return Case(fields, name, frozenset({name, "parameters"}), "error", max_tokens,
                    json_types=transport.startswith("generate"))
    if kind == "body":
        body = draw(st.sampled_from([b"", b"null", b"[1]", b"{", b'{"text_input": "Hi"', b"\xff\xfe{}",
                                     b'{"text_input": "caf\xc3\x28"}', b"[" * 100_000 + b"]" * 100_000,
                                     b'{"text_input": NaN}', b'{"inputs": 5}', b'{"inputs": [{"name": 1}]}']))
        return Case(fields, "body", frozenset(), "error", max_tokens, body=body, json_types=True)
    name = draw(st.sampled_from(sorted(n for n in spec.dtypes if n != "stream" or transport == "grpc")))
    targets = frozenset({name, ALIASES.get(name, name)})
    if kind == "dtype":
        dtype = draw(st.sampled_from([np.int32, np.int64, np.float32, np.float64, np.bool_, np.uint8, np.object_]))
        if dtype == spec.dtypes[name]:
            return Case(fields, "", frozenset(), "ok", max_tokens)
        fields[name] = np.array([b"1"] if dtype == np.object_ else [1], dtype=dtype)
        return Case(fields, name, targets, "error", max_tokens if name != "max_tokens" else None)
    if kind == "shape":
        shape = draw(st.sampled_from([(0,), (2,), (1, 1), (3, 2)]))
        dtype = spec.dtypes[name]
        fill = b"s" if dtype == np.object_ else 1
        fields[name] = np.full(shape, fill, dtype=dtype)
        return Case(fields, name, targets, "either", max_tokens if name != "max_tokens" else None)
    value, expect, extra_targets, json_types = _value(draw, name, spec, transport)
    fields[name] = value
    return Case(fields, name, targets | extra_targets, expect, max_tokens if name != "max_tokens" else _int_or_none(value),
                json_types=json_types)


def _value(draw, name: str, spec: ModelInputs, transport: str):
    """(value, expect, more names the error may use, any JSON type) for one field."""
    dtype = spec.dtypes[name]
    if transport != "grpc" and draw(st.integers(0, 3)) == 0:
        return draw(json_values()), "either", frozenset(), True
    if name == "sampling_parameters":
        text, keys = draw(sampling_parameters())
        return text, "either", keys | {ALIASES.get(k, k) for k in keys}, False
    if name == "messages":
        return draw(messages_values()), "either", frozenset({"text_input"}), False
    if name == "text_input":
        value, expect = draw(bad_prompts())
        return value, expect, frozenset(), False
    if name == "stop":
        return draw(stop_lists()), "either", frozenset(), False
    if dtype == np.object_:
        return draw(texts(12)), "either", frozenset(), False
    if dtype == np.bool_:
        return draw(st.booleans()), "ok", frozenset(), False
    if dtype == np.float32:
        return draw(wire_floats()), "either", frozenset(), False
    # NOTE: a valid max_tokens in the hundreds would generate for seconds; keep the valid ones short.
    value = draw(wire_ints(dtype).filter(lambda v: name != "max_tokens" or v <= 16 or v > spec.context))
    return value, "either", frozenset({"max_tokens"} if name in ("min_tokens", "min_length") else ()), False


def _int_or_none(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- the oracle -------------------------------------------------------------------------------

def check(case: Case, outcome: Outcome) -> None:
    """A valid answer, or a short, clean error naming what was broken; AssertionError otherwise."""
    if outcome.error is None:
        assert case.expect != "error", f"{case.target or 'the request'} was broken but answered: {outcome}"
        assert outcome.finish_reason in ("stop", "length"), outcome
        assert outcome.num_input_tokens >= 1 and outcome.num_output_tokens >= 1, outcome
        if case.max_tokens is not None:
            assert outcome.num_output_tokens <= case.max_tokens, outcome
        return
    message = outcome.error
    assert case.expect != "ok", f"a valid request failed: {message[:MAX_MESSAGE_CHARS]}"
    assert len(message) < MAX_MESSAGE_CHARS, f"message of {len(message)} characters: {message[:MAX_MESSAGE_CHARS]}"
    assert not any(leak in message for leak in LEAKS), f"message leaks internals: {message}"
    message.encode("utf-8")
    if not case.targets or (case.json_types and TRITON_JSON_ERRORS.match(message)):
        return  # NOTE: a broken body, or a value Triton's JSON parser refused: Triton's own words
    plain = re.sub(r"^\[request id: [^\]]*\] ", "", message)
    named = {m.group(1) for m in re.finditer(r"'([^']*)'", plain)} | {re.split(r"[:\[.]", plain, 1)[0]}
    assert named & case.targets, f"broke {case.target!r} (may name {sorted(case.targets)}), error names none: {message}"
