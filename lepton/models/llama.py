"""Llama-family decoder (Llama, Qwen2, Mistral) computing one engine step over a paged KV cache.

One call computes the tokens of several sequences at once (prefill chunks and decode tokens
together). Past K/V are gathered from per-layer block pools through each sequence's block table;
the step's own K/V are returned for the caller to write into the pools, so the graph never
writes a pool and exports to ONNX as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lepton.errors import ModelFolderError


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers the step graph needs, read from config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry biases (Qwen2)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        """Parse a Llama / Qwen2 / Mistral config.json dict."""
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelFolderError(f"hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
        num_heads = cfg["num_attention_heads"]
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        max_pos = cfg.get("max_position_embeddings", 2048)
        if window is not None and window < max_pos and cfg["model_type"] == "mistral":
            raise ModelFolderError(
                f"sliding_window {window} is smaller than max_position_embeddings {max_pos}; "
                "sliding-window attention is not supported"
            )
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", cfg["model_type"] == "qwen2")),
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:  # NOTE: the torch runner in bfloat16: one fused op (never exported)
            return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(dtype)
        x = x.float()
        # NOTE: written as a division by sqrt so that ONNX Runtime fuses it into SimplifiedLayerNormalization
        # (x * rsqrt(...) exports as Sqrt + Reciprocal + Mul, which it does not match).
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """GQA self-attention; q, k and v projections fused into one matrix (see loader.fuse_projections)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x, cos, sin, batch: "StepIndex", k_pool, v_pool):
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if isinstance(batch, StepIndex):  # NOTE: the exported graph
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.reshape(num_tokens, self.num_heads, self.head_dim)
            k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
            v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            out = paged_attention(q, k, v, k_pool, v_pool, batch, self.scale)
            return self.o_proj(out), k, v
        # NOTE: in place (the torch runner): queries and keys are rotated together, one set of element-wise
        # ops a layer instead of two (eager PyTorch pays per op).
        q_and_k = qkv[:, : self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, -1)
        q, k = (q_and_k * cos + rotate_half(q_and_k) * sin).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        write_kv(k_pool, v_pool, k, v, batch[0].slot_mapping)
        out = grouped_attention(q, k_pool, v_pool, batch, self.scale)
        return self.o_proj(out), k, v


@dataclass
class StepIndex:
    """Index tensors of one step, shared by all layers (see `make_step_index`)."""

    token_index: torch.Tensor  # [S, Q] flat token of each (sequence, query slot); padding -> 0
    token_slot: torch.Tensor  # [T] position of each flat token in the [S * Q] padded layout
    block_tables: torch.Tensor  # [S, B]
    mask: torch.Tensor  # additive causal bias [S, 1, 1, Q, B * bs], float32
    slot_mapping: torch.Tensor | None = None  # [T] pool slots; set: K/V are written before attention
    tokens: torch.Tensor | None = None  # [T_g] flat tokens of this group (grouped in-place steps only)
    key_rows: torch.Tensor | None = None  # read-only: [S, KVH, B * bs] row of each key in a pool viewed [-1, D]
    new_rows: tuple[torch.Tensor, ...] = ()  # read-only: (sequence [T, 1], head [1, KVH], position [T, 1])
    from_start: bool = False  # in place: every sequence's first query is position 0 (mask = plain causal)


def make_step_index(positions, token_index, token_slot, query_lens, context_lens, block_tables,
                    block_size: int, num_kv_heads: int):
    """Read-only step: where each sequence's keys lie in the pools, and a causal mask by position.

    Keys are gathered per (sequence, KV head) as [S, KVH, B * bs, D]; this step's K/V are then put at
    their positions in that copy, so attention needs no concatenation and masks by position alone.
    """
    num_seqs, max_q = token_index.shape
    num_keys = block_tables.shape[1] * block_size
    key_pos = torch.arange(num_keys, device=block_tables.device)
    slots = block_tables[:, key_pos // block_size] * block_size + key_pos % block_size  # [S, K]
    heads = torch.arange(num_kv_heads, device=block_tables.device)
    key_rows = slots.unsqueeze(1) * num_kv_heads + heads.view(1, -1, 1)  # [S, KVH, K]
    query_pos = positions[token_index]  # [S, Q]; padding repeats a real token's position
    allowed = (key_pos.view(1, 1, -1) <= query_pos.unsqueeze(-1)) & (key_pos < context_lens.view(-1, 1, 1))
    # NOTE: padding query slots see no key (their rows are dropped by token_slot anyway).
    allowed = allowed & (torch.arange(max_q, device=block_tables.device) < query_lens.view(-1, 1)).unsqueeze(-1)
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(~allowed, MASKED)
    seq_of_token = torch.div(token_slot, max_q, rounding_mode="floor")
    new_rows = (seq_of_token.unsqueeze(1), heads.unsqueeze(0), positions.unsqueeze(1))
    return StepIndex(token_index, token_slot, block_tables, bias.view(num_seqs, 1, 1, max_q, num_keys),
                     key_rows=key_rows, new_rows=new_rows)


# NOTE: a finite "minus infinity": a row with every key masked stays finite (never NaN).
MASKED = -1e30


def make_in_place_index(positions, block_size: int, slot_mapping, groups) -> list[StepIndex]:
    """Per group (token_index, token_slot, block_tables, tokens): an additive causal bias over pooled keys."""
    index = []
    for token_index, token_slot, block_tables, tokens in groups:
        query_pos = positions[token_index]  # [S, Q]
        key_pos = torch.arange(block_tables.shape[1] * block_size, device=positions.device)
        allowed = key_pos.view(1, 1, -1) <= query_pos.unsqueeze(-1)
        bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill_(~allowed, MASKED)
        num_seqs, max_q = token_index.shape
        from_start = max_q > 1 and not bool(query_pos[:, 0].any())
        index.append(StepIndex(token_index, token_slot, block_tables, bias.view(num_seqs, 1, 1, max_q, -1),
                               slot_mapping, tokens, from_start=from_start))
    return index


def write_kv(k_pool, v_pool, k, v, slot_mapping) -> None:
    """Store this step's K/V at their pool slots (block * block_size + offset)."""
    k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, slot_mapping, k)
    v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, slot_mapping, v)


def grouped_attention(q, k_pool, v_pool, groups: list[StepIndex], scale: float) -> torch.Tensor:
    """pooled_attention of each group, assembled in flat token order."""
    if len(groups) == 1:
        return pooled_attention(q, k_pool, v_pool, groups[0], scale)
    out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
    for group in groups:
        out.index_copy_(0, group.tokens, pooled_attention(q, k_pool, v_pool, group, scale))
    return out


def pooled_attention(q, k_pool, v_pool, batch: StepIndex, scale: float) -> torch.Tensor:
    """Causal attention over keys gathered from the pool alone (this step's K/V already written)."""
    num_seqs, max_q = batch.token_index.shape
    num_blocks, _, num_kv_heads, head_dim = k_pool.shape
    group = q.shape[1] // num_kv_heads
    blocks = batch.block_tables.reshape(-1)
    # NOTE: index_select over whole blocks copies rows of block_size * KVH * D values, far faster
    # than advanced indexing on the 4-d pool.
    keys = k_pool.view(num_blocks, -1).index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim)
    values = v_pool.view(num_blocks, -1).index_select(0, blocks).view(num_seqs, -1, num_kv_heads, head_dim)
    if max_q > 1:  # NOTE: for prompt chunks the flash kernel is the faster one (512 tokens: 0.8x the products)
        # NOTE: prompts with nothing cached: query i sees keys 0..i, which is SDPA's own causal mask (top-left
        # aligned); keys past a row's context are past all of its queries. No mask to read, half the blocks.
        mask = None if batch.from_start else batch.mask.view(num_seqs, 1, max_q, -1).to(q.dtype)
        out = F.scaled_dot_product_attention(
            q[batch.token_index].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=mask, is_causal=batch.from_start, scale=scale, enable_gqa=True,
        )
        return out.transpose(1, 2).reshape(num_seqs * max_q, -1)[batch.token_slot]
    # NOTE: decodes: two batched products and a float32 softmax, not F.scaled_dot_product_attention, whose
    # CPU flash kernel took half of a 16-decode bfloat16 step (1.7 ms a layer for one query per sequence).
    queries = (q * scale)[batch.token_index].view(num_seqs, max_q, num_kv_heads, group, head_dim)
    queries = queries.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, group * max_q, head_dim)
    scores = torch.matmul(queries, keys.permute(0, 2, 3, 1)).view(num_seqs, num_kv_heads, group, max_q, -1)
    probs = torch.softmax(scores.float() + batch.mask, dim=-1).to(values.dtype)
    out = torch.matmul(probs.view(num_seqs, num_kv_heads, group * max_q, -1), values.transpose(1, 2))
    out = out.view(num_seqs, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(num_seqs * max_q, -1)[batch.token_slot]


def paged_attention(q, k, v, k_pool, v_pool, batch: StepIndex, scale: float) -> torch.Tensor:
    """Causal attention of this step's queries over pooled past K/V plus this step's K/V (pools read only)."""
    num_seqs, max_q = batch.token_index.shape
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    group = q.shape[1] // num_kv_heads
    # NOTE: one row gather per pool straight into [S, KVH, K, D]: no per-layer transpose or concat;
    # index_select exports as Gather (axis 0), which ONNX Runtime runs faster than GatherND.
    rows = batch.key_rows.reshape(-1)
    keys = k_pool.reshape(-1, head_dim).index_select(0, rows).view(batch.key_rows.shape + (head_dim,))
    values = v_pool.reshape(-1, head_dim).index_select(0, rows).view(batch.key_rows.shape + (head_dim,))
    keys, values = keys.index_put(batch.new_rows, k), values.index_put(batch.new_rows, v)
    queries = (q * scale)[batch.token_index].view(num_seqs, max_q, num_kv_heads, group, head_dim)
    queries = queries.permute(0, 2, 3, 1, 4).reshape(num_seqs, num_kv_heads, group * max_q, head_dim)
    scores = torch.matmul(queries, keys.transpose(2, 3)).view(num_seqs, num_kv_heads, group, max_q, -1)
    probs = torch.softmax(scores.float() + batch.mask, dim=-1).to(values.dtype)
    out = torch.matmul(probs.view(num_seqs, num_kv_heads, group * max_q, -1), values)
    out = out.view(num_seqs, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(num_seqs * max_q, -1)[batch.token_slot]


class MLP(nn.Module):
    """SwiGLU; gate and up projections fused into one matrix."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, batch, k_pool, v_pool):
        attn, k, v = self.self_attn(self.input_layernorm(x), cos, sin, batch, k_pool, v_pool)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class Backbone(nn.Module):
    """`model.*` of the HF checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def rope_tables(inv_freq: torch.Tensor, attention_scaling: float, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_positions, head_dim / 2] of every position (rotate-half layout: each half of a
    head uses the same table)."""
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


class PagedCausalLM(nn.Module):
    """The whole model as one step function over flat tokens and per-layer K/V pools."""

    def __init__(self, cfg: ModelConfig, block_size: int) -> None:
        super().__init__()
        self.cfg, self.block_size = cfg, block_size
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("cos_cache", torch.empty(0), persistent=False)
        self.register_buffer("sin_cache", torch.empty(0), persistent=False)

    def set_rope(self, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        """Precompute cos/sin tables for every position up to max_position_embeddings."""
        cos, sin = rope_tables(inv_freq, attention_scaling, self.cfg.max_position_embeddings)
        self.cos_cache, self.sin_cache = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)

    def forward(self, input_ids, positions, token_index, token_slot, query_lens, context_lens,
                block_tables, logits_indices, k_pools: list[torch.Tensor], v_pools: list[torch.Tensor]):
        """Logits at logits_indices [L, V] and this step's K/V, stacked [layers, T, KVH, D].

        The pools are only read: this is the graph that is exported to ONNX.
        """
        batch = make_step_index(positions, token_index, token_slot, query_lens, context_lens, block_tables,
                                self.block_size, self.cfg.num_kv_heads)
        logits, new_k, new_v = self._run(input_ids, positions, logits_indices, batch, k_pools, v_pools)
        return logits, torch.stack(new_k), torch.stack(new_v)

    def step_in_place(self, input_ids, positions, logits_indices, slot_mapping, groups,
                      k_pools: list[torch.Tensor], v_pools: list[torch.Tensor]) -> torch.Tensor:
        """Logits at logits_indices [L, V]; each layer writes its K/V into the pools before attention.

        groups: (token_index, token_slot, block_tables, tokens) per attention group (lepton.batch).
        """
        batch = make_in_place_index(positions, self.block_size, slot_mapping, groups)
        return self._run(input_ids, positions, logits_indices, batch, k_pools, v_pools)[0]

    def _run(self, input_ids, positions, logits_indices, batch: StepIndex, k_pools, v_pools):
        x = self.model.embed_tokens(input_ids)
        cos = self.cos_cache[positions].unsqueeze(1).to(x.dtype)
        sin = self.sin_cache[positions].unsqueeze(1).to(x.dtype)
        new_k, new_v = [], []
        for layer, k_pool, v_pool in zip(self.model.layers, k_pools, v_pools):
            x, k, v = layer(x, cos, sin, batch, k_pool, v_pool)
            new_k.append(k)
            new_v.append(v)
        x = self.model.norm(x[logits_indices])
        return self.lm_head(x).float(), new_k, new_v
