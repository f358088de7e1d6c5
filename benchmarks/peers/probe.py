"""What the processor does: instruction sets, read bandwidth and GEMM rates, measured with torch."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.machine import read_bandwidth_gbps

FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> list[str]:
    """The instruction-set flags of FLAGS that /proc/cpuinfo reports."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return [f for f in FLAGS if f in have]
    return []


def gemm_rates(n: int = 2048, repeats: int = 3, budget_s: float = 20.0) -> dict[str, float | None]:
    """Median GFLOP/s (GOP/s for int8) of an n×n×n product with all threads: fp32, bf16, int8.

    A dtype whose first product takes longer than budget_s is reported as None (slow, not probed).
    """
    import torch

    rates: dict[str, float | None] = {}
    for name in ("fp32", "bf16", "int8"):
        if name == "int8":
            a = torch.randint(-64, 64, (n, n), dtype=torch.int8)
            b = torch.randint(-64, 64, (n, n), dtype=torch.int8)
            product = lambda: torch._int_mm(a, b)  # noqa: E731
        else:
            dtype = torch.float32 if name == "fp32" else torch.bfloat16
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            product = lambda: a @ b  # noqa: E731
        try:
            times = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                product()
                times.append(time.perf_counter() - start)
                if times[0] > budget_s:
                    break
        except RuntimeError:
            rates[name] = None
            continue
        measured = sorted(times[1:]) or times
        rates[name] = None if times[0] > budget_s else round(2 * n**3 / measured[len(measured) // 2] / 1e9, 1)
    return rates


def probe() -> dict:
    """Flags, bandwidth (benchmarks.machine) and GEMM rates, in one dict for the report."""
    return {"cpu_flags": cpu_flags(), "read_bandwidth_gbps": read_bandwidth_gbps(), "gemm_gflops": gemm_rates()}
