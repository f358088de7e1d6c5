"""Errors in OpenAI's format, `{"error": {"message", "type", "param", "code"}}`, with their HTTP status."""

from __future__ import annotations

import re

from starlette.responses import JSONResponse

BUSY_PREFIX = "server busy"  # NOTE: how Lepton's model words a full queue (UNAVAILABLE)
SHUTTING_DOWN_PREFIX = "server shutting down"  # NOTE: and a drain before it stops (UNAVAILABLE)
INTERNAL_PREFIX = "internal error: "  # NOTE: how Lepton's model words a failure inside the engine
# NOTE: Triton puts "[request id: ...] " before some messages on a gRPC stream.
_REQUEST_ID = re.compile(r"^\[request id: [^\]]*\]\s*")
_FIELD = re.compile(r"^([a-z_][a-z0-9_]*)(?:\[\d+\])?(?:\.[a-z_]+)*: ")  # "max_tokens: ", "messages[0].role: "
# NOTE: Triton's own checks of a request's tensors (before the model sees it).
_TRITON_INPUT_PHRASES = ("inference input", "unexpected shape", "unexpected datatype", "expected shape")


class ApiError(Exception):
    """An error answered to the client with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unauthorized() -> ApiError:
    return ApiError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                    code="invalid_api_key")


def model_not_found(model: str, served: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist; this server serves `{served}`.",
                    param="model", code="model_not_found")


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")


def internal(message: str) -> ApiError:
    return ApiError(500, message, type_="server_error", code="internal_error")


def unavailable(message: str, code: str = "server_busy") -> ApiError:
    return ApiError(503, message, type_="server_error", code=code)


def shutting_down() -> ApiError:
    return unavailable("The server is shutting down and accepts no new requests; retry on another server.",
                       code="server_shutting_down")


def from_triton_message(message: str) -> ApiError:
    """The ApiError for an error response of Lepton's model (its gRPC stream carries no status code)."""
    message = _REQUEST_ID.sub("", message.strip())
    if message.startswith(BUSY_PREFIX):
        return unavailable(message)
    if message.startswith(SHUTTING_DOWN_PREFIX):
        return shutting_down()
    if message.startswith(INTERNAL_PREFIX):
        return internal(message)
    field = _FIELD.match(message)
    if field:  # NOTE: Lepton's InvalidRequest: "<field>: <what is wrong>"
        if field.group(1) == "text_input":  # NOTE: the one input named otherwise in OpenAI's API
            return bad_request("prompt" + message[len("text_input"):], param="prompt")
        return bad_request(message, param=field.group(1))
    if any(phrase in message for phrase in _TRITON_INPUT_PHRASES):
        return bad_request(message)
    return internal(message)
