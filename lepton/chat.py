"""Chat messages -> prompt text through the model's own chat template.

The template comes from an untrusted model folder, so it renders in Jinja's immutable sandbox with
the same environment transformers gives it (trim_blocks, lstrip_blocks, loop controls, a `tojson`
that does not escape HTML, `raise_exception`, `strftime_now`) and the same variables (`messages`,
`add_generation_prompt`, the special tokens such as `bos_token` and `eos_token`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lepton.errors import InvalidRequest
from lepton.sampling_params import is_unicode, show_keys, show_value

ROLES = ("system", "user", "assistant", "tool", "developer")
MESSAGE_KEYS = frozenset({"role", "content", "name"})
MAX_MESSAGES = 4096


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    content: str
    name: str | None = None

    def as_dict(self) -> dict:
        entry = {"role": self.role, "content": self.content}
        if self.name is not None:
            entry["name"] = self.name
        return entry


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to render with the model's template, followed by the assistant's turn."""

    messages: tuple[ChatMessage, ...]


def parse_messages(data, field: str = "messages") -> ChatPrompt:
    """Validate a decoded JSON list of {role, content[, name]} into a ChatPrompt."""
    if not isinstance(data, list) or not data:
        raise InvalidRequest(field, "must be a non-empty JSON list of {role, content} objects")
    if len(data) > MAX_MESSAGES:
        raise InvalidRequest(field, f"at most {MAX_MESSAGES} messages, got {len(data)}")
    return ChatPrompt(tuple(_message(entry, f"{field}[{i}]") for i, entry in enumerate(data)))


def _message(entry, where: str) -> ChatMessage:
    if not isinstance(entry, dict):
        raise InvalidRequest(where, "must be an object with role and content")
    unknown = sorted(set(entry) - MESSAGE_KEYS)
    if unknown:
        raise InvalidRequest(where, f"unknown key(s) {show_keys(unknown)}; allowed: content, name, role")
    role = entry.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {show_value(role)}")
    content = entry.get("content")
    if isinstance(content, list):  # NOTE: OpenAI's content parts; only text parts exist here
        content = "".join(_text_part(part, f"{where}.content[{j}]") for j, part in enumerate(content))
    if not isinstance(content, str):
        raise InvalidRequest(f"{where}.content", f"must be a string, got {show_value(content)}")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise InvalidRequest(f"{where}.name", f"must be a string, got {show_value(name)}")
    for key, text in (("content", content), ("name", name or "")):
        if not is_unicode(text):
            raise InvalidRequest(f"{where}.{key}", "holds a lone surrogate (a \\ud800-\\udfff escape), not text")
    return ChatMessage(role, content, name)


def _text_part(part, where: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise InvalidRequest(where, 'only {"type": "text", "text": "..."} parts are supported')
    return part["text"]



class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self.special_tokens = dict(special_tokens)
        self._template = env.from_string(source)

    def render(self, prompt: ChatPrompt, add_generation_prompt: bool = True) -> str:
        """The prompt text; a template error is the request's error (field `messages`)."""
        try:
            return self._template.render(
                messages=[m.as_dict() for m in prompt.messages],
                add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise InvalidRequest("messages", f"the model's chat template refused them: {exc}") from None


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # NOTE: as transformers: Jinja's own tojson escapes HTML characters, which templates do not expect.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
