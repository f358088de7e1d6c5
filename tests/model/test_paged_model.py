"""The step model's two attention paths agree: read-only pools (exported) and in-place writes (torch runner)."""

from __future__ import annotations

import numpy as np
import torch

from lepton.batch import build_model_input
from lepton.block_manager import KVCacheManager
from lepton.config import SchedulerConfig
from lepton.model_folder import ModelFolder
from lepton.models.loader import load_model
from lepton.sampling_params import SamplingParams
from lepton.scheduler import Scheduler
from lepton.sequence import Sequence

BLOCK_SIZE = 16
NUM_BLOCKS = 64


def test_in_place_and_read_only_steps_give_the_same_logits(demo_model_dir):
    model = load_model(ModelFolder.open(demo_model_dir), torch.float32, BLOCK_SIZE)
    cfg = model.cfg
    shape = (NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    pools = {mode: ([torch.zeros(shape) for _ in range(cfg.num_layers)],
                    [torch.zeros(shape) for _ in range(cfg.num_layers)]) for mode in ("read_only", "in_place")}
    kv = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=False)
    # NOTE: take blocks in a shuffled order so block tables are not contiguous.
    for block_id in np.random.default_rng(0).permutation(NUM_BLOCKS).tolist():
        kv._free.move_to_end(block_id)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=40), kv)
    rng = np.random.default_rng(1)
    for i, n in enumerate((37, 5, 60)):
        scheduler.add(Sequence(f"s{i}", rng.integers(5, cfg.vocab_size, n).tolist(), SamplingParams(max_tokens=8), 512))
    with torch.inference_mode():
        for _ in range(8):  # chunked prefills mixed with decodes, ragged batches
            out = scheduler.schedule()
            batch = build_model_input(out, BLOCK_SIZE)
            t = {k: torch.from_numpy(getattr(batch, k)) for k in (
                "input_ids", "positions", "token_index", "token_slot", "query_lens", "context_lens",
                "block_tables", "logits_indices", "slot_mapping")}
            k_pools, v_pools = pools["read_only"]
            logits, new_k, new_v = model(t["input_ids"], t["positions"], t["token_index"], t["token_slot"],
                                         t["query_lens"], t["context_lens"], t["block_tables"],
                                         t["logits_indices"], k_pools, v_pools)
            for layer in range(cfg.num_layers):
                k_pools[layer].view(-1, *shape[2:])[t["slot_mapping"]] = new_k[layer]
                v_pools[layer].view(-1, *shape[2:])[t["slot_mapping"]] = new_v[layer]
            groups = [tuple(torch.from_numpy(a) for a in (g.token_index, g.token_slot, g.block_tables, g.tokens))
                      for g in batch.groups]
            in_place = model.step_in_place(t["input_ids"], t["positions"], t["logits_indices"],
                                           t["slot_mapping"], groups, *pools["in_place"])
            assert torch.allclose(logits, in_place, atol=1e-5, rtol=0), (logits - in_place).abs().max()
            for a, b in zip(pools["read_only"][0], pools["in_place"][0]):
                assert torch.allclose(a, b, atol=1e-5, rtol=0)  # NOTE: later layers carry 1e-7-level noise
            tokens = logits.argmax(-1).tolist()
            scheduler.update(out, dict(zip(batch.sample_request_ids, tokens)))
