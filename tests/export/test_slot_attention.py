"""lepton.native's SlotAttention against ONNX Runtime's GroupQueryAttention, one node each, same inputs.

The slot graph may run either (RunnerConfig.attention_kernel); they must agree on every row that is
read afterwards: the attention of each sequence's real tokens and the caches up to each sequence's
length. Head sizes 64 and 128 take the vector-register paths of the C file, others its generic loop.
SlotAttentionF16 (float16 caches) computes what SlotAttention computes on the caches' rounded values, and
SlotAttentionI8 (8-bit rows: codes and a float32 scale) what float64 computes on its rows' values. Given the
paged pools, each writes this step's rows into them as its cache holds them, widened to float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from lepton.config import ConfigError, EngineConfig
from lepton.native import DOMAIN, LIBRARY, ops_library
from lepton.runners.slot_cache import SCALE_BYTES, dequantize_rows, quantize_rows
from lepton.runners.slot_runner import attention_kernel, describe_kernel
from tests.export.conftest import TARGETS, cpu_flags

POSITIONS = 1024
POOL_INPUTS = ("pool_rows", "key_pools", "value_pools")
# NOTE: float32 sums in another order and an exp of ~2e-7 relative error; outputs are O(1).
ATOL = 5e-6


def session(kernel: str, heads: int, kv_heads: int, dim: int, library: Path = LIBRARY, isa: int | None = None,
            flat: bool = False, pools: tuple[str, ...] = ()) -> ort.InferenceSession:
    """kernel: "lepton" (SlotAttention), "lepton-f16" (SlotAttentionF16; isa 1 = its plain C path),
    "lepton-i8" (SlotAttentionI8, the same) or "onnxruntime" (GroupQueryAttention); flat: qkv and the output
    declared [B x S, width] (Lepton's kernels only), as the slot graph gives them; pools: the optional pool
    inputs the node is given (of pool_rows, key_pools, value_pools; pool_layer 1)."""
    caches = ["past_key", "past_value"]
    lengths = ["seqlens_k", "total_sequence_length", "cos", "sin"]
    attrs = dict(num_heads=heads, kv_num_heads=kv_heads, scale=float(dim ** -0.5))
    if isa is not None:
        attrs["isa"] = isa
    if kernel.startswith("lepton"):
        op = {"lepton-f16": "SlotAttentionF16", "lepton-i8": "SlotAttentionI8"}.get(kernel, "SlotAttention")
        names = [name if name in pools else "" for name in POOL_INPUTS] if pools else []
        while names and not names[-1]:
            names.pop()
        node = helper.make_node(op, ["qkv", *caches, *lengths, *names], ["out", "key", "value"], domain=DOMAIN, **attrs,
                                **({"pool_layer": 1} if pools else {}))
    else:
        node = helper.make_node("GroupQueryAttention", ["qkv", "", "", *caches, *lengths], ["out", "key", "value"],
                                domain="com.microsoft", do_rotary=1, rotary_interleaved=0, **attrs)
    f, cache = TensorProto.FLOAT, ["B", kv_heads, "M", dim + SCALE_BYTES if kernel == "lepton-i8" else dim]
    c = {"lepton-f16": TensorProto.FLOAT16, "lepton-i8": TensorProto.UINT8}.get(kernel, f)
    graph = helper.make_graph([node], "attention", [
        helper.make_tensor_value_info("qkv", f, ["T", "W"] if flat else ["B", "S", "W"]),  # NOTE: any width: the kernel checks it
        helper.make_tensor_value_info("past_key", c, cache), helper.make_tensor_value_info("past_value", c, cache),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos", f, [POSITIONS, dim // 2]),
        helper.make_tensor_value_info("sin", f, [POSITIONS, dim // 2]),
        *[helper.make_tensor_value_info(name, TensorProto.INT64 if name == "pool_rows" else f,
                                        ["T"] if name == "pool_rows" else ["layers", "P", "KVH", "D"])
          for name in POOL_INPUTS if name in pools],
    ], [helper.make_tensor_value_info("out", f, ["T", heads * dim] if flat else ["B", "S", heads * dim]),
        helper.make_tensor_value_info("key", c, cache), helper.make_tensor_value_info("value", c, cache)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(DOMAIN, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if kernel.startswith("lepton"):
        options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def rope(dim: int) -> tuple[np.ndarray, np.ndarray]:
    angles = np.arange(POSITIONS)[:, None] / (10000.0 ** (np.arange(0, dim, 2) / dim))[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def attend(sess: ort.InferenceSession, qkv, key, value, seqlens, in_place: bool = True, pools: dict | None = None):
    """(out, key cache, value cache) after one run; in place: the past caches bound as the present ones;
    pools: arrays bound to the pool inputs of these names (the pools written in place)."""
    key, value = key.copy(), value.copy()
    binding = sess.io_binding()
    for name, array in (pools or {}).items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
    cos, sin = rope(key.shape[-1] - (SCALE_BYTES if key.dtype == np.uint8 else 0))
    for name, array in (("qkv", qkv), ("seqlens_k", seqlens), ("cos", cos), ("sin", sin),
                        ("total_sequence_length", np.array(seqlens.max() + 1, np.int32))):
        binding.bind_cpu_input(name, array)
    key_value, value_value = ort.OrtValue.ortvalue_from_numpy(key), ort.OrtValue.ortvalue_from_numpy(value)
    binding.bind_ortvalue_input("past_key", key_value)
    binding.bind_ortvalue_input("past_value", value_value)
    binding.bind_output("out")
    if in_place:
        binding.bind_ortvalue_output("key", key_value)
        binding.bind_ortvalue_output("value", value_value)
    else:
        binding.bind_output("key")
        binding.bind_output("value")
    sess.run_with_iobinding(binding)
    outputs = binding.copy_outputs_to_cpu()
    return (outputs[0], key, value) if in_place else tuple(outputs)


CASES = {  # name: (heads, kv heads, dim, sequences, new tokens per row, seqlens_k)
    "16 decodes, head 64, 3 heads a kv head": (9, 3, 64, 16, 1, list(range(3, 250, 16))),
    "decodes over several 64-key chunks, head 128": (8, 2, 128, 3, 1, [200, 64, 129]),
    "one decode, generic head size": (4, 4, 32, 1, 1, [70]),
    "first prompts, right padded": (9, 3, 64, 3, 40, [39, 12, 0]),
    "first prompts, head 128, 4 heads a kv head": (8, 2, 128, 2, 21, [20, 7]),
    "a chunk after cached tokens": (9, 3, 64, 1, 37, [150]),
    "a chunk after cached tokens, generic head size": (6, 2, 48, 1, 19, [90]),
    # NOTE: a position's heads of one kv head are computed together up to 8 a group (each alone above)
    "4 decodes, head 64, 7 heads a kv head": (14, 2, 64, 4, 1, [5, 70, 130, 200]),
    "2 decodes, head 128, 16 heads a kv head": (16, 1, 128, 2, 1, [100, 33]),
    "first prompts, head 64, 8 heads a kv head": (16, 2, 64, 2, 5, [4, 2]),
    "a two-token chunk after cached tokens": (9, 3, 64, 1, 2, [100]),
    "a long first prompt: query blocks, key chunks and partial tiles": (9, 3, 64, 2, 150, [149, 70]),
    "a long chunk after cached tokens, head 128": (8, 2, 128, 1, 75, [180]),
}


@pytest.fixture(scope="module")
def sessions():
    made = {}

    def get(kernel: str, heads: int, kv_heads: int, dim: int, library: Path = LIBRARY, isa: int | None = None,
            flat: bool = False, pools: tuple[str, ...] = ()) -> ort.InferenceSession:
        key = (kernel, heads, kv_heads, dim, library, isa, flat, pools)
        if key not in made:
            made[key] = session(*key)
        return made[key]
    return get


def test_the_library_is_built_by_setup():
    assert ops_library() == LIBRARY, "scripts/build_native.sh (make setup) should have built lepton/native"


@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "two buffers"])
@pytest.mark.parametrize("case", list(CASES))
def test_slot_attention_computes_what_group_query_attention_computes(sessions, case, in_place):
    check_case(sessions, case, in_place, LIBRARY)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("case", ["16 decodes, head 64, 3 heads a kv head", "first prompts, head 128, 4 heads a kv head",
                                  "4 decodes, head 64, 7 heads a kv head", "a two-token chunk after cached tokens",
                                  "a chunk after cached tokens, generic head size"])
def test_every_target_computes_the_same(sessions, one_target_libraries, target, case):
    if target not in one_target_libraries:
        pytest.skip(f"this processor does not run {target} code ({cpu_flags() & TARGETS[target]} of {TARGETS[target]})")
    check_case(sessions, case, True, one_target_libraries[target])


def check_case(sessions, case: str, in_place: bool, library: Path) -> None:
    heads, kv_heads, dim, batch, length, seqlens = CASES[case]
    rng = np.random.default_rng(7)
    seqlens = np.array(seqlens, np.int32)
    capacity = 256
    qkv = rng.standard_normal((batch, length, (heads + 2 * kv_heads) * dim), np.float32)
    key, value = (rng.standard_normal((batch, kv_heads, capacity, dim), np.float32) for _ in range(2))
    want = attend(sessions("onnxruntime", heads, kv_heads, dim), qkv, key, value, seqlens, in_place)
    got = attend(sessions("lepton", heads, kv_heads, dim, library), qkv, key, value, seqlens, in_place)
    first_prompt = length == seqlens.max() + 1
    for b, cached_after in enumerate(seqlens + 1):
        new = cached_after if first_prompt else length
        np.testing.assert_allclose(got[0][b, :new], want[0][b, :new], atol=ATOL, rtol=0)
        np.testing.assert_allclose(got[1][b, :, :cached_after], want[1][b, :, :cached_after], atol=ATOL, rtol=0)
        np.testing.assert_allclose(got[2][b, :, :cached_after], want[2][b, :, :cached_after], atol=0, rtol=0)
        if first_prompt:  # NOTE: a padding row's attention is zero; GroupQueryAttention leaves something there
            assert not got[0][b, new:].any()
        if in_place:  # NOTE: rows past a sequence's length are never written: what was there stays
            np.testing.assert_array_equal(got[1][b, :, cached_after:], key[b, :, cached_after:])


def attention_over(qkv: np.ndarray, key: np.ndarray, value: np.ndarray, past: int, heads: int, kv_heads: int) -> np.ndarray:
    """Causal attention in float64 of the rows' queries (rotated at positions past ...) over caches
    [KVH, M, D]: [rows, heads x D]."""
    dim = key.shape[-1]
    cos, sin = rope(dim)
    out = np.zeros((qkv.shape[0], heads * dim))
    for s, row in enumerate(qkv.astype(np.float64)):
        pos = past + s
        for h in range(heads):
            q = row[h * dim:(h + 1) * dim]
            q = np.concatenate([q[:dim // 2] * cos[pos] - q[dim // 2:] * sin[pos], q[dim // 2:] * cos[pos] + q[:dim // 2] * sin[pos]])
            g = h // (heads // kv_heads)
            scores = key[g, :pos + 1].astype(np.float64) @ q * dim ** -0.5
            weights = np.exp(scores - scores.max())
            out[s, h * dim:(h + 1) * dim] = weights @ value[g, :pos + 1].astype(np.float64) / weights.sum()
    return out


@pytest.mark.parametrize("isa", [0, 1], ids=["F16C where the processor has it", "plain C"])
@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "two buffers"])
@pytest.mark.parametrize("case", list(CASES))
def test_float16_caches_give_what_float32_caches_of_the_rounded_values_give(sessions, case, in_place, isa):
    # NOTE: this step's keys and values are the float32 ones rounded to nearest even, the cached ones kept
    check_narrow_caches(sessions, case, in_place, "lepton-f16", isa, np.random.default_rng(11),
                        lambda rows: rows.astype(np.float16), lambda rows: rows.astype(np.float32))


def check_narrow_caches(sessions, case: str, in_place: bool, kernel: str, isa: int, rng, narrow, widen) -> None:
    """The kernel over caches narrow(float32) against SlotAttention over their values widen(caches): this step's
    rows written as narrow writes them, bit for bit, the cached rows kept, and attention as float64 computes
    it over the caches' values."""
    heads, kv_heads, dim, batch, length, seqlens = CASES[case]
    seqlens = np.array(seqlens, np.int32)
    qkv = rng.standard_normal((batch, length, (heads + 2 * kv_heads) * dim), np.float32)
    key, value = (narrow(rng.standard_normal((batch, kv_heads, 256, dim), np.float32)) for _ in range(2))
    want = attend(sessions("lepton", heads, kv_heads, dim), qkv, widen(key), widen(value), seqlens, in_place)
    got = attend(sessions(kernel, heads, kv_heads, dim, isa=isa), qkv, key, value, seqlens, in_place)
    assert got[1].dtype == got[2].dtype == key.dtype and got[1].shape[-1] == key.shape[-1]
    first_prompt = length == seqlens.max() + 1
    for b, cached_after in enumerate(seqlens + 1):
        new = cached_after if first_prompt else length
        for cache in (1, 2):
            np.testing.assert_array_equal(got[cache][b, :, :cached_after], narrow(want[cache][b, :, :cached_after]))
        keys, values = (widen(got[cache][b, :, :cached_after]) for cache in (1, 2))  # NOTE: rows past: unwritten
        reference = attention_over(qkv[b, :new], keys, values, cached_after - new, heads, kv_heads)
        np.testing.assert_allclose(got[0][b, :new], reference, atol=ATOL, rtol=0)
        if first_prompt:
            assert not got[0][b, new:].any()
        if in_place:
            np.testing.assert_array_equal(got[1][b, :, cached_after:], key[b, :, cached_after:])


def test_bad_inputs_are_refused_with_the_input_and_the_limit(sessions):
    sess = sessions("lepton", 9, 3, 64)
    rng = np.random.default_rng(0)
    key = rng.standard_normal((2, 3, 32, 64), np.float32)
    with pytest.raises(Exception, match="SlotAttention: qkv has 900 values per token, expected 960"):
        attend(sess, rng.standard_normal((2, 1, 900), np.float32), key, key, np.array([5, 6], np.int32))
    with pytest.raises(Exception, match="SlotAttention: 40 tokens do not fit a cache of 32"):
        attend(sess, rng.standard_normal((2, 1, 960), np.float32), key, key, np.array([5, 39], np.int32))
    with pytest.raises(Exception, match="SlotAttention: seqlens_k has 3 values for 2 sequences"):
        attend(sess, rng.standard_normal((2, 1, 960), np.float32), key, key, np.array([5, 6, 7], np.int32))


def case_inputs(kernel: str, case: str, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """seqlens_k, qkv and caches of 256 positions for CASES[case], the caches in the kernel's type."""
    heads, kv_heads, dim, batch, length, seqlens = CASES[case]
    qkv = rng.standard_normal((batch, length, (heads + 2 * kv_heads) * dim), np.float32)
    key, value = (rng.standard_normal((batch, kv_heads, 256, dim), np.float32) for _ in range(2))
    if kernel == "lepton-f16":
        key, value = key.astype(np.float16), value.astype(np.float16)
    elif kernel == "lepton-i8":
        key, value = quantize_rows(key), quantize_rows(value)
    return np.array(seqlens, np.int32), qkv, key, value


@pytest.mark.parametrize("kernel", ["lepton", "lepton-f16", "lepton-i8"])
@pytest.mark.parametrize("case", ["16 decodes, head 64, 3 heads a kv head", "first prompts, right padded",
                                  "a chunk after cached tokens"])
def test_flat_tokens_give_what_b_by_s_tokens_give(sessions, kernel, case):
    """The slot graph hands SlotAttention the qkv product's rows as they are, [B x S, width] (B from the caches),
    and takes [B x S, N D] back: the same bits, caches included, as [B, S, width] in and [B, S, N D] out."""
    heads, kv_heads, dim, batch, length, seqlens = CASES[case]
    rng = np.random.default_rng(11)
    seqlens, qkv, key, value = case_inputs(kernel, case, rng)
    want = attend(sessions(kernel, heads, kv_heads, dim), qkv, key, value, seqlens)
    got = attend(sessions(kernel, heads, kv_heads, dim, flat=True), qkv.reshape(batch * length, -1), key, value, seqlens)
    assert got[0].shape == (batch * length, heads * dim)
    np.testing.assert_array_equal(got[0], want[0].reshape(batch * length, -1))
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])


def test_flat_tokens_must_be_s_rows_for_each_sequence(sessions):
    heads, kv_heads, dim = 9, 3, 64
    qkv = np.zeros((7, (heads + 2 * kv_heads) * dim), np.float32)
    key = np.zeros((2, kv_heads, 32, dim), np.float32)
    with pytest.raises(Exception, match="SlotAttention: qkv has 7 rows, not S rows for each of past_key's 2 sequences"):
        attend(sessions("lepton", heads, kv_heads, dim, flat=True), qkv, key, key, np.array([3, 3], np.int32))


def test_the_kernel_setting(tmp_path):
    assert attention_kernel("auto", LIBRARY) == "lepton"
    assert attention_kernel("auto", None) == "onnxruntime"
    assert attention_kernel("onnxruntime", LIBRARY) == "onnxruntime"
    assert describe_kernel("lepton", "auto") == f"Lepton's SlotAttention ({LIBRARY})"
    assert describe_kernel("onnxruntime", "onnxruntime") == "ONNX Runtime's GroupQueryAttention (attention_kernel=onnxruntime)"
    assert "scripts/build_native.sh builds it" in describe_kernel("onnxruntime", "auto")
    with pytest.raises(RuntimeError, match="attention_kernel=lepton: lepton/native/liblepton_ops.so is not built"):
        attention_kernel("lepton", None)
    with pytest.raises(ConfigError, match="attention_kernel: must be one of auto, lepton, onnxruntime, got 'fast'"):
        EngineConfig.from_parameters({"model_dir": str(tmp_path), "attention_kernel": "fast"})


def test_quantized_rows_round_trip():
    rows = np.random.default_rng(3).standard_normal((5, 64)).astype(np.float32)
    rows[1] = 0.0  # NOTE: a zero row: scale 0, codes 0
    packed = quantize_rows(rows)
    assert packed.dtype == np.uint8 and packed.shape == (5, 64 + SCALE_BYTES)
    back = dequantize_rows(packed)
    assert not back[1].any()
    top = np.abs(rows).max(axis=-1, keepdims=True)
    assert (np.abs(back - rows) <= top / 127 / 2 * (1 + 1e-6)).all()  # NOTE: half a step at most
    np.testing.assert_array_equal(quantize_rows(back), packed)  # NOTE: the pools' values give the slots' rows back


@pytest.mark.parametrize("isa", [0, 1], ids=["AVX2 where the processor has it", "plain C"])
@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "two buffers"])
@pytest.mark.parametrize("case", list(CASES))
def test_8_bit_rows_give_what_float64_gives_on_their_values(sessions, case, in_place, isa):
    # NOTE: this step's keys (rotated) and values quantized as quantize_rows does
    check_narrow_caches(sessions, case, in_place, "lepton-i8", isa, np.random.default_rng(13), quantize_rows,
                        dequantize_rows)


WIDEN = {"lepton": lambda rows: rows, "lepton-f16": lambda rows: rows.astype(np.float32), "lepton-i8": dequantize_rows}


@pytest.mark.parametrize("isa", [0, 1], ids=["vector paths where the processor has them", "plain C"])
@pytest.mark.parametrize("kernel", ["lepton", "lepton-f16", "lepton-i8"])
@pytest.mark.parametrize("case", ["16 decodes, head 64, 3 heads a kv head", "first prompts, right padded",
                                  "a long chunk after cached tokens, head 128", "one decode, generic head size"])
def test_the_steps_rows_go_into_the_pools_as_the_caches_hold_them(sessions, kernel, case, isa):
    """pool_rows sends each new token's key and value rows to a row of layer pool_layer's pools, widened to float32
    from what the cache holds (bit for bit what lepton/native/kv_copy.c wrote after the run); -1 and a first
    prompt's padding go nowhere, every other row and layer stays as it was, and the rest of the output is what
    the node gives without pools."""
    heads, kv_heads, dim, batch, length, seqlens = CASES[case]
    rng = np.random.default_rng(17)
    seqlens, qkv, key, value = case_inputs(kernel, case, rng)
    tokens = batch * length
    pool_rows = rng.permutation(tokens + 5)[:tokens].astype(np.int64)  # NOTE: distinct rows, in no order
    pool_rows[1::3] = -1
    key_pools, value_pools = (np.full((3, tokens + 5, kv_heads, dim), sentinel, np.float32) for sentinel in (7.0, -7.0))
    bound = {"pool_rows": pool_rows, "key_pools": key_pools, "value_pools": value_pools}
    got = attend(sessions(kernel, heads, kv_heads, dim, isa=isa, pools=POOL_INPUTS), qkv, key, value, seqlens, pools=bound)
    want = attend(sessions(kernel, heads, kv_heads, dim, isa=isa), qkv, key, value, seqlens)
    for ours, theirs in zip(got, want):
        np.testing.assert_array_equal(ours, theirs)
    first_prompt = length == seqlens.max() + 1
    written = np.zeros(tokens + 5, bool)
    for b, cached_after in enumerate(seqlens + 1):
        new = cached_after if first_prompt else length
        for s in range(new):
            target = pool_rows[b * length + s]
            if target < 0:
                continue
            written[target] = True
            position = cached_after - new + s
            np.testing.assert_array_equal(key_pools[1, target], WIDEN[kernel](got[1][b, :, position]))
            np.testing.assert_array_equal(value_pools[1, target], WIDEN[kernel](got[2][b, :, position]))
    real = [pool_rows[b * length + s] for b, c in enumerate(seqlens + 1) for s in range(c if first_prompt else length)]
    assert written.sum() == sum(t >= 0 for t in real) > 0
    assert (key_pools[1, ~written] == 7.0).all() and (value_pools[1, ~written] == -7.0).all()
    assert (key_pools[[0, 2]] == 7.0).all() and (value_pools[[0, 2]] == -7.0).all()


def test_bad_pools_are_refused_and_nothing_is_written(sessions):
    heads, kv_heads, dim = 9, 3, 64
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, 1, (heads + 2 * kv_heads) * dim), np.float32)
    key = rng.standard_normal((2, kv_heads, 32, dim), np.float32)
    seqlens = np.array([5, 6], np.int32)
    pools = np.zeros((2, 20, kv_heads, dim), np.float32)
    sess = sessions("lepton", heads, kv_heads, dim, pools=POOL_INPUTS)
    with pytest.raises(Exception, match=r"SlotAttention: pool_rows has 20, outside \[-1, 20\) \(the pools' rows\)"):
        attend(sess, qkv, key, key, seqlens, pools={"pool_rows": np.array([3, 20]), "key_pools": pools, "value_pools": pools})
    assert not pools.any()
    with pytest.raises(Exception, match="SlotAttention: pool_rows has 3 values for 2 tokens"):
        attend(sess, qkv, key, key, seqlens, pools={"pool_rows": np.array([3, 4, 5]), "key_pools": pools, "value_pools": pools})
    with pytest.raises(Exception, match="SlotAttention: pool_layer 1, the pools have 1 layers"):
        attend(sess, qkv, key, key, seqlens, pools={"pool_rows": np.array([3, 4]), "key_pools": pools[:1], "value_pools": pools[:1]})
    with pytest.raises(Exception, match="SlotAttention: key_pools rows of 3 x 32 values, expected kv_num_heads x head_dim"):
        narrow = np.zeros((2, 20, kv_heads, 32), np.float32)
        attend(sess, qkv, key, key, seqlens, pools={"pool_rows": np.array([3, 4]), "key_pools": narrow, "value_pools": narrow})
    two = sessions("lepton", heads, kv_heads, dim, pools=("pool_rows", "key_pools"))
    with pytest.raises(Exception, match=r"SlotAttention: pool_rows, key_pools and value_pools go together \(2 of 3 given\)"):
        attend(two, qkv, key, key, seqlens, pools={"pool_rows": np.array([3, 4]), "key_pools": pools})
    assert not pools.any()
