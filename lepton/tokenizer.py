"""The model's tokenizer (HF `tokenizers`), its special tokens and chat template."""

from __future__ import annotations

from dataclasses import dataclass

import tokenizers

from lepton.model_folder import ModelFolder


@dataclass(frozen=True)
class Tokenizer:
    """Encoding, decoding and the eos ids of one model folder."""

    backend: tokenizers.Tokenizer
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    chat_template: str | None

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
            chat_template=tok_config.get("chat_template"),
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with the special tokens the tokenizer's post-processor adds (BOS)."""
        # NOTE: encode_batch releases the GIL (encode does not): a 1 MiB prompt tokenized on a
        # front-end thread must not stop the engine thread for its whole duration.
        return self.backend.encode_batch([text], add_special_tokens=True)[0].ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)


def _token_text(value) -> str | None:
    # NOTE: tokenizer_config.json stores special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
