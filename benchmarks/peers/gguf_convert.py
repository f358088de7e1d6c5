"""llama.cpp's convert_hf_to_gguf.py with one change; runs in build/peers/venv.

    build/peers/venv/bin/python benchmarks/peers/gguf_convert.py CONVERT_DIR MODEL_DIR --outfile F --outtype f32

The converter names a BPE tokenizer's pre-tokenizer from a hash of how it splits a test string and
refuses hashes it does not know, as a locally trained byte-level BPE tokenizer's. Such a tokenizer
pre-tokenizes as GPT-2 does, so an unknown hash is mapped to "gpt-2" (a known one is kept).
NOTE: the benchmark sends token ids to llama-server, so its own tokenization never matters there.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def main() -> int:
    convert_dir = Path(sys.argv.pop(1)).resolve()
    sys.path.insert(0, str(convert_dir))
    sys.path.insert(1, str(convert_dir / "gguf-py"))
    import convert_hf_to_gguf
    from conversion.base import TextModel

    known = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            logging.getLogger("gguf_convert").warning("unknown BPE pre-tokenizer hash: writing 'gpt-2'")
            return "gpt-2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    convert_hf_to_gguf.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
