"""The epilogues of Lepton's weight products (MatMulQ4, MatMulQ8, MatMulBF16, MatMulF32): the MLP's gate (gated = 1) and
the residual add (an optional last input), and the runner's rewrite of the nodes they replace
(lepton/runners/epilogue_graph.py).

On every instruction-set path a gated product must give silu(gate) x up of what the same product gives
ungated, to float32 rounding, for gates from -1,000s to +1,000s, and a product given a residual R exactly R
plus what it gives without; a gated N that is not pairs of panels, a gated attribute other than 0 or 1, a
residual of another shape and a gated product with a residual are refused naming the limit; the rewrites must
take exactly the MLP's gate and the residual adds after a Lepton product and give the graph's outputs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lepton.native import DOMAIN
from lepton.runners.bf16_graph import pack as bf16_pack
from lepton.runners.f32_graph import pack as f32_pack
from lepton.runners.q4_graph import pack as q4_pack
from lepton.runners.q8_graph import pack as q8_pack
from lepton.runners.epilogue_graph import epilogue_graph, gated_graph, interleave, residual_graph
from tests.export.test_bf16_matmul import HAS_BF16
from tests.export.test_f32_matmul import HAS_AVX512
from tests.export.test_q4_matmul import HAS_AVX2, HAS_VNNI, q4_weights
from tests.export.test_q8_matmul import random_weights, session

# NOTE: (op, attributes, isa and what it needs): the paths whose tiles store through a gated task's buffer
PATHS = {
    "MatMulQ4 bfloat16, C": ("MatMulQ4", {"int8": 0, "isa": 1}, True),
    "MatMulQ4 bfloat16, AVX-512 BF16": ("MatMulQ4", {"int8": 0, "isa": 3}, HAS_BF16),
    "MatMulQ4 bfloat16, AVX2": ("MatMulQ4", {"int8": 0, "isa": 2}, HAS_AVX2),
    "MatMulQ4 int8, C": ("MatMulQ4", {"int8": 1, "isa": 1}, True),
    "MatMulQ4 int8, AVX2": ("MatMulQ4", {"int8": 1, "isa": 2}, HAS_AVX2),
    "MatMulQ4 int8, AVX-512 VNNI": ("MatMulQ4", {"int8": 1, "isa": 3}, HAS_VNNI),
    "MatMulQ4 int16, C": ("MatMulQ4", {"int16": 1, "isa": 1}, True),
    "MatMulQ4 int16, AVX2": ("MatMulQ4", {"int16": 1, "isa": 2}, HAS_AVX2),
    "MatMulQ8, C": ("MatMulQ8", {"isa": 1}, True),
    "MatMulQ8, AVX2": ("MatMulQ8", {"isa": 2}, True),
    "MatMulQ8, AVX-512 VNNI": ("MatMulQ8", {"isa": 3}, HAS_VNNI),
    "MatMulBF16, C": ("MatMulBF16", {"isa": 1}, True),
    "MatMulBF16, AVX2": ("MatMulBF16", {"isa": 2}, HAS_AVX2),
    "MatMulBF16, AVX-512 BF16": ("MatMulBF16", {"isa": 3}, HAS_BF16),
    "MatMulF32, C": ("MatMulF32", {"isa": 1}, True),
    "MatMulF32, AVX2": ("MatMulF32", {"isa": 2}, HAS_AVX2),
    "MatMulF32, AVX-512F": ("MatMulF32", {"isa": 3}, HAS_AVX512),
}
ROWS = {"one decode": (1,), "16 decodes": (16,), "70 rows: two chunks, tile remainders": (70,), "rank 3": (2, 9)}


def packed_weights(op: str, rng: np.random.Generator, k: int, n: int, int8: int = 0) -> list[np.ndarray]:
    """The op's weight inputs for N outputs of K inputs, packed (panels on axis 0)."""
    if op == "MatMulQ4":
        return list(q4_pack(*q4_weights(rng, n, k), int8=bool(int8)))
    if op == "MatMulQ8":
        return list(q8_pack(*random_weights(rng, k, n)))
    if op == "MatMulF32":
        return [f32_pack(rng.standard_normal((n, k)).astype(np.float32) * 0.05)]
    return [bf16_pack(rng.standard_normal((n, k)).astype(np.float32) * 0.05)]


def product_model(op: str, k: int, n: int, weights: list[np.ndarray], rank: int, residual: bool = False,
                  **attrs) -> onnx.ModelProto:
    """A graph of the one product, Y = op(a); with residual, Y = op(a, residual: r)."""
    names = [f"w{i}" for i in range(len(weights))]
    node = helper.make_node(op, ["a", *names, *(["r"] if residual else [])], ["y"], domain=DOMAIN, K=k, N=n, **attrs)
    rows = [f"r{i}" for i in range(rank - 1)]
    width = n // 2 if attrs.get("gated") else n
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [*rows, k])]
    if residual:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))  # NOTE: the kernel checks its shape
    graph = helper.make_graph([node], "product", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*rows, width])],
                              [numpy_helper.from_array(w, name) for w, name in zip(weights, names)])
    return with_opsets(graph)


def with_opsets(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def silu_times_up(y: np.ndarray) -> np.ndarray:
    g, u = np.split(y.astype(np.float64), 2, axis=-1)
    return g * 0.5 * (1 + np.tanh(g / 2)) * u  # NOTE: sigmoid without overflow


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("path", PATHS)
def test_a_gated_product_gives_silu_of_its_gate_times_its_up(path, rows):
    op, attrs, runs = PATHS[path]
    if not runs:
        pytest.skip(f"{path}: this processor lacks its instructions")
    k, n, shape = 96, 64, ROWS[rows]
    rng = np.random.default_rng(len(path) + len(rows))
    weights = packed_weights(op, rng, k, n, attrs.get("int8", 0))
    a = rng.standard_normal((*shape, k)).astype(np.float32)
    a.reshape(-1, k)[-1] *= 2000.0  # NOTE: gates of -1,000s to +1,000s: exp's clamped range
    plain = session(product_model(op, k, n, weights, len(shape) + 1, **attrs)).run(None, {"a": a})[0]
    got = session(product_model(op, k, n, [interleave(w) for w in weights], len(shape) + 1, gated=1,
                                **attrs)).run(None, {"a": a})[0]
    want = silu_times_up(plain)
    assert got.shape == (*shape, n // 2)
    assert np.abs(plain.reshape(-1, n)[-1, : n // 2]).max() > 100  # NOTE: the large gates were reached
    scale = np.abs(want).max(-1, keepdims=True)
    assert (np.abs(got - want) <= 1e-6 * scale + 1e-30).all()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("path", PATHS)
def test_a_product_given_a_residual_gives_exactly_the_residual_plus_the_product(path, rows):
    op, attrs, runs = PATHS[path]
    if not runs:
        pytest.skip(f"{path}: this processor lacks its instructions")
    k, n, shape = 96, 40, ROWS[rows]  # NOTE: N not a multiple of 16: the last panel's 8 outputs
    rng = np.random.default_rng(len(path) * len(rows))
    weights = packed_weights(op, rng, k, n, attrs.get("int8", 0))
    a = rng.standard_normal((*shape, k)).astype(np.float32)
    r = rng.standard_normal((*shape, n)).astype(np.float32)
    plain = session(product_model(op, k, n, weights, len(shape) + 1, **attrs)).run(None, {"a": a})[0]
    got = session(product_model(op, k, n, weights, len(shape) + 1, residual=True, **attrs)).run(None, {"a": a, "r": r})[0]
    np.testing.assert_array_equal(got, r + plain)  # NOTE: the one float32 sum the Add made


def test_interleave_puts_gate_panel_j_before_up_panel_j():
    panels = np.arange(6)[:, None] * np.ones((1, 3), int)  # NOTE: gate panels 0, 1, 2; up panels 3, 4, 5
    assert interleave(panels)[:, 0].tolist() == [0, 3, 1, 4, 2, 5]


def test_bad_gated_products_are_refused_with_the_limit():
    rng = np.random.default_rng(0)
    weights = packed_weights("MatMulQ8", rng, 64, 48)
    with pytest.raises(Exception, match=r"MatMulQ8: N = 48, a gated product needs a multiple of 32"):
        session(product_model("MatMulQ8", 64, 48, weights, 2, gated=1))
    with pytest.raises(Exception, match=r"MatMulQ8: gated = 2, expected 0 \(Y = A W\^T\) or 1 \(Y = silu\(gate\) x up\)"):
        session(product_model("MatMulQ8", 64, 48, weights, 2, gated=2))
    weights = packed_weights("MatMulQ4", rng, 64, 48)
    with pytest.raises(Exception, match=r"MatMulQ4: N = 48, a gated product needs a multiple of 32"):
        session(product_model("MatMulQ4", 64, 48, weights, 2, gated=1))
    weights = packed_weights("MatMulBF16", rng, 64, 48)
    with pytest.raises(Exception, match=r"MatMulBF16: N = 48, a gated product needs a multiple of 32"):
        session(product_model("MatMulBF16", 64, 48, weights, 2, gated=1))


def test_bad_residuals_are_refused_with_the_shape():
    rng = np.random.default_rng(4)
    weights = packed_weights("MatMulQ8", rng, 64, 32)
    model = session(product_model("MatMulQ8", 64, 32, weights, 2, residual=True))
    a = np.ones((3, 64), np.float32)
    with pytest.raises(Exception, match=r"MatMulQ8: the residual's dimension 1 is 16, expected Y's 32"):
        model.run(None, {"a": a, "r": np.ones((3, 16), np.float32)})
    with pytest.raises(Exception, match=r"MatMulQ8: the residual's dimension 0 is 1, expected Y's 3"):
        model.run(None, {"a": a, "r": np.ones((1, 32), np.float32)})
    with pytest.raises(Exception, match=r"MatMulQ8: the residual has rank 1, expected Y's 2"):
        model.run(None, {"a": a, "r": np.ones(32, np.float32)})
    gated = session(product_model("MatMulQ8", 64, 32, [interleave(w) for w in weights], 2, residual=True, gated=1))
    with pytest.raises(Exception, match=r"MatMulQ8: a gated product \(gated = 1\) takes no residual \(input 3\)"):
        gated.run(None, {"a": a, "r": np.ones((3, 16), np.float32)})


def mlp_graph(rng: np.random.Generator, k: int = 64, n: int = 96, *, split_sizes: list[int] | None = None,
              axis: int = 1, extra_reader: bool = False, up_first: bool = False) -> onnx.ModelProto:
    """x -> MatMulQ8 (N = 2 I) -> Split in halves (num_outputs 2, or split_sizes) -> silu(gate) x up -> y, as the
    exports write an MLP after the rewrite to Lepton's products; extra_reader: the gate is a graph output too."""
    weights = packed_weights("MatMulQ8", rng, k, n)
    nodes = [helper.make_node("MatMulQ8", ["x", "w0", "w1"], ["gate_up"], domain=DOMAIN, K=k, N=n, name="gate_up_proj")]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    if split_sizes is None:
        nodes.append(helper.make_node("Split", ["gate_up"], ["gate", "up"], axis=axis, num_outputs=2))
    else:
        inits.append(numpy_helper.from_array(np.array(split_sizes, np.int64), "sizes"))
        nodes.append(helper.make_node("Split", ["gate_up", "sizes"], ["gate", "up"], axis=axis))
    nodes += [helper.make_node("Sigmoid", ["gate"], ["sig"]), helper.make_node("Mul", ["gate", "sig"], ["silu"]),
              helper.make_node("Mul", ["up", "silu"] if up_first else ["silu", "up"], ["y"])]
    halves = split_sizes or [n // 2, n // 2]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", min(halves)])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("gate", TensorProto.FLOAT, ["T", halves[0]]))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])], outputs,
                              inits, value_info=[helper.make_tensor_value_info("gate_up", TensorProto.FLOAT, ["T", n])])
    return with_opsets(graph)


@pytest.mark.parametrize("up_first", [False, True])
def test_the_rewrite_takes_the_mlp_gate_into_its_product(up_first):
    rng = np.random.default_rng(1)
    model = mlp_graph(rng, up_first=up_first)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    want = session(model).run(None, {"x": x})[0]
    assert gated_graph(model) == 1
    assert [node.op_type for node in model.graph.node] == ["MatMulQ8"]
    node = model.graph.node[0]
    assert list(node.output) == ["y"] and {a.name: a.i for a in node.attribute}["gated"] == 1
    assert sorted(t.name for t in model.graph.initializer) == ["w0.gated", "w1.gated"]
    got = session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert gated_graph(model) == 0  # NOTE: already gated


@pytest.mark.parametrize("change", [
    {"split_sizes": [32, 64]},  # NOTE: not halves
    {"axis": 0},  # NOTE: not the last axis
    {"extra_reader": True},  # NOTE: the gate is read elsewhere too
])
def test_the_rewrite_leaves_what_is_not_an_mlp_gate(change):
    model = mlp_graph(np.random.default_rng(2), **change)
    before = [node.op_type for node in model.graph.node]
    assert gated_graph(model) == 0
    assert [node.op_type for node in model.graph.node] == before


def test_split_sizes_of_halves_are_taken():
    model = mlp_graph(np.random.default_rng(3), split_sizes=[48, 48])
    assert gated_graph(model) == 1
    assert [node.op_type for node in model.graph.node] == ["MatMulQ8"]


def residual_graph_model(rng: np.random.Generator, residual_shape: list | None = None, second_reader: bool = False,
                         add_first: bool = False) -> onnx.ModelProto:
    """h [T, 32] -> MatMulBF16 (K 32, N 32) -> Add with h (the residual stream) -> out; residual_shape: the
    shape h is declared with (a broadcast when it is not [T, 32]); second_reader: the product is an output too."""
    weights = packed_weights("MatMulBF16", rng, 32, 32)
    nodes = [helper.make_node("MatMulBF16", ["h", "w0"], ["proj"], domain=DOMAIN, K=32, N=32, name="o_proj"),
             helper.make_node("Add", ["proj", "h"] if add_first else ["h", "proj"], ["out"])]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", 32])]
    if second_reader:
        outputs.append(helper.make_tensor_value_info("proj", TensorProto.FLOAT, ["T", 32]))
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("h", TensorProto.FLOAT, residual_shape or ["T", 32])],
                              outputs, [numpy_helper.from_array(weights[0], "w0")],
                              value_info=[] if second_reader else [helper.make_tensor_value_info("proj", TensorProto.FLOAT, ["T", 32])])
    return with_opsets(graph)


@pytest.mark.parametrize("add_first", [False, True])
def test_the_rewrite_takes_the_residual_add_into_its_product(add_first):
    rng = np.random.default_rng(5)
    model = residual_graph_model(rng, add_first=add_first)
    h = rng.standard_normal((7, 32)).astype(np.float32)
    want = session(model).run(None, {"h": h})[0]
    assert residual_graph(model) == 1
    assert [node.op_type for node in model.graph.node] == ["MatMulBF16"]
    assert list(model.graph.node[0].input) == ["h", "w0", "h"] and list(model.graph.node[0].output) == ["out"]
    np.testing.assert_array_equal(session(model).run(None, {"h": h})[0], want)
    assert residual_graph(model) == 0  # NOTE: it has its residual


@pytest.mark.parametrize("change", [
    {"residual_shape": ["T", 1]},  # NOTE: a broadcast, not the product's shape
    {"second_reader": True},  # NOTE: the product is read elsewhere too (and has no declared shape)
])
def test_the_rewrite_leaves_what_is_not_a_residual_add(change):
    model = residual_graph_model(np.random.default_rng(6), **change)
    assert residual_graph(model) == 0
    assert [node.op_type for node in model.graph.node] == ["MatMulBF16", "Add"]


def test_a_gated_product_is_given_no_residual():
    model = mlp_graph(np.random.default_rng(7))
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["T", 48])
    model.graph.input.append(h)
    model.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 48]))
    model.graph.node.append(helper.make_node("Add", ["y", "h"], ["out"]))
    model.graph.output.pop()
    model.graph.output.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", 48]))
    assert epilogue_graph(model) == (1, 0)
    assert [node.op_type for node in model.graph.node] == ["MatMulQ8", "Add"]
