"""Host memory: what is available, what the KV cache may take, and whether a model fits at all."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lepton.config import CacheConfig
from lepton.errors import ModelFolderError

GIB = 1 << 30
# NOTE: a decode streams every weight each step; in 4 KiB pages that is a page walk every 4 KiB and the
# hardware prefetchers stop at each page's end. Products of one row on this project's 2-core EPYC, weights in
# huge pages against 4 KiB ones: q8_0 5.6-6.6 -> 4.5-5.7 ms, bfloat16 9.7-11.9 -> 7.8-8.5, float32 (ONNX
# Runtime's own) 18.2-19.2 -> 12.7-16.7 (docs/performance.md, 2026-12-05). LEPTON_HUGE_PAGES=0 asks for none.
HUGE_PAGES_SETTING = "LEPTON_HUGE_PAGES"  # NOTE: "0": no weights collapsed into huge pages
HUGE_PAGE = 2 << 20
MADV_POPULATE_WRITE = 23  # NOTE: Linux 5.14+
MADV_COLLAPSE = 25


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (memory obtainable without swapping)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def transparent_huge_pages() -> str:
    """The kernel's transparent huge page mode (always, madvise or never; "unknown" where it cannot tell)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return next((word[1:-1] for word in text.split() if word.startswith("[")), "unknown")


def huge_pages_wanted() -> bool:
    """Whether the engines collapse their weights into huge pages: the kernel gives them and
    LEPTON_HUGE_PAGES is not 0."""
    return transparent_huge_pages() != "never" and os.environ.get(HUGE_PAGES_SETTING) != "0"


def _madvise(start: int, length: int, advice: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(start, length, advice) == 0


def _huge_span(start: int, end: int) -> tuple[int, int]:
    """The whole 2 MiB pages inside [start, end)."""
    return -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE


@dataclass(frozen=True)
class Mapping:
    """One mapping of /proc/self/smaps: its address range, whether it is private writable anonymous memory
    (the heap included), and its counters in bytes (Rss, AnonHugePages, ...)."""

    low: int
    high: int
    anonymous: bool
    sizes: dict[str, int]


def mappings() -> list[Mapping]:
    """This process's mappings as /proc/self/smaps lists them (none where it cannot be read)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return []
    found: list[Mapping] = []
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and len(fields) >= 5:
            low, high = (int(x, 16) for x in fields[0].split("-"))
            anonymous = fields[1].startswith("rw") and (len(fields) == 5 or fields[5] == "[heap]")
            found.append(Mapping(low, high, anonymous, {}))
        elif found and fields[0].endswith(":") and len(fields) == 3 and fields[2] == "kB":
            found[-1].sizes[fields[0][:-1]] = int(fields[1]) << 10
    return found


def advise_huge_pages(min_bytes: int = 32 << 20) -> int:
    """Collapse this process's large anonymous mappings that are resident now (at load: the weights ONNX
    Runtime and Lepton's operators hold) into transparent huge pages (MADV_COLLAPSE, Linux 6.1+, whatever
    the kernel's THP mode but never): returns the bytes collapsed. Nothing is advised for later faults:
    memory first touched while serving (the K/V pools and slots; with glibc's malloc.hugetlb tunable, every
    allocation of the server) would pay for its huge pages in the middle of requests (zeroing 2 MiB a
    fault, compacting memory to find one); served runs with it were no faster (docs/performance.md)."""
    if not huge_pages_wanted():
        return 0
    return sum(_collapse(m, min_bytes) for m in mappings())


def _collapse(mapping: Mapping, min_bytes: int) -> int:
    start, end = _huge_span(mapping.low, mapping.high)
    resident = mapping.sizes.get("Rss", 0)
    if not mapping.anonymous or end - start < min_bytes or resident * 10 < (mapping.high - mapping.low) * 9:
        return 0
    return end - start if _madvise(start, end - start, MADV_COLLAPSE) else 0


def populate(array: np.ndarray) -> None:
    """Fault in the pages of a freshly zeroed array now (MADV_POPULATE_WRITE; one write a page where the
    kernel lacks it): the K/V pools, sized once at load. Left to fault in while serving, each 4 KiB of them
    cost a page fault (and zeroing) the first time a step wrote a token's keys and values there: about half
    of a 16-decode step's copy into the pools on a fresh server (SmolLM2: 0.66-0.78 -> 0.35-0.40 ms), ~23,000
    faults for 16 prompts of 128 tokens. 4 KiB pages (0.33 s a GiB here): huge ones for the pools took
    0.09-2.2 s a GiB, the kernel compacting memory, for a copy 0.35 ms instead of 0.385 (docs/performance.md)."""
    if array.nbytes == 0:
        return
    start, end = array.ctypes.data, array.ctypes.data + array.nbytes
    page = os.sysconf("SC_PAGE_SIZE")
    first = start // page * page
    if not _madvise(first, end - first, MADV_POPULATE_WRITE):
        flat = array.reshape(-1).view(np.uint8)
        flat[(-start) % page::page] = 0
        flat[0] = 0


def aligned_zeros(shape: tuple[int, ...], dtype, alignment: int = 64) -> np.ndarray:
    """np.zeros(shape, dtype) whose data starts on an `alignment`-byte boundary (numpy's own start 16 bytes
    past one): the native K/V copy writes pools and slots with streaming stores only where rows are so
    aligned (lepton/native/kv_copy.c)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(size + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + size].view(dtype).reshape(shape)


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
