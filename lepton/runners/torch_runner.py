"""Runs the paged step model with PyTorch; owns the K/V pools, allocated once at start."""

from __future__ import annotations

import torch

from lepton.batch import ModelInput
from lepton.config import EngineConfig
from lepton.errors import ConfigError
from lepton.memory import check_fits, kv_budget_bytes
from lepton.model_folder import ModelFolder
from lepton.models.batch_invariant import make_batch_invariant, pad_queries
from lepton.models.loader import load_model, weight_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TorchRunner:
    """Model weights plus per-layer K and V block pools of shape [num_blocks, block_size, KVH, D]."""

    def __init__(self, folder: ModelFolder, config: EngineConfig) -> None:
        torch.set_num_threads(config.runner.compute_threads)
        self.dtype = DTYPES[config.runner.dtype]
        self.block_size = config.cache.block_size
        weights = weight_bytes(folder, self.dtype)
        kv_bytes = kv_budget_bytes(config.cache, weights)
        check_fits(folder.path, weights, kv_bytes)
        self.model = load_model(folder, self.dtype, self.block_size)
        self.deterministic = config.runner.deterministic
        if self.deterministic:
            make_batch_invariant(self.model)
        cfg = self.model.cfg
        self.model_config = cfg
        bytes_per_block = 2 * cfg.num_layers * self.block_size * cfg.num_kv_heads * cfg.head_dim
        bytes_per_block *= torch.finfo(self.dtype).bits // 8
        self.num_blocks = kv_bytes // bytes_per_block
        if self.num_blocks < 1:
            raise ConfigError(
                f"kv_cache_memory_bytes: {kv_bytes} bytes hold no KV block of {bytes_per_block} bytes; raise it"
            )
        shape = (self.num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim)
        # NOTE: zero-filled so masked-out slots never hold NaN (0 * NaN would poison attention).
        self.k_pools = [torch.zeros(shape, dtype=self.dtype) for _ in range(cfg.num_layers)]
        self.v_pools = [torch.zeros(shape, dtype=self.dtype) for _ in range(cfg.num_layers)]

    @torch.inference_mode()
    def execute(self, batch: ModelInput) -> torch.Tensor:
        """Compute one step (its K/V go into the pools layer by layer), return float32 logits [L, vocab]."""
        groups = []
        for g in batch.groups:
            token_index, token_slot = g.token_index, g.token_slot
            if self.deterministic:  # NOTE: see lepton/models/batch_invariant.py
                token_index, token_slot = pad_queries(token_index, token_slot)
            groups.append(tuple(torch.from_numpy(a) for a in (token_index, token_slot, g.block_tables, g.tokens)))
        return self.model.step_in_place(
            torch.from_numpy(batch.input_ids), torch.from_numpy(batch.positions),
            torch.from_numpy(batch.logits_indices), torch.from_numpy(batch.slot_mapping), groups,
            self.k_pools, self.v_pools,
        )
