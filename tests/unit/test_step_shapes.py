"""benchmarks.step_shapes refuses a step its runner's pools cannot hold, with the parameter to raise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from benchmarks.step_shapes import _check_pools
from lepton.config import EngineConfig


def test_a_step_larger_than_the_pools_is_a_clear_error():
    config = EngineConfig.from_parameters({"model_dir": "unused", "kv_cache_memory_bytes": "256M"})
    size = config.cache.block_size
    args = SimpleNamespace(decodes=16, context=448, prefill=128)
    needed = 16 * -(-449 // size) + -(-128 // size)
    _check_pools(SimpleNamespace(num_blocks=needed), args, config)  # NOTE: exactly enough passes
    with pytest.raises(SystemExit, match=rf"need {needed} blocks of {size} tokens; the pools hold {needed - 1} "
                                         r"\(kv_cache_memory_bytes 268435456\): raise --param kv_cache_memory_bytes"):
        _check_pools(SimpleNamespace(num_blocks=needed - 1), args, config)
