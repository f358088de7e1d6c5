"""OpenAI request bodies (pydantic) and what each becomes for Lepton's Triton model.

Unknown fields are refused, as OpenAI's own API refuses them; fields that change the meaning of a
request and that Lepton cannot honour (tools, logit_bias, n > 1, ...) are refused with a clear 400;
fields that do not change the answer (user, store, metadata, ...) are accepted and ignored.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from openai_api.errors import bad_request


class _Strict(BaseModel):
    # NOTE: strict: "8" is not a number and 1 is not a boolean, as in OpenAI's API.
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False  # a last chunk with `usage` (and no choices) before [DONE]


class SamplingRequest(_Strict):
    """Fields that completions and chat completions share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None  # default: the Triton model's default_max_tokens
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # ignored
    # NOTE: vLLM's extensions, passed to the engine as they are.
    top_k: int | None = None  # -1 (vLLM) and 0 both mean no top-k cut
    min_p: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check(self) -> None:
        """Refuse what Lepton cannot honour (ApiError 400, naming the field)."""
        if self.n != 1:
            raise bad_request(f"n: only n=1 is supported, got {self.n}", param="n")
        if self.logit_bias:
            raise bad_request("logit_bias: not supported", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options: only allowed when stream is true", param="stream_options")

    def sampling_parameters(self) -> dict:
        """The `sampling_parameters` JSON object for Triton (engine names; unset fields left out)."""
        fields = {
            "max_tokens": self.requested_max_tokens(), "temperature": self.temperature, "top_p": self.top_p,
            "seed": self.seed, "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
            "top_k": 0 if self.top_k == -1 else self.top_k, "min_p": self.min_p,
            "min_tokens": self.min_tokens, "ignore_eos": self.ignore_eos,
            "repetition_penalty": self.repetition_penalty, "stop_token_ids": self.stop_token_ids,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens, "logprobs": self.num_logprobs(),
        }
        return {key: value for key, value in fields.items() if value is not None}

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        """Top alternatives per token (0: the sampled token's logprob only); None: no logprobs."""
        return None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and not (len(self.prompt) == 1 and isinstance(self.prompt[0], str)):
            raise bad_request("prompt: one prompt string per request is supported (token ids and batches "
                              "are not)", param="prompt")
        if self.echo:
            raise bad_request("echo: not supported", param="echo")
        if self.suffix:
            raise bad_request("suffix: not supported", param="suffix")
        if self.best_of not in (None, 1):
            raise bad_request(f"best_of: only best_of=1 is supported, got {self.best_of}", param="best_of")

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def num_logprobs(self) -> int | None:
        return self.logprobs


class ContentPart(_Strict):
    # NOTE: other keys allowed, so that an image part gets "only text parts", not a schema error
    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # ignored
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None

    def as_template_message(self, index: int) -> dict:
        """{role, content} as the chat template takes it (text parts joined; the model checks the role)."""
        if self.tool_calls:
            raise bad_request(f"messages[{index}].tool_calls: tools are not supported", param="messages")
        content = self.content or ""
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(f"messages[{index}].content: only text parts are supported, got "
                                      f"type {part.type!r}", param="messages")
            content = "".join(part.text for part in content)
        return {"role": self.role, "content": content}


# NOTE: chat fields that would change the answer in ways Lepton cannot honour: refused when set.
_UNSUPPORTED_CHAT_FIELDS = ("tools", "functions", "function_call", "audio", "prediction", "web_search_options")


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None  # wins over max_tokens, its deprecated name
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None  # {"type": "text"} only
    tool_choice: str | dict[str, Any] | None = None  # "none" / "auto" only (there are no tools)
    modalities: list[str] | None = None  # ["text"] only
    # NOTE: accepted and ignored: they do not change the answer.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # NOTE: refused when set (_UNSUPPORTED_CHAT_FIELDS).
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None

    def check(self) -> None:
        super().check()
        for name in _UNSUPPORTED_CHAT_FIELDS:
            if getattr(self, name):
                raise bad_request(f"{name}: not supported", param=name)
        if self.tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice: tools are not supported", param="tool_choice")
        if self.response_format and self.response_format.get("type") != "text":
            raise bad_request("response_format: only {\"type\": \"text\"} is supported", param="response_format")
        if self.modalities and self.modalities != ["text"]:
            raise bad_request("modalities: only [\"text\"] is supported", param="modalities")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs: needs logprobs to be true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise bad_request(f"top_logprobs: must be in 0..20, got {self.top_logprobs}", param="top_logprobs")

    def messages_json(self) -> str:
        """The `messages` input for Triton: a JSON list of {role, content}."""
        return json.dumps([m.as_template_message(i) for i, m in enumerate(self.messages)], ensure_ascii=False)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
