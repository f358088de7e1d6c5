"""lepton.native's MatMulQ4 and the runners' rewrite of a q4_1 export's products to it.

Every instruction-set path must give what float64 gives on the bfloat16-rounded activations and the Q4_1
weights (d q + m, d and m in float16), to float32 summation; the packing must put each code where the kernel
reads it; bad inputs are refused naming the input and the limit; the rewrite must take exactly the q4_1
products (MatMulNBits plus its offsets) and leave a float32 head to MatMulBF16; a q4_1 export served with it
must give the export's logits to bfloat16's precision.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.nbits import RewritePlan, quantize_q4_1, rewrite_matmuls
from export.quantization import resolve_preset, write_quantized
from lepton.config import CacheConfig, EngineConfig, RunnerConfig
from lepton.native import DOMAIN, LIBRARY
from lepton.runners import make_runner, open_folder
from lepton.runners.bf16_graph import from_bf16, to_bf16
from lepton.runners.q4_graph import pack, q4_graph, unpack_codes
from lepton.runners.q8_graph import bfloat16_kernels, int16_activations, matmul_kernel
from tests.export.conftest import cpu_flags
from tests.export.test_bf16_matmul import CASES as BF16_CASES, session
from tests.export.test_slot_runner import BLOCK_SIZE, run_schedule

HAS_BF16 = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= cpu_flags()
HAS_VNNI = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c"} <= cpu_flags()
HAS_AVX2 = {"avx2", "fma", "f16c"} <= cpu_flags()
ISAS = [1, pytest.param(2, marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 + FMA + F16C on this processor")),
        pytest.param(3, marks=pytest.mark.skipif(not HAS_BF16, reason="no AVX-512 BF16 on this processor"))]
INT16_ISAS = [1, pytest.param(2, marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 + FMA + F16C on this processor"))]
INT8_ISAS = [1, pytest.param(2, marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 + FMA + F16C on this processor")),
             pytest.param(3, marks=pytest.mark.skipif(not HAS_VNNI, reason="no AVX-512 VNNI on this processor"))]


def product_model(k: int, n: int, arrays: tuple[np.ndarray, ...], rank: int = 2, **attrs) -> onnx.ModelProto:
    names = ["b", "scales", "mins"]
    node = helper.make_node("MatMulQ4", ["a", *names], ["y"], domain=DOMAIN, K=k, N=n, **attrs)
    rows = [f"r{i}" for i in range(rank - 1)]
    graph = helper.make_graph([node], "product", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [*rows, "width"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*rows, n])],
                              [numpy_helper.from_array(a, name) for a, name in zip(arrays, names)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def q4_weights(rng: np.random.Generator, n: int, k: int):
    """Codes [N, K / 32, 32], scales and minimums [N, K / 32] (float16 values, as a GGUF holds them)."""
    codes = rng.integers(0, 16, (n, k // 32, 32), dtype=np.uint8)
    scales = rng.uniform(1e-3, 4e-2, (n, k // 32)).astype(np.float16).astype(np.float32)
    mins = rng.uniform(-0.4, 0.0, (n, k // 32)).astype(np.float16).astype(np.float32)
    return codes, scales, mins


def dequantized(codes, scales, mins) -> np.ndarray:
    n = codes.shape[0]
    return (codes * scales[..., None].astype(np.float64) + mins[..., None]).reshape(n, -1)


# NOTE: MatMulBF16's shapes whose K is a multiple of 32, and one block
CASES = {"one block, one output": (32, 1, (1,)), **{name: case for name, case in BF16_CASES.items() if case[0] % 32 == 0}}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("isa", ISAS)
def test_every_path_gives_the_product_of_rounded_activations_and_q4_1_weights(case, isa):
    k, n, rows = CASES[case]
    rng = np.random.default_rng(len(case))
    codes, scales, mins = q4_weights(rng, n, k)
    a = rng.standard_normal((*rows, k)).astype(np.float32)
    want = from_bf16(to_bf16(a)).astype(np.float64) @ dequantized(codes, scales, mins).T
    got = session(product_model(k, n, pack(codes, scales, mins), rank=len(rows) + 1, isa=isa)).run(None, {"a": a})[0]
    assert got.shape == (*rows, n)
    # NOTE: float32 sums of exact products; the codes' bias of 128 cancels to float32 rounding of ~128 sum(a)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(want).max())
    if isa != 1:
        plain = session(product_model(k, n, pack(codes, scales, mins), rank=len(rows) + 1, isa=1)).run(None, {"a": a})[0]
        if isa == 2:  # NOTE: AVX2 widens to float32 and fma's in plain C's order: the same bits
            np.testing.assert_array_equal(got, plain)
        np.testing.assert_allclose(got, plain, rtol=0, atol=1e-6 * np.abs(plain).max())


def block_quantized_product(a: np.ndarray, codes, scales, mins, top_code: int, centre: int) -> np.ndarray:
    """In float64, per block of 32: codes c = rint(a / s) (s = max|a| / top_code in float32, rounded as the kernel
    rounds a x (1 / s)), then d s sum (q - centre) c + (m + centre d) sum(a)."""
    n, blocks, _ = codes.shape
    x = a.reshape(-1, blocks, 32)
    top = np.abs(x).max(-1, keepdims=True)
    scale = top / np.float32(top_code)
    inverse = np.where(top != 0, np.float32(1) / np.where(top != 0, scale, 1), 0).astype(np.float32)
    c = np.rint(x * inverse).astype(np.float64)
    assert np.abs(c).max() <= top_code
    centred = codes.astype(np.float64) - centre  # [N, blocks, 32]
    dots = np.einsum("rbi,nbi->rbn", c, centred) * scale.astype(np.float64)  # [rows, blocks, N]
    y = (dots * scales.T.astype(np.float64)).sum(1) + x.astype(np.float64).sum(-1) @ (mins + centre * scales).T.astype(np.float64)
    return y.reshape(*a.shape[:-1], n)


def int8_product(a: np.ndarray, codes, scales, mins) -> np.ndarray:
    """What int8 = 1 computes: codes of max|a| / 127, the weights' codes centred on 8."""
    return block_quantized_product(a, codes, scales, mins, 127, 8)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("isa", INT8_ISAS)
def test_int8_activations_give_the_product_of_block_quantized_activations_and_q4_1_weights(case, isa):
    k, n, rows = CASES[case]
    rng = np.random.default_rng(len(case) + 1)
    codes, scales, mins = q4_weights(rng, n, k)
    a = rng.standard_normal((*rows, k)).astype(np.float32)
    if a.size > 32:
        a.reshape(-1, k)[0, :32] = 0.0  # NOTE: a block of zeros: scale 0, codes 0
    a.reshape(-1, k)[-1, -32:] *= 300.0  # NOTE: an outlier block
    want = int8_product(a, codes, scales, mins)
    arrays = pack(codes, scales, mins, int8=True)
    got = session(product_model(k, n, arrays, rank=len(rows) + 1, int8=1, isa=isa)).run(None, {"a": a})[0]
    assert got.shape == (*rows, n)
    # NOTE: integer dots are exact; float32 scaling and sums per block
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(want).max())
    if isa != 1:  # NOTE: the same integers and float operations in the same order as plain C
        plain = session(product_model(k, n, arrays, rank=len(rows) + 1, int8=1, isa=1)).run(None, {"a": a})[0]
        np.testing.assert_array_equal(got, plain)
    # NOTE: and not what bfloat16 activations give
    bf16 = from_bf16(to_bf16(a)).astype(np.float64) @ dequantized(codes, scales, mins).T
    assert np.abs(got - bf16).max() > 1e-4 * np.abs(bf16).max()


@pytest.mark.parametrize("isa", INT8_ISAS)
def test_int8_dots_at_their_largest_do_not_saturate(isa):
    # NOTE: codes 15 and activation codes +-127 everywhere: a pair of products 3,810, a block's 16-bit sum of 8
    # groups' pairs 30,480 (AVX2 adds them so), the int32 dots +-60,960 less the offset
    k, n = 96, 32
    codes = np.full((n, k // 32, 32), 15, np.uint8)
    scales, mins = np.full((n, k // 32), 0.5, np.float32), np.zeros((n, k // 32), np.float32)
    a = np.ones((3, k), np.float32)
    a[1] = -1.0
    a[2, ::2] = -1.0  # NOTE: signs alternating: pairs that cancel
    got = session(product_model(k, n, pack(codes, scales, mins, int8=True), int8=1, isa=isa)).run(None, {"a": a})[0]
    np.testing.assert_array_equal(got, np.array([[7.5 * k] * n, [-7.5 * k] * n, [0.0] * n], np.float32))
    np.testing.assert_allclose(got, int8_product(a, codes, scales, mins), rtol=1e-7, atol=1e-6)  # NOTE: s = 1 / 127 in float32


def int16_product(a: np.ndarray, codes, scales, mins) -> np.ndarray:
    """What int16 = 1 computes: codes of max|a| / 32767, the weights' codes as they are."""
    return block_quantized_product(a, codes, scales, mins, 32767, 0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("isa", INT16_ISAS)
def test_int16_activations_give_the_product_of_block_quantized_activations_and_q4_1_weights(case, isa):
    k, n, rows = CASES[case]
    rng = np.random.default_rng(len(case) + 2)
    codes, scales, mins = q4_weights(rng, n, k)
    a = rng.standard_normal((*rows, k)).astype(np.float32)
    if a.size > 32:
        a.reshape(-1, k)[0, :32] = 0.0  # NOTE: a block of zeros: scale 0, codes 0
    a.reshape(-1, k)[-1, -32:] *= 300.0  # NOTE: an outlier block
    want = int16_product(a, codes, scales, mins)
    arrays = pack(codes, scales, mins)  # NOTE: packed as for bfloat16 activations
    got = session(product_model(k, n, arrays, rank=len(rows) + 1, int16=1, isa=isa)).run(None, {"a": a})[0]
    assert got.shape == (*rows, n)
    # NOTE: integer dots are exact (and their float32), float32 scaling and sums per block
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(want).max())
    if isa != 1:  # NOTE: the same integers and float operations in the same order as plain C
        plain = session(product_model(k, n, arrays, rank=len(rows) + 1, int16=1, isa=1)).run(None, {"a": a})[0]
        np.testing.assert_array_equal(got, plain)
    # NOTE: nearer the exact product than bfloat16 activations are
    exact = a.astype(np.float64) @ dequantized(codes, scales, mins).T
    bf16 = from_bf16(to_bf16(a)).astype(np.float64) @ dequantized(codes, scales, mins).T
    if k >= 32 * 2:
        assert np.abs(got - exact).max() < 0.1 * np.abs(bf16 - exact).max()


@pytest.mark.parametrize("isa", INT16_ISAS)
def test_int16_dots_at_their_largest_stay_exact(isa):
    # NOTE: codes 15 and activation codes +-32767 everywhere: a block's dot +-15,728,160, exact in int32 and float32
    k, n = 96, 32
    codes = np.full((n, k // 32, 32), 15, np.uint8)
    scales, mins = np.full((n, k // 32), 0.5, np.float32), np.zeros((n, k // 32), np.float32)
    a = np.ones((3, k), np.float32)
    a[1] = -1.0
    a[2, ::2] = -1.0  # NOTE: signs alternating: pairs that cancel
    got = session(product_model(k, n, pack(codes, scales, mins), int16=1, isa=isa)).run(None, {"a": a})[0]
    np.testing.assert_allclose(got, np.array([[7.5 * k] * n, [-7.5 * k] * n, [0.0] * n]), rtol=1e-6, atol=0)
    np.testing.assert_allclose(got, int16_product(a, codes, scales, mins), rtol=1e-7, atol=0)


def test_pack_puts_each_code_where_the_kernel_reads_it():
    n, k = 20, 64
    codes = (np.arange(n * k).reshape(n, k // 32, 32) * 7 % 16).astype(np.uint8)
    scales, mins = np.full((n, 2), 0.5, np.float32), np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    b, s, m = pack(codes, scales, mins)
    assert b.shape == (2, 2, 256) and b.dtype == np.uint8 and s.shape == m.shape == (2, 2, 16) and s.dtype == np.float16
    for out in range(n):
        for i in range(k):
            blk, j = divmod(i, 32)
            group, r = divmod(j, 4)
            byte = b[out // 16, blk, group * 32 + 2 * (out % 16) + r % 2]
            assert (byte >> 4 if r >= 2 else byte & 15) == codes[out, blk, j]
        assert m[out // 16, 1, out % 16] == mins[out, 1]
    assert not b[1, :, :].reshape(2, 8, 16, 2)[:, :, 4:].any() and not s[1, :, 4:].any()  # NOTE: outputs 20..31
    np.testing.assert_array_equal(unpack_codes(numpy_helper.to_array(numpy_helper.from_array(
        (codes[..., 0::2] | codes[..., 1::2] << 4).astype(np.uint8))), n, 2), codes)


def test_pack_for_int8_activations_puts_each_code_where_vpdpbusd_reads_it():
    n, k = 20, 64
    codes = (np.arange(n * k).reshape(n, k // 32, 32) * 7 % 16).astype(np.uint8)
    b, _, _ = pack(codes, np.ones((n, 2), np.float32), np.zeros((n, 2), np.float32), int8=True)
    assert b.shape == (2, 2, 256)
    for out in range(n):
        for i in range(k):
            blk, j = divmod(i, 32)
            vector, r = divmod(j, 8)  # NOTE: inputs 8v .. 8v + 3 in the low nibbles, 8v + 4 .. 8v + 7 in the high
            byte = b[out // 16, blk, vector * 64 + 4 * (out % 16) + r % 4]
            assert (byte >> 4 if r >= 4 else byte & 15) == codes[out, blk, j]
    assert not b[1].reshape(2, 4, 16, 4)[:, :, 4:].any()  # NOTE: outputs 20..31


def test_bad_inputs_are_refused_with_the_input_and_the_limit():
    codes, scales, mins = q4_weights(np.random.default_rng(0), 16, 64)
    arrays = pack(codes, scales, mins)
    with pytest.raises(Exception, match=r"MatMulQ4: K = 48 is not a positive multiple of the block size 32"):
        session(product_model(48, 16, arrays))
    with pytest.raises(Exception, match=r"MatMulQ4: A has 32 values per row, expected K = 64"):
        session(product_model(64, 16, arrays)).run(None, {"a": np.ones((2, 32), np.float32)})
    with pytest.raises(Exception, match=r"MatMulQ4: B has 2 packed blocks, expected ceil\(N / 16\) x K / 32 = 4 of 256"):
        session(product_model(64, 32, arrays)).run(None, {"a": np.ones((2, 64), np.float32)})
    with pytest.raises(Exception, match=r"MatMulQ4: mins has 4 blocks, expected ceil\(N / 16\) x K / 32 = 2 of 16"):
        wide = pack(*q4_weights(np.random.default_rng(1), 16, 128))
        session(product_model(64, 16, (arrays[0], arrays[1], wide[2]))).run(None, {"a": np.ones((1, 64), np.float32)})
    with pytest.raises(ValueError, match="codes: 16 does not fit 4 bits"):
        pack(codes + 1, scales, mins)
    with pytest.raises(Exception, match=r"MatMulQ4: int8 = 2, expected 0 \(bfloat16 activations\) or 1 \(int8 activations\)"):
        session(product_model(64, 16, arrays, int8=2))
    with pytest.raises(Exception, match=r"MatMulQ4: int16 = 2, expected 0 \(bfloat16 activations\) or 1 \(int16 activations\)"):
        session(product_model(64, 16, arrays, int16=2))
    with pytest.raises(Exception, match=r"MatMulQ4: int8 = 1 and int16 = 1: one kind of activations, not both"):
        session(product_model(64, 16, arrays, int8=1, int16=1))
    with pytest.raises(Exception, match=r"isa = 3 needs instructions this processor lacks \(int16 = 1: 1 plain C, 2 AVX2"):
        session(product_model(64, 16, arrays, int16=1, isa=3))
    if not HAS_BF16:
        with pytest.raises(Exception, match="isa = 3 needs instructions this processor lacks"):
            session(product_model(64, 16, arrays, isa=3))
    if not HAS_AVX2:
        with pytest.raises(Exception, match=r"isa = 2 needs instructions this processor lacks \(1 plain C, 2 AVX2, 3 AVX-512 BF16"):
            session(product_model(64, 16, arrays, isa=2))
    with pytest.raises(Exception, match=r"isa = 4 .*\(1 plain C, 2 AVX2, 3 AVX-512 BF16"):
        session(product_model(64, 16, arrays, isa=4))
    if not HAS_VNNI:
        with pytest.raises(Exception, match=r"isa = 3 needs instructions this processor lacks \(int8 = 1: 1 plain C, 2 AVX2, 3 AVX-512 VNNI"):
            session(product_model(64, 16, arrays, int8=1, isa=3))


def q4_1_graph(rng: np.random.Generator, accuracy_level: int = 0) -> onnx.ModelProto:
    """x -> two q4_1 products (export.nbits, sharing x's block sums, at accuracy_level) -> a float32 head; and a
    plain 4-bit MatMulNBits (no offsets), which MatMulQ4 does not take."""
    weights = {"w1": rng.standard_normal((64, 96)), "w2": rng.standard_normal((64, 96)), "head": rng.standard_normal((96, 40))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="p1"), helper.make_node("MatMul", ["x", "w2"], ["h2"], name="p2"),
             helper.make_node("Add", ["h1", "h2"], ["h"]), helper.make_node("MatMul", ["h", "head"], ["logits"], name="head")]
    plain = quantize_q4_1(rng.standard_normal((16, 64)).astype(np.float32))
    nibbles = (plain.codes[..., 0::2] | plain.codes[..., 1::2] << 4).astype(np.uint8)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["M", 40]),
                               helper.make_tensor_value_info("int4", TensorProto.FLOAT, ["M", 16])],
                              [numpy_helper.from_array(w.astype(np.float32), name) for name, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert rewrite_matmuls(model, RewritePlan(block_size=32, accuracy_level=accuracy_level, head_format="fp32",
                                              head_accuracy_level=4, vocab_size=40)) == 2
    model.graph.node.append(helper.make_node("MatMulNBits", ["x", "int4.codes", "int4.scales"], ["int4"], domain="com.microsoft",
                                             K=64, N=16, bits=4, block_size=32, accuracy_level=0))
    model.graph.initializer.extend([numpy_helper.from_array(nibbles, "int4.codes"),
                                    numpy_helper.from_array(plain.scales.reshape(-1), "int4.scales")])
    return model


def test_the_rewrite_takes_the_q4_1_products_and_leaves_the_head_to_matmulbf16():
    model = q4_1_graph(np.random.default_rng(5))
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 3
    x = np.random.default_rng(6).standard_normal((5, 64)).astype(np.float32)
    want = session(model).run(None, {"x": x})
    assert q4_graph(model) == (2, 1)
    ops = [n.op_type for n in model.graph.node]
    assert sorted(ops) == ["Add", "MatMulBF16", "MatMulNBits", "MatMulQ4", "MatMulQ4"]  # NOTE: block sums and offsets gone
    assert not any("block_indicator" in t.name or t.name.endswith(".offsets") for t in model.graph.initializer)
    got = session(model).run(None, {"x": x})
    np.testing.assert_array_equal(got[1], want[1])  # NOTE: the plain 4-bit product is kept as it was
    # NOTE: bfloat16 activations in two products and the head, float16 scales off the grid
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=0.02 * np.abs(want[0]).max())


def int8_attributes(model: onnx.ModelProto, name: str = "int8") -> list[int]:
    return [helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "MatMulQ4" for a in n.attribute
            if a.name == name]


def test_with_int16_the_products_at_accuracy_level_0_take_int16_activations():
    model = q4_1_graph(np.random.default_rng(5), accuracy_level=4)
    first = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    next(a for a in first.attribute if a.name == "accuracy_level").i = 0  # NOTE: a product kept in float (float_share)
    x = np.random.default_rng(6).standard_normal((20, 64)).astype(np.float32)
    want = session(model).run(None, {"x": x})
    assert q4_graph(model, int16=True) == (2, 1)
    # NOTE: the level-4 product keeps int8, the level-0 one takes int16 (and no int8 attribute)
    assert int8_attributes(model) == [1] and int8_attributes(model, "int16") == [1]
    got = session(model).run(None, {"x": x})
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=0.02 * np.abs(want[0]).max())
    level0 = q4_1_graph(np.random.default_rng(5))
    q4_graph(level0, int16=True)
    assert int8_attributes(level0) == [] and int8_attributes(level0, "int16") == [1, 1]


def test_int16_activations_where_avx2_has_no_avx512_bf16():
    avx2 = {"avx2": True, "fma": True}
    assert int16_activations(avx2) and int16_activations(avx2 | {"avx512f": True, "avx512_vnni": True})
    assert not int16_activations(avx2 | {"avx512f": True, "avx512_bf16": True})
    assert not int16_activations({"avx2": True}) and not int16_activations({})


@pytest.mark.skipif(not (HAS_VNNI or HAS_AVX2), reason="neither AVX-512 VNNI nor AVX2 on this processor")
def test_products_at_accuracy_level_4_take_int8_activations():
    model = q4_1_graph(np.random.default_rng(5), accuracy_level=4)
    x = np.random.default_rng(6).standard_normal((20, 64)).astype(np.float32)
    want = session(model).run(None, {"x": x})  # NOTE: ONNX Runtime's MatMulNBits, int8 activations of its own
    assert q4_graph(model) == (2, 1) and int8_attributes(model) == [1, 1]
    got = session(model).run(None, {"x": x})
    np.testing.assert_array_equal(got[1], want[1])
    # NOTE: both round activations to int8 per block of 32 (their roundings may differ by a code), the head in bfloat16
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=0.02 * np.abs(want[0]).max())
    level0 = q4_1_graph(np.random.default_rng(5))
    q4_graph(level0)
    assert int8_attributes(level0) == [0, 0]


def test_without_bfloat16_kernels_only_the_int8_products_are_rewritten():
    model = q4_1_graph(np.random.default_rng(5), accuracy_level=4)
    first = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    next(a for a in first.attribute if a.name == "accuracy_level").i = 0  # NOTE: a product kept in float (float_share)
    x = np.random.default_rng(6).standard_normal((20, 64)).astype(np.float32)
    want = session(model).run(None, {"x": x})
    assert q4_graph(model, bfloat16=False) == (1, 0) and int8_attributes(model) == [1]
    ops = sorted(n.op_type for n in model.graph.node)
    # NOTE: the level-0 product keeps its MatMulNBits and Add, the MatMuls of block sums and offsets; the head stays float32
    assert ops.count("MatMulNBits") == 2 and ops.count("MatMulQ4") == 1 and "MatMulBF16" not in ops
    assert ops.count("MatMul") == 3 and any(n.op_type == "MatMul" and n.name == "head" for n in model.graph.node)
    got = session(model).run(None, {"x": x})
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=0.02 * np.abs(want[0]).max())


def test_the_kernel_setting_for_q4_1():
    bf16 = {"avx512f": True, "avx512_bf16": True}
    assert matmul_kernel("auto", LIBRARY, bf16, method="q4_1") == ("lepton", "AVX-512 BF16")
    assert matmul_kernel("auto", LIBRARY, {"avx512f": True, "avx512_vnni": True}, method="q4_1") == (
        "onnxruntime", "neither AVX-512 BF16 nor AVX2 + FMA on this processor")
    assert matmul_kernel("lepton", LIBRARY, {}, method="q4_1") == ("lepton", "matmul_kernel=lepton")
    # NOTE: an export at accuracy level 4 (the preset) computes its products in int8: VNNI is what it needs
    vnni = {"avx512f": True, "avx512_vnni": True}
    assert matmul_kernel("auto", LIBRARY, vnni | bf16, method="q4_1", int8_activations=True) == ("lepton", "AVX-512 VNNI")
    assert bfloat16_kernels("auto", vnni | bf16) and bfloat16_kernels("lepton", vnni | bf16)
    # NOTE: MatMulQ4's bfloat16 activations have AVX-512 BF16 and AVX2 + FMA paths, else plain C only, whatever the setting
    avx2 = {"avx2": True, "fma": True}
    assert bfloat16_kernels("auto", avx2) and bfloat16_kernels("lepton", vnni | avx2)
    assert not bfloat16_kernels("auto", vnni) and not bfloat16_kernels("lepton", {"avx2": True})
    # NOTE: VNNI without BF16 or AVX2 (flags no processor has, but the rule): the int8 products only
    kernel, why = matmul_kernel("auto", LIBRARY, vnni, method="q4_1", int8_activations=True)
    assert kernel == "lepton" and why.startswith("AVX-512 VNNI; neither AVX-512 BF16 nor AVX2 + FMA, so the products at accuracy level 0 stay")
    # NOTE: AVX2 (Zen 3, Haswell .. Skylake clients): every product by MatMulQ4's AVX2 paths
    assert matmul_kernel("auto", LIBRARY, avx2, method="q4_1", int8_activations=True) == ("lepton", "AVX2 + FMA")
    assert matmul_kernel("auto", LIBRARY, avx2, method="q4_1") == ("lepton", "AVX2 + FMA")
    assert matmul_kernel("auto", LIBRARY, {"avx2": True}, method="q4_1", int8_activations=True) == (
        "onnxruntime", "neither AVX-512 VNNI nor AVX2 + FMA on this processor")


@pytest.fixture(scope="module")
def tiny_q4_1(tiny_exports, tmp_path_factory):
    """head -> a q4_1 export of the tiny llama with that lm_head (q8_0: the preset's; fp32)."""
    export, _ = tiny_exports("llama", "dynamo")
    root = tmp_path_factory.mktemp("q4_1")
    for head in ("q8_0", "fp32"):
        write_quantized(export, root / head, resolve_preset("q4_1", None, None, None if head == "q8_0" else head))
    return lambda head: root / head


def q4_runner(export_dir, attention: str, kernel: str):
    config = EngineConfig(model_dir=export_dir, cache=CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=4 << 20),
                          runner=RunnerConfig(runner="onnxruntime", attention=attention, matmul_kernel=kernel,
                                              kv_cache_dtype="float32"))
    return make_runner(open_folder(config), config)


@pytest.mark.parametrize("head,attention,printed,printed_int8_only", [
    # NOTE: the preset (accuracy level 4, float_share 0.25): of ceil(0.25 x 9) inputs losing most to int8 blocks one
    # is the 8-bit head's (it stays int8), of ceil(0.25 x 8) with a float32 head none: 2 products keep bfloat16
    # (with neither AVX-512 BF16 nor AVX2 + FMA they stay MatMulNBits, and a float32 head MatMul: bfloat16_kernels)
    ("q8_0", "paged", "8 nodes, 6 with int8 activations, 2 bfloat16; the 8-bit ones, 1: MatMulQ8",
     "6 nodes, int8 activations; the 8-bit ones, 1: MatMulQ8"),
    ("q8_0", "slots", "8 nodes, 6 with int8 activations, 2 bfloat16; the 8-bit ones, 1: MatMulQ8",
     "6 nodes, int8 activations; the 8-bit ones, 1: MatMulQ8"),
    ("fp32", "slots", "8 nodes, 6 with int8 activations, 2 bfloat16; the float32 products left, 1, in bfloat16: MatMulBF16",
     "6 nodes, int8 activations")])
def test_a_q4_1_export_serves_its_logits_with_matmulq4(tiny_q4_1, head, attention, printed, printed_int8_only, capsys):
    printed = printed if HAS_BF16 or HAS_AVX2 else printed_int8_only
    if HAS_AVX2 and not HAS_BF16:  # NOTE: the level-0 products take int16 activations there (int16_activations)
        printed = printed.replace("2 bfloat16", "2 int16")
    as_written = q4_runner(tiny_q4_1(head), "paged", "onnxruntime")
    assert "4-bit weight products: ONNX Runtime's MatMulNBits (matmul_kernel=onnxruntime)" in capsys.readouterr().out
    rewritten = q4_runner(tiny_q4_1(head), attention, "lepton")
    assert f"4-bit weight products: Lepton's MatMulQ4 ({printed}; matmul_kernel=lepton)" in capsys.readouterr().out
    worst = run_schedule(as_written, rewritten)
    # NOTE: tiny random models' logits are O(1); bfloat16 activations (and a bfloat16 head) move them by ~1e-2
    assert 0 < worst < 0.1
