"""Build a PagedCausalLM from a model folder: config, RoPE tables and safetensors weights."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lepton.errors import ModelFolderError
from lepton.model_folder import ModelFolder
from lepton.models.llama import ModelConfig, PagedCausalLM

# NOTE: RoPE types whose frequencies do not depend on the sequence length; "dynamic" rescales
# per forward pass and cannot be precomputed into one table.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)


def rope_parameters(folder: ModelFolder) -> tuple[torch.Tensor, float]:
    """inv_freq and the attention scaling factor, computed by transformers' own RoPE code."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = AutoConfig.from_pretrained(folder.path, trust_remote_code=False)
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise ModelFolderError(f"rope type {rope_type!r} is not supported; supported: {STATIC_ROPE_TYPES}")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        dim = int(dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv_freq, 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq, float(scaling)


def weight_bytes(folder: ModelFolder, dtype: torch.dtype) -> int:
    """Bytes the weights take once loaded in dtype, from the safetensors headers alone."""
    itemsize = torch.finfo(dtype).bits // 8
    total = 0
    for file in folder.weight_files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                numel = 1
                for dim in handle.get_slice(name).get_shape():
                    numel *= dim
                total += numel * itemsize
    return total


def load_model(folder: ModelFolder, dtype: torch.dtype, block_size: int) -> PagedCausalLM:
    """Instantiate the step model and load weights from safetensors only (never pickle)."""
    cfg = ModelConfig.from_hf(folder.config)
    inv_freq, scaling = rope_parameters(folder)
    with torch.device("meta"):
        model = PagedCausalLM(cfg, block_size=block_size)
    state: dict[str, torch.Tensor] = {}
    for file in folder.weight_files:
        state.update(load_file(str(file)))
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_WEIGHT_SUFFIXES)}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = fuse_projections(state, cfg.num_layers)
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelFolderError(
            f"{folder.path}: weights do not match the {folder.model_type} architecture; "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.set_rope(inv_freq, scaling)
    return model.eval()



# NOTE: HF checkpoints keep q/k/v and gate/up as separate matrices; the step model multiplies
# once by each concatenation (fewer, larger matrix products).
FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_projections(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Concatenate per-layer q/k/v and gate/up weights (and biases) into the fused names."""
    state = dict(state)
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"{prefix}{part}.{kind}" for part in parts]
                present = [name in state for name in names]
                if all(present):
                    state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(name) for name in names], dim=0)
                elif any(present):
                    raise ModelFolderError(f"layer {layer}: {kind} of only some of {parts} present")
    return state
