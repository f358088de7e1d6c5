"""lepton.memory: arrays aligned for the native K/V copy, and transparent huge pages for large mappings."""

from __future__ import annotations

import ctypes
import mmap
import platform
from pathlib import Path

import numpy as np
import pytest

import lepton.memory as memory
from lepton.memory import advise_huge_pages, aligned_zeros, mappings, populate, transparent_huge_pages


def test_aligned_zeros_start_on_the_boundary():
    for shape, dtype, boundary in (((3, 5, 7), np.float16, 64), ((1000, 17), np.float32, 64),
                                   ((1,), np.int64, 64)):
        array = aligned_zeros(shape, dtype)
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous and array.flags.writeable
        assert array.ctypes.data % boundary == 0 and not array.any()


def anon_huge_bytes(address: int) -> int:
    """AnonHugePages of the mapping that holds address (this process's total moves with whatever else the
    test session freed or collapsed meanwhile)."""
    mapping = next((m for m in mappings() if m.low <= address < m.high), None)
    assert mapping is not None, f"no mapping holds {address:#x}"
    return mapping.sizes["AnonHugePages"]


def kernel_version() -> tuple[int, int]:
    major, minor = (platform.release().split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def resident_mapping(size: int, touch: bool = True) -> tuple[mmap.mmap, np.ndarray]:
    """A private anonymous mapping of `size` bytes, every page touched (as loaded weights are) unless not
    `touch`, fenced by a PROT_NONE page at each end so that the kernel never merges it with a neighbour (where
    malloc would put 96 MiB depends on what the test session allocated before: a heap mostly freed is never
    collapsed, and may be resident already)."""
    page = mmap.PAGESIZE
    region = mmap.mmap(-1, size + 2 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = np.frombuffer(region, np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for at in (whole.ctypes.data, whole.ctypes.data + page + size):
        assert libc.mprotect(at, page, 0) == 0, ctypes.get_errno()
    body = whole[page:page + size]
    if touch:
        body[:] = 1
    return region, body


@pytest.mark.skipif(transparent_huge_pages() == "never" or kernel_version() < (6, 1),
                    reason="no transparent huge pages here, or no MADV_COLLAPSE (Linux 6.1+)")
def test_a_large_resident_mapping_is_collapsed_into_huge_pages():
    _region, weights = resident_mapping(96 << 20)  # NOTE: in 4 KiB pages unless the kernel's mode is always; _region keeps it mapped
    middle = weights.ctypes.data + weights.size // 2
    before = anon_huge_bytes(middle)
    assert advise_huge_pages() >= 64 << 20
    assert anon_huge_bytes(middle) >= 64 << 20, "MADV_COLLAPSE gave no huge pages"
    if transparent_huge_pages() == "madvise":
        assert before < 32 << 20  # NOTE: so the huge pages are the collapse's
    assert weights.all()


def test_memory_not_yet_touched_is_left_alone():
    untouched = np.zeros(256 << 20, np.uint8)  # NOTE: calloc'd, as the pools are
    before = Path("/proc/self/smaps_rollup").read_text()
    advise_huge_pages()
    rss = lambda text: int(next(l for l in text.splitlines() if l.startswith("Rss")).split()[1])  # noqa: E731
    assert rss(Path("/proc/self/smaps_rollup").read_text()) - rss(before) < 64 << 10, "untouched memory was filled"
    assert untouched.size


def test_no_huge_pages_with_the_setting_off(monkeypatch):
    monkeypatch.setenv("LEPTON_HUGE_PAGES", "0")
    keep = np.ones(64 << 20, np.uint8)
    assert advise_huge_pages() == 0 and keep.all()


def resident_bytes(array: np.ndarray) -> int:
    """Rss of the mappings over the array (advice on part of a mapping splits it in several)."""
    start, end = array.ctypes.data, array.ctypes.data + array.nbytes
    return sum(m.sizes["Rss"] for m in mappings() if m.low < end and m.high > start)


@pytest.mark.parametrize("populate_write", [True, False], ids=["madvise", "one write a page"])
def test_populate_faults_the_pools_in_at_once_and_keeps_them_zero(monkeypatch, populate_write):
    if not populate_write:  # NOTE: a kernel without MADV_POPULATE_WRITE (before 5.14)
        real = memory._madvise
        monkeypatch.setattr(memory, "_madvise", lambda start, length, advice: advice != memory.MADV_POPULATE_WRITE
                            and real(start, length, advice))
    _region, raw = resident_mapping(36 << 20, touch=False)  # NOTE: zeros, as calloc'd pools; _region keeps it mapped
    pools = raw.view(np.float32).reshape(-1, 16, 3, 64)
    assert resident_bytes(pools) < pools.nbytes // 2
    populate(pools)
    assert resident_bytes(pools) >= pools.nbytes
    assert not pools.any()


def test_populate_takes_empty_and_small_arrays():
    for shape in ((0, 4), (3,), (1000, 3)):
        array = aligned_zeros(shape, np.float32)
        populate(array)
        assert array.shape == shape and not array.any()
