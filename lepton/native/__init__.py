"""Lepton's own ONNX Runtime operators, a C library (lepton/native/slot_attention.c) that
scripts/build_native.sh compiles into this folder (`make setup` runs it).

`SlotAttention` (domain ai.lepton): the slot graph's attention (lepton/runners/slot_graph.py), the same
computation as ONNX Runtime's GroupQueryAttention there, reading each (sequence, kv head)'s keys and
values once for all the query heads that share them. The library is absent where no C compiler was
there to build it; the slot runner then keeps GroupQueryAttention (RunnerConfig.attention_kernel).
"""

from __future__ import annotations

from pathlib import Path

DOMAIN = "ai.lepton"
SOURCE = Path(__file__).with_name("slot_attention.c")
LIBRARY = Path(__file__).with_name("liblepton_ops.so")


def ops_library() -> Path | None:
    """The built library, or None when it was never built or is older than its source."""
    if not LIBRARY.is_file() or LIBRARY.stat().st_mtime < SOURCE.stat().st_mtime:
        return None
    return LIBRARY
