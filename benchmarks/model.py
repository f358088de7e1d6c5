"""The benchmark model: SmolLM-135M's shape with seeded random weights and the demo tokenizer."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# NOTE: embedding rows of ids that decode to no complete text are scaled by this, see build_model.
MUTED_ROW_SCALE = 0.01


@dataclass(frozen=True)
class SmolLMShape:
    """HuggingFaceTB/SmolLM-135M's architecture numbers; the weights are random."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    seed: int = 0


def muted_token_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids that decode to nothing or to a partial UTF-8 character (held back by a streamer)."""
    known = tokenizer.get_vocab_size()
    muted = [i for i in range(known) if _incomplete(tokenizer.decode([i]))]
    return muted + list(range(known, vocab_size))


def _incomplete(text: str) -> bool:
    return text == "" or "\ufffd" in text


def build_model(out_dir: Path, demo_dir: Path, shape: SmolLMShape = SmolLMShape()) -> Path:
    """Write config.json, model.safetensors and the demo tokenizer files into out_dir (once)."""
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    import tokenizers
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizers.Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    demo_config = json.loads((demo_dir / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings, rms_norm_eps=shape.rms_norm_eps,
        rope_theta=shape.rope_theta, initializer_range=shape.initializer_range,
        tie_word_embeddings=True, bos_token_id=demo_config["bos_token_id"],
        eos_token_id=demo_config["eos_token_id"], pad_token_id=demo_config["pad_token_id"],
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # NOTE: the tokenizer knows 4k of the 49k ids. With random weights, greedy decoding would mostly
    # pick ids that decode to nothing, so a streaming server sends no response for them and TTFT /
    # ITL cannot be seen from the client. Shrinking those rows of the tied embedding keeps their
    # logits near 0, below the best known token's; the compute per token is unchanged.
    muted = torch.tensor(muted_token_ids(tokenizer, shape.vocab_size))
    with torch.no_grad():
        model.model.embed_tokens.weight[muted] *= MUTED_ROW_SCALE
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(demo_dir / name, tmp_dir / name)
    tok_config_file = tmp_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_file.read_text())
    tok_config["model_max_length"] = shape.max_position_embeddings
    tok_config_file.write_text(json.dumps(tok_config, indent=2) + "\n")
    (tmp_dir / "lepton_bench_model.json").write_text(json.dumps({
        "shape": asdict(shape), "muted_token_ids": len(muted), "muted_row_scale": MUTED_ROW_SCALE,
        "tokenizer": str(demo_dir), "torch": torch.__version__,
    }, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_dir.rename(out_dir)
    return out_dir


def weight_bytes(model_dir: Path) -> int:
    """Bytes of all weights as stored (a tied embedding counts once), from the safetensors headers."""
    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total
