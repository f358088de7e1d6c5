"""A dense forward pass of the step model's weights: whole padded sequences, no KV cache.

For embeddings: every position's final hidden state of a batch of right-padded sequences in one
pass. Attention is causal, as the model was trained; padding is masked out of every key, and since
no real token ever sees a later position, right padding leaves the real positions unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lepton.models.llama import Attention, PagedCausalLM, rotate_half


@torch.inference_mode()
def hidden_states(model: PagedCausalLM, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden states [B, L, H] of input_ids [B, L] whose rows hold lengths [B] real tokens."""
    num_positions = input_ids.shape[1]
    positions = torch.arange(num_positions)
    x = model.model.embed_tokens(input_ids)
    cos = model.cos_cache[positions].unsqueeze(1).to(x.dtype)  # [L, 1, D]: broadcast over heads
    sin = model.sin_cache[positions].unsqueeze(1).to(x.dtype)
    causal = positions.view(-1, 1) >= positions.view(1, -1)  # [query, key]
    # NOTE: a padding query still sees key 0, so no row of the mask is empty (no NaN to discard).
    mask = (causal.unsqueeze(0) & (positions.view(1, 1, -1) < lengths.view(-1, 1, 1))).unsqueeze(1)
    for layer in model.model.layers:
        attended = _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, mask)
        x = x + attended
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.model.norm(x)


def _attention(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    batch, length, _ = x.shape
    q, k, v = attn.qkv_proj(x).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q = q.view(batch, length, attn.num_heads, attn.head_dim)
    k = k.view(batch, length, attn.num_kv_heads, attn.head_dim)
    v = v.view(batch, length, attn.num_kv_heads, attn.head_dim)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, scale=attn.scale, enable_gqa=True,
    )
    return attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
