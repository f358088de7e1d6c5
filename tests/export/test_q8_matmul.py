"""lepton.native's MatMulQ8 against ONNX Runtime's MatMulNBits (8 bits, blocks of 32, accuracy level 4).

The runners rewrite a q8_0 export's weight products to MatMulQ8 (RunnerConfig.matmul_kernel): each
instruction-set path must give the same bits as the others, and what MatMulNBits gives up to the order
of float32 sums; the packing must put each code where the kernel reads it; a rewritten export must serve
the logits of the export as written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.quantization import resolve_preset, write_quantized
from lepton.config import CacheConfig, ConfigError, EngineConfig, RunnerConfig
from lepton.native import DOMAIN, LIBRARY
from lepton.runners import make_runner, open_folder
from lepton.runners.q8_graph import matmul_kernel, pack, q8_graph, rewritable
from tests.export.conftest import cpu_flags
from tests.export.test_slot_runner import BLOCK_SIZE, run_schedule

# NOTE: the instruction sets of the kernel's `isa` attribute and the /proc/cpuinfo flags each needs
ISAS = {1: set(), 2: {"avx2", "fma"}, 3: {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}}


def product_model(op: str, k: int, n: int, rank: int, initializers: list[onnx.TensorProto], **attrs) -> onnx.ModelProto:
    domain = DOMAIN if op == "MatMulQ8" else "com.microsoft"
    node = helper.make_node(op, ["a", *[t.name for t in initializers]], ["y"], domain=domain, K=k, N=n, **attrs)
    rows = [f"r{i}" for i in range(rank - 1)]  # NOTE: the width is not declared either: the kernel checks it
    graph = helper.make_graph([node], "product", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [*rows, "width"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*rows, n])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1),
                                                   helper.make_opsetid(DOMAIN, 1)])


def session(model: onnx.ModelProto, library: Path = LIBRARY) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def random_weights(rng: np.random.Generator, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' codes [N, K / 32, 32] (1..255: symmetric q8_0 never writes 0) and scales [N * K / 32], float32
    values float16 holds (what export/nbits.py writes; MatMulQ8 keeps them in float16)."""
    codes = rng.integers(1, 256, (n, k // 32, 32), dtype=np.uint8)
    return codes, rng.uniform(1e-3, 2e-2, n * (k // 32)).astype(np.float16).astype(np.float32)


def nbits_initializers(codes: np.ndarray, scales: np.ndarray) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scales, "scales")]


def q8_initializers(codes: np.ndarray, scales: np.ndarray) -> list[onnx.TensorProto]:
    packed, packed_scales = pack(codes, scales)
    return [numpy_helper.from_array(packed, "codes"), numpy_helper.from_array(packed_scales, "scales")]


def reference(a: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The product in float64 from the activations quantized as the kernel documents (float32 steps)."""
    k = a.shape[-1]
    blocks = a.reshape(-1, k // 32, 32)
    top = np.abs(blocks).max(-1, keepdims=True)
    scale = (top / np.float32(127)).astype(np.float32)
    inverse = np.where(top != 0, np.float32(1) / np.where(scale == 0, 1, scale), 0).astype(np.float32)
    q = np.rint(blocks * inverse)  # NOTE: numpy rounds half to even, as the kernel does
    weights = (codes.astype(np.float64) - 128) * scales.reshape(codes.shape[0], -1, 1)
    dots = np.einsum("mbi,nbi->mnb", q, weights) * scale[..., 0][:, None, :]
    return dots.sum(-1).reshape(*a.shape[:-1], codes.shape[0])


CASES = {  # name: (K, N, rows shape)
    "one row, one block, one panel": (32, 16, (1,)),
    "N not a multiple of 16": (64, 40, (3,)),
    "SmolLM2's qkv, 16 decodes": (576, 960, (16,)),
    "13 rows: one pass of 8 + 5 over the codes": (128, 48, (13,)),
    "two tiles of 16 rows and a partial one": (64, 16, (40,)),
    "SmolLM2's down_proj, rank 3": (1536, 576, (2, 9)),
    "three chunks of rows, tile remainders": (96, 33, (130,)),
    "rows quantized on the pool": (576, 200, (71,)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_instruction_set_gives_the_same_bits_and_matmulnbits_numbers(case):
    k, n, rows = CASES[case]
    rng = np.random.default_rng(3)
    codes, scales = random_weights(rng, k, n)
    a = rng.standard_normal((*rows, k)).astype(np.float32)
    a[..., :32] *= 40.0  # NOTE: blocks of very different scales
    if k > 32:
        a[..., 32:64] = 0.0  # NOTE: a block of zeros: scale 0
    want = session(product_model("MatMulNBits", k, n, a.ndim, nbits_initializers(codes, scales), bits=8,
                                 block_size=32, accuracy_level=4)).run(None, {"a": a})[0]
    flags, got = cpu_flags(), {}
    for isa, needs in ISAS.items():
        if needs <= flags:
            model = product_model("MatMulQ8", k, n, a.ndim, q8_initializers(codes, scales), isa=isa)
            got[isa] = session(model).run(None, {"a": a})[0]
    assert 1 in got and got[1].shape == (*rows, n)
    for isa, y in got.items():
        np.testing.assert_array_equal(y, got[1], err_msg=f"isa {isa} differs from plain C")
    scale = np.abs(want).max()
    np.testing.assert_allclose(got[1], want, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(got[1], reference(a, codes, scales), rtol=0, atol=2e-6 * scale)


def test_activations_round_half_to_even_on_every_path():
    """Scale 1 (max |a| = 127): halves are ties, which go to the even code (as MLAS rounds them)."""
    rng = np.random.default_rng(10)
    codes, scales = random_weights(rng, 32, 16)
    a = np.array([[127.0] + [v + 0.5 for v in range(-15, 16)]], np.float32)  # NOTE: -14.5 ... 15.5
    want = reference(a, codes, scales)
    away = np.floor(np.abs(a) + 0.5) * np.sign(a)  # NOTE: half away from zero, what the kernel must not do
    weights = (codes.astype(np.float64) - 128) * scales.reshape(16, 1, 1)
    wrong = np.einsum("mi,ni->mn", away, weights[:, 0])
    assert np.abs(wrong - want).max() > 1e-3 * np.abs(want).max()  # NOTE: the two are told apart
    for isa, needs in ISAS.items():
        if needs <= cpu_flags():
            got = session(product_model("MatMulQ8", 32, 16, 2, q8_initializers(codes, scales), isa=isa)).run(None, {"a": a})[0]
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())


@pytest.mark.parametrize("target", ["x86-64", "x86-64-v3", "x86-64-v4"])
def test_each_compiled_target_gives_the_same_bits(one_target_libraries, target):
    """The library built for one x86-64 level (its activation quantization compiled for that level alone)."""
    if target not in one_target_libraries:
        pytest.skip(f"this processor does not run {target} code")
    k, n, rows = CASES["rows quantized on the pool"]
    rng = np.random.default_rng(9)
    codes, scales = random_weights(rng, k, n)
    a = rng.standard_normal((*rows, k)).astype(np.float32)
    model = product_model("MatMulQ8", k, n, 2, q8_initializers(codes, scales))
    want = session(model).run(None, {"a": a})[0]
    np.testing.assert_array_equal(session(model, one_target_libraries[target]).run(None, {"a": a})[0], want)


def test_the_best_path_is_the_default():
    rng = np.random.default_rng(4)
    codes, scales = random_weights(rng, 64, 48)
    a = rng.standard_normal((5, 64)).astype(np.float32)
    default = session(product_model("MatMulQ8", 64, 48, 2, q8_initializers(codes, scales))).run(None, {"a": a})[0]
    plain = session(product_model("MatMulQ8", 64, 48, 2, q8_initializers(codes, scales), isa=1)).run(None, {"a": a})[0]
    np.testing.assert_array_equal(default, plain)


def test_pack_puts_each_code_where_the_kernel_reads_it():
    rng = np.random.default_rng(5)
    codes, scales = random_weights(rng, 64, 20)
    packed, packed_scales = pack(codes, scales)
    assert packed.shape == (2, 2, 512) and packed_scales.shape == (2, 2, 16) and packed_scales.dtype == np.float16
    for n, block, i in [(0, 0, 0), (5, 1, 7), (17, 0, 31), (19, 1, 30)]:
        panel, lane, group, t = n // 16, n % 16, i // 4, i % 4
        assert packed[panel, block, group * 64 + lane * 4 + t] == codes[n, block, i]
        assert packed_scales[panel, block, lane] == scales[n * 2 + block]
    assert (packed[1, :, :].reshape(2, 8, 16, 4)[:, :, 4:] == 128).all()  # NOTE: outputs 20-31 are padding
    assert (packed_scales[1, :, 4:] == 0).all()
    with pytest.raises(ValueError, match="scales: a value float16 does not hold exactly"):
        pack(codes, scales + np.float32(1e-7))


def test_bad_inputs_are_refused_with_the_input_and_the_limit():
    rng = np.random.default_rng(6)
    codes, scales = random_weights(rng, 64, 32)
    sess = session(product_model("MatMulQ8", 64, 32, 2, q8_initializers(codes, scales)))
    with pytest.raises(Exception, match="MatMulQ8: A has 60 values per row, expected K = 64"):
        sess.run(None, {"a": np.zeros((2, 60), np.float32)})
    wrong = session(product_model("MatMulQ8", 64, 48, 2, q8_initializers(codes, scales)))
    with pytest.raises(Exception, match=r"MatMulQ8: B has 4 packed blocks, expected ceil\(N / 16\) x K / 32 = 6"):
        wrong.run(None, {"a": np.zeros((2, 64), np.float32)})
    with pytest.raises(Exception, match="MatMulQ8: K = 40 is not a positive multiple of the block size 32"):
        session(product_model("MatMulQ8", 40, 32, 2, q8_initializers(codes, scales)))
    with pytest.raises(Exception, match="MatMulQ8: isa = 9 needs instructions this processor lacks"):
        session(product_model("MatMulQ8", 64, 32, 2, q8_initializers(codes, scales), isa=9))


def nbits_node(name: str, k: int, n: int, bits: int = 8, accuracy_level: int = 4, zero_points: bool = False,
               half_scales: bool = True):
    rng = np.random.default_rng(len(name))
    blob = 32 * bits // 8
    scales = rng.uniform(1e-3, 1e-2, n * k // 32).astype(np.float32)
    if half_scales:
        scales = scales.astype(np.float16).astype(np.float32)
    inits = [numpy_helper.from_array(rng.integers(1, 256, (n, k // 32, blob), dtype=np.uint8), f"{name}.codes"),
             numpy_helper.from_array(scales, f"{name}.scales")]
    inputs = [f"{name}.in", f"{name}.codes", f"{name}.scales"]
    if zero_points:
        inits.append(numpy_helper.from_array(np.full(n * k // 32, 128, np.uint8), f"{name}.zeros"))
        inputs.append(f"{name}.zeros")
    node = helper.make_node("MatMulNBits", inputs, [f"{name}.out"], name=name, domain="com.microsoft", K=k, N=n,
                            bits=bits, block_size=32, accuracy_level=accuracy_level)
    return node, inits


def test_the_rewrite_takes_only_what_matmulq8_computes_the_same():
    parts = [nbits_node("q8", 64, 64), nbits_node("q4", 64, 64, bits=4), nbits_node("zeros", 64, 64, zero_points=True),
             nbits_node("float32 scales", 64, 64, half_scales=False), nbits_node("acc1", 64, 48, accuracy_level=1)]
    nodes = [helper.make_node("Identity", ["x"], ["q8.in"])]
    for (node, _), following in zip(parts, ["q4.in", "zeros.in", "float32 scales.in", "acc1.in", None]):
        nodes.append(node)
        if following:
            nodes.append(helper.make_node("Identity", [node.output[0]], [following]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 64])],
                              [helper.make_tensor_value_info("acc1.out", TensorProto.FLOAT, ["M", 48])],
                              [t for _, inits in parts for t in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    x = np.random.default_rng(8).standard_normal((7, 64)).astype(np.float32)
    want = session(model).run(None, {"x": x})[0]
    inits = {t.name: t for t in model.graph.initializer}
    assert [rewritable(node, inits) for node, _ in parts] == [True, False, False, False, False]
    assert q8_graph(model) == 1
    assert [n.op_type for n in model.graph.node if n.op_type != "Identity"] == ["MatMulQ8", "MatMulNBits", "MatMulNBits",
                                                                               "MatMulNBits", "MatMulNBits"]
    assert "q8.codes" not in {t.name for t in model.graph.initializer}  # NOTE: replaced by the packed codes
    np.testing.assert_allclose(session(model).run(None, {"x": x})[0], want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_the_kernel_setting(tmp_path):
    vnni = {"avx512f": True, "avx512_vnni": True}
    assert matmul_kernel("auto", LIBRARY, vnni) == ("lepton", "AVX-512 VNNI")
    assert matmul_kernel("auto", LIBRARY, {"avx2": True, "fma": True}) == ("lepton", "AVX2 + FMA")
    assert matmul_kernel("auto", LIBRARY, {"avx2": True}) == (
        "onnxruntime", "neither AVX-512 VNNI nor AVX2 + FMA on this processor")
    assert matmul_kernel("lepton", LIBRARY, {"avx2": True}) == ("lepton", "matmul_kernel=lepton")
    assert matmul_kernel("onnxruntime", LIBRARY, vnni) == ("onnxruntime", "matmul_kernel=onnxruntime")
    assert "scripts/build_native.sh builds it" in matmul_kernel("auto", None, vnni)[1]
    with pytest.raises(RuntimeError, match="matmul_kernel=lepton: lepton/native/liblepton_ops.so is not built"):
        matmul_kernel("lepton", None, vnni)
    with pytest.raises(ConfigError, match="matmul_kernel: must be one of auto, lepton, onnxruntime, got 'fast'"):
        EngineConfig.from_parameters({"model_dir": str(tmp_path), "matmul_kernel": "fast"})


@pytest.fixture(scope="module")
def tiny_q8_0(tiny_exports, tmp_path_factory):
    export, _ = tiny_exports("llama", "dynamo")
    out = tmp_path_factory.mktemp("q8_0") / "q8_0"
    write_quantized(export, out, resolve_preset("q8_0", None, None))
    return out


def q8_runner(export_dir, attention: str, kernel: str):
    # NOTE: float32 slots (a quantized export's default is float16): the products alone are compared here; a
    # K/V rounding moves an activation's int8 code now and then, which the quality gate judges on SmolLM2
    config = EngineConfig(model_dir=export_dir, cache=CacheConfig(block_size=BLOCK_SIZE, kv_cache_memory_bytes=4 << 20),
                          runner=RunnerConfig(runner="onnxruntime", attention=attention, matmul_kernel=kernel,
                                          kv_cache_dtype="float32"))
    return make_runner(open_folder(config), config)


@pytest.mark.parametrize("attention", ["paged", "slots"])
def test_a_q8_0_export_serves_its_logits_with_matmulq8(tiny_q8_0, attention, capsys):
    as_written = q8_runner(tiny_q8_0, "paged", "onnxruntime")
    assert "ONNX Runtime's MatMulNBits (matmul_kernel=onnxruntime)" in capsys.readouterr().out
    rewritten = q8_runner(tiny_q8_0, attention, "lepton")
    assert "8-bit weight products: Lepton's MatMulQ8 (9 nodes; matmul_kernel=lepton)" in capsys.readouterr().out
    # NOTE: the RMS norms go into MatMulQ8 (norm_graph.py) and round differently from ONNX Runtime's norm: now and
    # then an activation lands on the other side of an int8 rounding, one code off, and a logit moves by ~1e-3 (1.1e-3
    # once in this schedule, with the slots, since the scales are float16 values); every other logit within 2e-6
    assert run_schedule(as_written, rewritten) < 3e-3
