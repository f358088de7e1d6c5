"""EngineConfig: strict parsing of config.pbtxt parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from lepton.config import EngineConfig
from lepton.errors import ConfigError


def test_parameters_are_typed_and_routed_to_sections(tmp_path):
    cfg = EngineConfig.from_parameters({
        "model_dir": "m", "block_size": "32", "kv_cache_memory_bytes": "64M", "enable_prefix_caching": "false",
        "max_num_seqs": "8", "policy": "priority", "dtype": "bfloat16", "max_model_len": "512",
    }, base_dir=tmp_path)
    assert cfg.model_dir == (tmp_path / "m").resolve()
    assert cfg.cache.block_size == 32 and cfg.cache.kv_cache_memory_bytes == 64 << 20
    assert cfg.cache.enable_prefix_caching is False
    assert cfg.scheduler.max_num_seqs == 8 and cfg.scheduler.policy == "priority"
    assert cfg.runner.dtype == "bfloat16" and cfg.max_model_len == 512
    assert cfg.stream_interval == 1
    assert EngineConfig.from_parameters({"model_dir": "/m", "stream_interval": "8"}).stream_interval == 8


@pytest.mark.parametrize("size,expected", [("1024", 1024), ("2K", 2048), ("3MiB", 3 << 20), ("1g", 1 << 30)])
def test_sizes(size, expected):
    assert EngineConfig.from_parameters({"model_dir": "/m", "kv_cache_memory_bytes": size}).cache.kv_cache_memory_bytes == expected


@pytest.mark.parametrize("params,words", [
    ({}, "model_dir"),
    ({"model_dir": "/m", "max_num_seq": "4"}, "unknown parameter 'max_num_seq'"),
    ({"model_dir": "/m", "block_size": "sixteen"}, "block_size: expected int"),
    ({"model_dir": "/m", "block_size": "0"}, "block_size: must be >= 1"),
    ({"model_dir": "/m", "enable_prefix_caching": "maybe"}, "enable_prefix_caching: expected bool"),
    ({"model_dir": "/m", "dtype": "float16"}, "dtype: must be one of"),
    ({"model_dir": "/m", "policy": "lifo"}, "policy: must be one of"),
    ({"model_dir": "/m", "kv_cache_memory_bytes": "12X"}, "kv_cache_memory_bytes"),
    ({"model_dir": "/m", "kv_cache_memory_fraction": "1.5"}, "kv_cache_memory_fraction: must be in [0, 1)"),
    ({"model_dir": "/m", "stream_interval": "0"}, "stream_interval: must be in [1, 1024], got 0"),
    ({"model_dir": "/m", "stream_interval": "1025"}, "stream_interval: must be in [1, 1024], got 1025"),
])
def test_bad_parameters_fail_with_the_key(params, words):
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_parameters(params)
    assert words in str(info.value)


def test_absolute_model_dir_ignores_base(tmp_path):
    assert EngineConfig.from_parameters({"model_dir": "/abs/m"}, base_dir=tmp_path).model_dir == Path("/abs/m")
