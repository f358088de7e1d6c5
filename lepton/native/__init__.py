"""Lepton's own ONNX Runtime operators, a C library (lepton/native/*.c) that scripts/build_native.sh
compiles into this folder (`make setup` runs it).

Domain ai.lepton:
- `SlotAttention` (slot_attention.c): the slot graph's attention (lepton/runners/slot_graph.py), the same
  computation as ONNX Runtime's GroupQueryAttention there, reading each (sequence, kv head)'s keys and
  values once for all the query heads that share them; `SlotAttentionF16` the same over float16 slots and
  `SlotAttentionI8` over 8-bit rows, int8 codes and a scale a row (RunnerConfig.kv_cache_dtype);
- `MatMulQ8` (q8_matmul.c): the 8-bit weight products of q8_0 exports, what MatMulNBits computes for
  them, with the weights packed for AVX-512 VNNI (lepton/runners/q8_graph.py);
- `MatMulQ4` (q4_matmul.c): the 4-bit weight products of q4_1 exports (w = d q + m per block of 32), the
  activations rounded to bfloat16, packed for AVX-512 BF16, or (a product at accuracy level 4, int8 = 1)
  quantized to int8 per block of 32, packed for AVX-512 VNNI (lepton/runners/q4_graph.py), or (level 0 on a
  processor with AVX2 but no AVX-512 BF16, int16 = 1) quantized to int16 per block of 32, and the 4-bit
  draft of an lm_head that greedy steps read (lepton/runners/draft_head.py);
- `MatMulBF16` (bf16_matmul.c): a float32 export's weight products in bfloat16 (weight_dtype=bfloat16),
  packed for AVX-512 BF16 (lepton/runners/bf16_graph.py);
- `MatMulF32` (f32_matmul.c): a float32 export's weight products in float32 (matmul_kernel), packed for
  AVX-512F's FMAs, a decode step's rows in one pass over the weights (lepton/runners/f32_graph.py);
- `TopKRescore` (rescore.c): a rescored lm_head's top candidates per row recomputed in float32 from the
  table's rows, over the approximate logits (lepton/runners/rescore_graph.py, and the draft's then branch).
And one plain function, called through ctypes: `lepton_slots_to_pools` (kv_copy.c), the slot runner's
copy of a step's K/V into the block pools after ONNX Runtime's GroupQueryAttention wrote them into the slots
(lepton/runners/slot_cache.py), float16 slots widened, 8-bit rows as code x scale (SlotAttention, given the
pools, writes them there itself).
The library is absent where no C compiler was there to build it; the runners then keep ONNX Runtime's
own operators (RunnerConfig.attention_kernel, RunnerConfig.matmul_kernel) and numpy's copy, the slots stay
float32 (kv_cache_dtype=auto), and weight_dtype=bfloat16 and kv_cache_dtype=float16 or int8 are refused.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

DOMAIN = "ai.lepton"
SOURCE_DIR = Path(__file__).parent
LIBRARY = SOURCE_DIR / "liblepton_ops.so"


def sources() -> list[Path]:
    """The C files and headers the library is built from."""
    return sorted([*SOURCE_DIR.glob("*.c"), *SOURCE_DIR.glob("*.h")])


def ops_library() -> Path | None:
    """The built library, or None when it was never built or is older than one of its sources."""
    if not LIBRARY.is_file() or LIBRARY.stat().st_mtime < max(p.stat().st_mtime for p in sources()):
        return None
    return LIBRARY


@functools.cache
def slots_to_pools():
    """The library's `lepton_slots_to_pools` (a ctypes function; kv_copy.c says what it copies), or None
    when the library is not built or older than its sources."""
    library = ops_library()
    if library is None:
        return None
    function = ctypes.CDLL(str(library)).lepton_slots_to_pools
    function.restype = ctypes.c_int64
    function.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 9
    return function
