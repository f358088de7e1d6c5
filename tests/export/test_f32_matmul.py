"""lepton.native's MatMulF32 and the rewrite of a float32 export's products to it (matmul_kernel).

Every instruction-set path must give the float32 product (one fma an input, in order: the paths agree bit for
bit), find each weight where the packing put it, refuse bad inputs naming the input and the limit; the rewrite
must take exactly the products it computes the same, and a float32 export served with it must give ONNX
Runtime's logits to float32 summation order.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lepton.config import CacheConfig, EngineConfig, RunnerConfig
from lepton.native import LIBRARY
from lepton.runners import make_runner, open_folder
from lepton.runners.f32_graph import f32_graph, pack
from lepton.runners.q8_graph import matmul_kernel
from tests.export.conftest import cpu_flags
from tests.export.test_bf16_matmul import float_products_model, session
from tests.export.test_bf16_matmul import product_model as bf16_product_model
from tests.export.test_slot_runner import BLOCK_SIZE, run_schedule

HAS_AVX512 = "avx512f" in cpu_flags()
HAS_AVX2 = {"avx2", "fma"} <= cpu_flags()
ISAS = [1, pytest.param(2, marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 + FMA on this processor")),
        pytest.param(3, marks=pytest.mark.skipif(not HAS_AVX512, reason="no AVX-512F on this processor"))]


def product_model(k: int, n: int, packed: np.ndarray, rank: int = 2, **attrs) -> onnx.ModelProto:
    return bf16_product_model(k, n, packed, rank, op="MatMulF32", **attrs)


def fma_in_order(a: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The kernel's arithmetic: per output, acc = fma(a[k], w[k], acc) for k = 0, 1, ...; the product of two float32
    values is exact in float64, its sum with the float32 accumulator rounded once to float32 (float64 first: a
    double rounding, which differs from fma's single one in about one case in 2^29)."""
    rows = a.reshape(-1, a.shape[-1]).astype(np.float64)
    w = weight.astype(np.float64)
    acc = np.zeros((rows.shape[0], w.shape[0]), np.float32)
    for j in range(rows.shape[1]):
        acc = (acc.astype(np.float64) + rows[:, j:j + 1] * w[None, :, j]).astype(np.float32)
    return acc.reshape(*a.shape[:-1], w.shape[0])


CASES = {  # name: (K, N, rows shape)
    "one input, one output": (1, 1, (1,)),
    "K odd, N not a multiple of 16": (37, 40, (3,)),
    "SmolLM2's qkv, one decode": (576, 960, (1,)),
    "SmolLM2's qkv, 16 decodes": (576, 960, (16,)),
    "13 rows in one pass": (100, 40, (13,)),
    "17 rows: a tile of 16, then 1": (66, 20, (17,)),
    "40 rows: tiles of 16, passes that end at a tile's end": (70, 48, (40,)),
    "SmolLM2's down_proj, rank 3": (1536, 576, (2, 9)),
    "130 rows: chunks and tile remainders": (96, 33, (130,)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("isa", ISAS)
def test_every_path_gives_the_float32_product(case, isa):
    k, n, rows = CASES[case]
    rng = np.random.default_rng(len(case))
    weight = rng.standard_normal((n, k)).astype(np.float32)
    a = rng.standard_normal((*rows, k)).astype(np.float32)
    got = session(product_model(k, n, pack(weight), rank=len(rows) + 1, isa=isa)).run(None, {"a": a})[0]
    assert got.shape == (*rows, n) and got.dtype == np.float32
    # NOTE: the same fma sequence up to the reference's rare double rounding: at most one float32 ulp of a sum
    want = fma_in_order(a, weight)
    np.testing.assert_allclose(got, want, rtol=0, atol=2.0 ** -22 * np.abs(want).max() + 1e-30)
    exact = a.astype(np.float64) @ weight.astype(np.float64).T
    np.testing.assert_allclose(got, exact, rtol=0, atol=2e-7 * k * np.abs(exact).max())
    if isa != 1:  # NOTE: one fma an input in the same order on every path: the same bits
        plain = session(product_model(k, n, pack(weight), rank=len(rows) + 1, isa=1)).run(None, {"a": a})[0]
        np.testing.assert_array_equal(got, plain)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_the_threads_do_not_change_the_bits(threads):
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((200, 96)).astype(np.float32)
    a = rng.standard_normal((70, 96)).astype(np.float32)
    want = session(product_model(96, 200, pack(weight)), threads=1).run(None, {"a": a})[0]
    got = session(product_model(96, 200, pack(weight)), threads=threads).run(None, {"a": a})[0]
    np.testing.assert_array_equal(got, want)


def test_pack_puts_each_weight_where_the_kernel_reads_it():
    n, k = 20, 6
    weight = np.arange(n * k, dtype=np.float32).reshape(n, k) + 1
    packed = pack(weight)
    assert packed.shape == (2, 6, 16) and packed.dtype == np.float32
    for out in range(n):
        for i in range(k):
            assert packed[out // 16, i, out % 16] == weight[out, i]
    assert not packed[1, :, 4:].any()  # NOTE: outputs 20..31 of the last panel are zero
    # NOTE: one weight at a time: output 17 of input 4 alone reaches y[:, 17], times a[:, 4]
    picks = np.zeros((n, k), np.float32)
    picks[17, 4] = 2.0
    a = np.arange(2 * k, dtype=np.float32).reshape(2, k)
    y = session(product_model(k, n, pack(picks))).run(None, {"a": a})[0]
    assert y[:, 17].tolist() == [8.0, 20.0] and np.count_nonzero(y) == 2


def test_bad_inputs_are_refused_with_the_input_and_the_limit():
    weight = np.ones((16, 8), np.float32)
    with pytest.raises(Exception, match=r"MatMulF32: K = 0 is not a positive number \(at least 1\)"):
        session(product_model(0, 16, pack(weight)))
    with pytest.raises(Exception, match=r"MatMulF32: N = 0, expected at least 1"):
        session(product_model(8, 0, pack(weight)))
    model = product_model(8, 16, pack(weight))
    with pytest.raises(Exception, match=r"MatMulF32: A has 6 values per row, expected K = 8"):
        session(model).run(None, {"a": np.ones((2, 6), np.float32)})
    with pytest.raises(Exception, match=r"MatMulF32: B has 16 rows of 16 weights, expected ceil\(N / 16\) x K / 1 = 8"):
        session(product_model(8, 16, pack(np.ones((32, 8), np.float32)))).run(None, {"a": np.ones((2, 8), np.float32)})
    with pytest.raises(Exception, match=r"MatMulF32: isa = 4 needs instructions this processor lacks \(1 plain C, 2 AVX2 \+ FMA, 3"):
        session(product_model(8, 16, pack(weight), isa=4))
    if not HAS_AVX2:
        with pytest.raises(Exception, match="isa = 2 needs instructions this processor lacks"):
            session(product_model(8, 16, pack(weight), isa=2))
    if not HAS_AVX512:
        with pytest.raises(Exception, match="isa = 3 needs instructions this processor lacks"):
            session(product_model(8, 16, pack(weight), isa=3))


def test_the_rewrite_takes_the_float32_weight_products():
    model, feeds, _ = float_products_model(np.random.default_rng(3))
    want = session(model).run(None, feeds)
    assert f32_graph(model) == 5
    assert [n.op_type for n in model.graph.node] == ["MatMulF32", "MatMulF32", "Add", "MatMulF32", "MatMulF32",
                                                     "Gather", "MatMul", "Gemm", "MatMulF32", "Gemm"]
    names = {t.name for t in model.graph.initializer}
    assert {"tied", "odd"} <= names and {"gemm", "biased", "kn"}.isdisjoint(names)  # NOTE: replaced by packed copies
    assert {"gemm.f32", "biased.f32", "kn.f32", "tied.f32", "odd.f32"} <= names  # NOTE: "odd" packed once for h7
    got = session(model).run(None, feeds)
    np.testing.assert_array_equal(got[0], want[0])  # NOTE: the Gather still reads the table as it was
    np.testing.assert_array_equal(got[4], want[4])  # NOTE: alpha 2 still ONNX Runtime's Gemm
    for g, e in zip(got[1:4], want[1:4]):  # NOTE: float32 throughout: only the order of the sums differs
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-5 * np.abs(e).max())


def f32_runner(export_dir, attention: str, kernel: str):
    config = EngineConfig(model_dir=export_dir, cache=CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=4 << 20),
                          runner=RunnerConfig(runner="onnxruntime", attention=attention, matmul_kernel=kernel))
    return make_runner(open_folder(config), config)


@pytest.mark.parametrize("kind,exporter,attention", [("llama", "dynamo", "slots"), ("llama", "dynamo", "paged"),
                                                     ("qwen2", "torchscript", "slots")])
def test_a_float32_export_serves_its_logits_through_matmulf32(tiny_exports, kind, exporter, attention, capsys):
    export_dir, _ = tiny_exports(kind, exporter)
    as_written = f32_runner(export_dir, "paged", "onnxruntime")
    assert "float32 weight products: ONNX Runtime's MatMul and Gemm (matmul_kernel=onnxruntime)" in capsys.readouterr().out
    rewritten = f32_runner(export_dir, attention, "lepton")
    printed = capsys.readouterr().out
    assert "float32 weight products: Lepton's MatMulF32 (" in printed and "matmul_kernel=lepton)" in printed
    assert "in the weight products' own tasks" in printed  # NOTE: the epilogues and norms went in too
    worst = run_schedule(as_written, rewritten)
    # NOTE: tiny random models' logits are O(1); float32 sums in another order move them by ~1e-6
    assert worst < 1e-4


def test_the_kernel_choice_for_a_float32_export():
    assert matmul_kernel("auto", LIBRARY, {"avx512f": True, "avx2": True}, method="float32") == ("lepton", "AVX-512F")
    assert matmul_kernel("auto", LIBRARY, {"avx2": True, "fma": True}, method="float32") == ("lepton", "AVX2 + FMA")
    assert matmul_kernel("auto", LIBRARY, {"avx2": True}, method="float32") == (
        "onnxruntime", "neither AVX-512F nor AVX2 + FMA on this processor")
    assert matmul_kernel("lepton", LIBRARY, {"avx2": True}, method="float32") == ("lepton", "matmul_kernel=lepton")
    assert matmul_kernel("onnxruntime", LIBRARY, {"avx512f": True}, method="float32") == (
        "onnxruntime", "matmul_kernel=onnxruntime")
    assert matmul_kernel("auto", None, {"avx512f": True}, method="float32")[0] == "onnxruntime"
