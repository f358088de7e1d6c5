"""Host memory: what is available, what the KV cache may take, and whether a model fits at all."""

from __future__ import annotations

import os
from pathlib import Path

from lepton.config import CacheConfig
from lepton.errors import ModelFolderError

GIB = 1 << 30


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (memory obtainable without swapping)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_budget_bytes(cache: CacheConfig, weight_bytes: int) -> int:
    """The KV pools' size: a fraction of what the weights leave available, or a fixed number of bytes."""
    if cache.kv_cache_memory_fraction:
        return int(cache.kv_cache_memory_fraction * max(0, available_bytes() - weight_bytes))
    return cache.kv_cache_memory_bytes


def check_fits(source: Path, weight_bytes: int, kv_bytes: int) -> None:
    """Refuse at load time, with the figures, a model whose weights and KV pools exceed available memory."""
    available = available_bytes()
    if weight_bytes + kv_bytes > available:
        raise ModelFolderError(
            f"{source}: weights ({weight_bytes / GIB:.2f} GiB) + KV cache ({kv_bytes / GIB:.2f} GiB) need more "
            f"than the {available / GIB:.2f} GiB of memory available; lower kv_cache_memory_bytes "
            f"(or kv_cache_memory_fraction) or serve a quantized variant"
        )
