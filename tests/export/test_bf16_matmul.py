"""lepton.native's MatMulBF16 and the weight_dtype=bfloat16 rewrite of a float32 export's products.

Every instruction-set path must give what float64 gives on the bfloat16-rounded operands (to float32
summation), round activations to nearest even, find each weight where the packing put it, refuse bad
inputs naming the input and the limit; the rewrite must take exactly the products it computes the same,
and a float32 export served with it must give its logits to bfloat16's precision.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.quantization import resolve_preset, write_quantized
from lepton.config import CacheConfig, ConfigError, EngineConfig, RunnerConfig
from lepton.native import DOMAIN, LIBRARY
from lepton.runners import make_runner, open_folder
from lepton.runners.bf16_graph import bf16_graph, from_bf16, pack, to_bf16, weight_of
from tests.export.conftest import cpu_flags
from tests.export.test_slot_runner import BLOCK_SIZE, run_schedule

HAS_BF16 = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= cpu_flags()
HAS_AVX2 = {"avx2", "fma"} <= cpu_flags()
ISAS = [1, pytest.param(2, marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 + FMA on this processor")),
        pytest.param(3, marks=pytest.mark.skipif(not HAS_BF16, reason="no AVX-512 BF16 on this processor"))]
needs_bf16 = pytest.mark.skipif(not (HAS_BF16 or HAS_AVX2), reason="weight_dtype=bfloat16 needs AVX-512 BF16 or AVX2 + FMA")


def product_model(k: int, n: int, packed: np.ndarray, rank: int = 2, op: str = "MatMulBF16", **attrs) -> onnx.ModelProto:
    """One product `op` of A [..., width] (the kernel checks the width) with the packed weights B."""
    node = helper.make_node(op, ["a", "b"], ["y"], domain=DOMAIN, K=k, N=n, **attrs)
    rows = [f"r{i}" for i in range(rank - 1)]
    graph = helper.make_graph([node], "product", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [*rows, "width"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*rows, n])],
                              [numpy_helper.from_array(packed, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def session(model: onnx.ModelProto, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(LIBRARY))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def rounded(x: np.ndarray) -> np.ndarray:
    return from_bf16(to_bf16(x)).astype(np.float64)


CASES = {  # name: (K, N, rows shape)
    "one pair, one output": (2, 1, (1,)),
    "N not a multiple of 16": (64, 40, (3,)),
    "SmolLM2's qkv, 16 decodes": (576, 960, (16,)),
    "13 rows in one pass, K not a multiple of 32": (100, 40, (13,)),
    "17 rows: tiles of 8, the last of 1": (66, 20, (17,)),
    "SmolLM2's down_proj, rank 3": (1536, 576, (2, 9)),
    "130 rows: chunks and tile remainders": (96, 33, (130,)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("isa", ISAS)
def test_every_path_gives_the_bfloat16_product(case, isa):
    k, n, rows = CASES[case]
    rng = np.random.default_rng(len(case))
    weight = rng.standard_normal((n, k)).astype(np.float32)
    a = rng.standard_normal((*rows, k)).astype(np.float32)
    want = rounded(a) @ rounded(weight).T
    got = session(product_model(k, n, pack(weight), rank=len(rows) + 1, isa=isa)).run(None, {"a": a})[0]
    assert got.shape == (*rows, n)
    # NOTE: float32 sums of k exact products: a few float32 roundings of the largest partial sums
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-7 * np.sqrt(k) * np.abs(want).max())
    if isa != 1:
        plain = session(product_model(k, n, pack(weight), rank=len(rows) + 1, isa=1)).run(None, {"a": a})[0]
        if isa == 2:  # NOTE: the plain C path's two FMAs a pair, eight outputs at a time: the same bits
            np.testing.assert_array_equal(got, plain)
        else:
            np.testing.assert_allclose(got, plain, rtol=0, atol=1e-6 * np.abs(plain).max())


@pytest.mark.parametrize("isa", ISAS)
def test_activations_round_to_nearest_even(isa):
    one = np.float32(1.0)
    # NOTE: halfway between two bfloat16 values (2^-8 past 1 and past 1 + 2^-7): down to the even 1, up
    # to the even 1 + 2^-6; just past halfway rounds up; bfloat16 values stay as they are; a denormal is 0
    values = np.array([one + 2 ** -8, one + 3 * 2 ** -8, one + 2 ** -8 + 2 ** -20, 1.5, -2.75, 0.0, 1e-39], np.float32)
    # NOTE: 32 inputs a row, so the vector path converts whole vectors and the plain tail the last pair
    a = np.zeros((len(values), 34), np.float32)
    a[:, 0] = a[:, 32] = values
    picks = np.zeros((2, 34), np.float32)
    picks[0, 0] = picks[1, 32] = 1.0
    got = session(product_model(34, 2, pack(picks), isa=isa)).run(None, {"a": a})[0]
    want = [1.0, 1 + 2 ** -6, 1 + 2 ** -7, 1.5, -2.75, 0.0, 0.0]
    assert got[:, 0].tolist() == want and got[:, 1].tolist() == want
    assert from_bf16(to_bf16(values)).tolist() == want
    nan = from_bf16(to_bf16(np.array([np.nan], np.float32)))
    assert np.isnan(nan).all()


def test_pack_puts_each_weight_where_the_kernel_reads_it():
    n, k = 20, 6
    weight = (np.arange(n * k, dtype=np.float32).reshape(n, k) + 1) / 4  # NOTE: exact in bfloat16
    packed = pack(weight)
    assert packed.shape == (2, 3, 32) and packed.dtype == np.uint16
    for out in range(n):
        for i in range(k):
            assert from_bf16(packed[out // 16, i // 2, 2 * (out % 16) + i % 2]) == weight[out, i]
    assert not packed[1, :, 2 * 4:].any()  # NOTE: outputs 20..31 of the last panel are zero


def test_bad_inputs_are_refused_with_the_input_and_the_limit():
    weight = np.ones((16, 8), np.float32)
    with pytest.raises(Exception, match=r"MatMulBF16: K = 7 is not a positive even number"):
        session(product_model(7, 16, pack(weight)))
    model = product_model(8, 16, pack(weight))
    with pytest.raises(Exception, match=r"MatMulBF16: A has 6 values per row, expected K = 8"):
        session(model).run(None, {"a": np.ones((2, 6), np.float32)})
    with pytest.raises(Exception, match=r"MatMulBF16: B has 8 packed pairs, expected ceil\(N / 16\) x K / 2 = 4"):
        session(product_model(8, 16, pack(np.ones((32, 8), np.float32)))).run(None, {"a": np.ones((2, 8), np.float32)})
    with pytest.raises(ValueError, match="K = 5 inputs: MatMulBF16 takes inputs in pairs"):
        pack(np.ones((4, 5), np.float32))
    with pytest.raises(Exception, match=r"isa = 4 needs instructions this processor lacks \(1 plain C, 2 AVX2 \+ FMA, 3 AVX-512"):
        session(product_model(8, 16, pack(weight), isa=4))
    if not HAS_BF16:
        with pytest.raises(Exception, match="isa = 3 needs instructions this processor lacks"):
            session(product_model(8, 16, pack(weight), isa=3))


def float_products_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict, list[onnx.NodeProto]]:
    """A graph of float32 weight products a rewrite may take or must leave (outputs rows, h5, h6, h7, h8), its
    feeds and its nodes."""
    w = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in
         (("gemm", (24, 8)), ("biased", (16, 24)), ("bias", (16,)), ("kn", (16, 12)), ("tied", (20, 12)), ("odd", (4, 5)))}
    nodes = [
        helper.make_node("Gemm", ["x", "gemm"], ["h1"], transB=1),                        # a product
        helper.make_node("Gemm", ["h1", "biased", "bias"], ["h2"], transB=1),            # a product, + Add
        helper.make_node("MatMul", ["h2", "kn"], ["h3"]),                                # a product ([K, N])
        helper.make_node("Gemm", ["h3", "tied"], ["h4"], transB=1),                      # a product; the table stays
        helper.make_node("Gather", ["tied", "ids"], ["rows"]),                           # reads the float32 table
        helper.make_node("MatMul", ["h4", "h4t"], ["h5"]),                               # two activations: kept
        helper.make_node("Gemm", ["h3", "gemm2"], ["h6"], transB=0),                     # transB=0: kept
        helper.make_node("Gemm", ["odd_in", "odd"], ["h7"], transB=1),                   # K odd
        helper.make_node("Gemm", ["odd_in", "odd"], ["h8"], transB=1, alpha=2.0),        # alpha 2: kept
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits.append(numpy_helper.from_array(rng.standard_normal((12, 3)).astype(np.float32), "gemm2"))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 8]), helper.make_tensor_value_info("ids", TensorProto.INT64, [2]),
         helper.make_tensor_value_info("h4t", TensorProto.FLOAT, [20, 2]), helper.make_tensor_value_info("odd_in", TensorProto.FLOAT, ["M", 5])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("rows", "h5", "h6", "h7", "h8")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"x": rng.standard_normal((5, 8)).astype(np.float32), "ids": np.array([3, 0], np.int64),
             "h4t": rng.standard_normal((20, 2)).astype(np.float32), "odd_in": rng.standard_normal((5, 5)).astype(np.float32)}
    return model, feeds, nodes


def test_the_rewrite_takes_the_float32_weight_products():
    model, feeds, nodes = float_products_model(np.random.default_rng(3))
    want = session(model).run(None, feeds)
    inits_by_name = {t.name: t for t in model.graph.initializer}
    assert [weight_of(n, inits_by_name) is not None for n in nodes] == [True] * 4 + [False] * 5  # NOTE: K odd: kept
    assert bf16_graph(model) == 4
    assert [n.op_type for n in model.graph.node] == ["MatMulBF16", "MatMulBF16", "Add", "MatMulBF16", "MatMulBF16",
                                                     "Gather", "MatMul", "Gemm", "Gemm", "Gemm"]
    names = {t.name for t in model.graph.initializer}
    assert "tied" in names and {"gemm", "biased", "kn"}.isdisjoint(names)  # NOTE: replaced by their packed copies
    got = session(model).run(None, feeds)
    np.testing.assert_array_equal(got[0], want[0])  # NOTE: the Gather still reads float32
    np.testing.assert_array_equal(got[3], want[3])
    np.testing.assert_array_equal(got[4], want[4])
    for g, e in zip(got[1:3], want[1:3]):  # NOTE: through three bfloat16 products
        np.testing.assert_allclose(g, e, rtol=0, atol=0.03 * np.abs(e).max())


def bf16_runner(export_dir, attention: str, weight_dtype: str):
    config = EngineConfig(model_dir=export_dir, cache=CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=4 << 20),
                          runner=RunnerConfig(runner="onnxruntime", attention=attention, weight_dtype=weight_dtype))
    return make_runner(open_folder(config), config)


@needs_bf16
@pytest.mark.parametrize("kind,exporter,attention", [("llama", "dynamo", "slots"), ("llama", "dynamo", "paged"),
                                                     ("qwen2", "torchscript", "slots")])
def test_a_float32_export_serves_its_logits_with_bfloat16_weights(tiny_exports, kind, exporter, attention, capsys):
    export_dir, _ = tiny_exports(kind, exporter)
    as_written = bf16_runner(export_dir, "paged", "export")
    rewritten = bf16_runner(export_dir, attention, "bfloat16")
    assert "weight products in bfloat16: Lepton's MatMulBF16 (" in capsys.readouterr().out
    nodes = [n.op_type for n in onnx.load(str(export_dir / "model.onnx")).graph.node]
    assert nodes.count("Gemm") + nodes.count("MatMul") > 0
    worst = run_schedule(as_written, rewritten)
    # NOTE: tiny random models' logits are O(1); bfloat16 weights and activations move them by ~1e-2
    assert 0 < worst < 0.1


def test_the_weight_dtype_setting(tiny_exports, tmp_path):
    with pytest.raises(ConfigError, match="weight_dtype: must be one of export, bfloat16, got 'fp16'"):
        EngineConfig.from_parameters({"model_dir": str(tmp_path), "weight_dtype": "fp16"})
    with pytest.raises(ConfigError, match="weight_dtype: bfloat16 applies to runner=onnxruntime only"):
        EngineConfig.from_parameters({"model_dir": str(tmp_path), "runner": "torch", "weight_dtype": "bfloat16"})
    export_dir, _ = tiny_exports("llama", "dynamo")
    quantized = tmp_path / "q8_0"
    write_quantized(export_dir, quantized, resolve_preset("q8_0", None, None))
    with pytest.raises(ConfigError, match=r"weight_dtype=bfloat16: .*q8_0 is a q8_0 export; bfloat16 products are made "
                                          r"from a float32 export's weights"):
        bf16_runner(quantized, "paged", "bfloat16")
