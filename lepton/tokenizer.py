"""The model's tokenizer (HF `tokenizers`), its special tokens and chat template."""

from __future__ import annotations

from dataclasses import dataclass

import tokenizers

from lepton.chat import ChatPrompt, ChatTemplate
from lepton.errors import InvalidRequest, ModelFolderError
from lepton.model_folder import ModelFolder

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # NOTE: where transformers 5 writes the template
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class Tokenizer:
    """Encoding, decoding, the eos ids and the chat template of one model folder."""

    backend: tokenizers.Tokenizer
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    chat_template: ChatTemplate | None = None

    @classmethod
    def from_folder(cls, folder: ModelFolder) -> "Tokenizer":
        """Load tokenizer.json plus the eos/bos and chat template of tokenizer_config.json."""
        backend = tokenizers.Tokenizer.from_file(str(folder.tokenizer_file))
        tok_config = folder.read_json("tokenizer_config.json")
        gen_config = folder.read_json("generation_config.json")
        eos_ids: set[int] = set()
        for source in (gen_config.get("eos_token_id"), folder.config.get("eos_token_id")):
            if isinstance(source, int):
                eos_ids.add(source)
            elif isinstance(source, list):
                eos_ids.update(i for i in source if isinstance(i, int))
        eos_token = _token_text(tok_config.get("eos_token"))
        if eos_token is not None and backend.token_to_id(eos_token) is not None:
            eos_ids.add(backend.token_to_id(eos_token))
        bos_token = _token_text(tok_config.get("bos_token"))
        bos_id = backend.token_to_id(bos_token) if bos_token is not None else None
        return cls(
            backend=backend,
            eos_token_ids=frozenset(eos_ids),
            bos_token_id=bos_id,
            chat_template=_chat_template(folder, tok_config),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text, with the special tokens the tokenizer's post-processor adds (BOS)."""
        # NOTE: encode_batch releases the GIL (encode does not): a 1 MiB prompt tokenized on a
        # front-end thread must not stop the engine thread for its whole duration.
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def render_chat(self, prompt: ChatPrompt) -> str:
        """A conversation as prompt text, through the chat template, the assistant's turn opened."""
        if self.chat_template is None:
            raise InvalidRequest("messages", "this model has no chat template; send text_input instead")
        return self.chat_template.render(prompt, add_generation_prompt=True)

    def encode_chat(self, prompt: ChatPrompt) -> list[int]:
        """Render a conversation with the chat template and tokenize it, as transformers does."""
        text = self.render_chat(prompt)
        # NOTE: the template writes its own special tokens (BOS included): adding them again would
        # double them, so, as apply_chat_template(tokenize=True), none are added here.
        return self.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _chat_template(folder: ModelFolder, tok_config: dict) -> ChatTemplate | None:
    """The folder's chat template (chat_template.jinja wins over tokenizer_config.json), compiled."""
    source = tok_config.get("chat_template")
    if isinstance(source, list):  # NOTE: named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    file = folder.path / CHAT_TEMPLATE_FILE
    if file.is_file():
        source = file.read_text()
    if not isinstance(source, str) or not source.strip():
        return None
    special = {key: text for key in SPECIAL_TOKEN_KEYS if (text := _token_text(tok_config.get(key))) is not None}
    try:
        return ChatTemplate(source, special)
    except Exception as exc:  # NOTE: jinja2.TemplateSyntaxError: the folder is broken, say so at load
        raise ModelFolderError(f"{folder.path}: the chat template does not compile ({exc})") from None


def _token_text(value) -> str | None:
    # NOTE: tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
