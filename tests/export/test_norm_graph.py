"""The RMS norm inside Lepton's weight products (MatMulQ4, MatMulQ8, MatMulBF16, MatMulF32: the optional norm weight G after
the optional residual, attribute epsilon) and the runner's rewrite of the exported norm into them
(lepton/runners/norm_graph.py).

On every instruction-set path a product given G must give exactly what it gives without G on A's rows
normalized as the kernel defines it (x / r then times g in float32, r = sqrt(mean(x^2) + epsilon) from a float64 sum
of squares, rounded to float32), whether the rows are normalized on the calling thread or on the pool, with or
without a residual; a norm weight of another length or rank and a non-positive epsilon are refused naming the
limit; the rewrite must take exactly the exported norm chain when only Lepton's products read it, and leave it
when anything else does.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lepton.native import DOMAIN
from lepton.runners.norm_graph import norm_graph
from tests.export.test_epilogue_graph import PATHS, packed_weights, with_opsets
from tests.export.test_q8_matmul import session

ROWS = {"one decode": (1,), "16 decodes": (16,), "rank 3": (2, 9), "400 rows: normalized on the pool": (400,)}
EPSILON = 1e-5


def rms_norm(x: np.ndarray, g: np.ndarray, epsilon: float = EPSILON) -> np.ndarray:
    """The kernel's arithmetic (lepton/native/ort.h, norm_rows): eight float64 running sums of squares over
    inputs j, j + 8, ..., then their sum in order; r = float32(sqrt(sum / K + epsilon)); x / r, times g, in float32."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    k = rows.shape[1]
    part = np.zeros((rows.shape[0], 8))
    for j in range(0, k - k % 8, 8):
        part += rows[:, j:j + 8] ** 2
    for j in range(k - k % 8, k):
        part[:, 0] += rows[:, j] ** 2
    squares = np.zeros(rows.shape[0])
    for lane in range(8):
        squares += part[:, lane]
    r = np.sqrt(squares / k + np.float64(np.float32(epsilon))).astype(np.float32)
    return ((x.reshape(-1, k) / r[:, None]) * g).astype(np.float32).reshape(x.shape)


def normed_model(op: str, k: int, n: int, weights: list[np.ndarray], rank: int, residual: bool = False,
                 epsilon: float | None = EPSILON, **attrs) -> onnx.ModelProto:
    """Y = op(a, [residual: r], norm weight: g), g an input (the kernel checks its shape)."""
    names = [f"w{i}" for i in range(len(weights))]
    extra = {} if epsilon is None else {"epsilon": epsilon}
    node = helper.make_node(op, ["a", *names, "r" if residual else "", "g"], ["y"], domain=DOMAIN, K=k, N=n,
                            **extra, **attrs)
    rows = [f"r{i}" for i in range(rank - 1)]
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, [*rows, k]),
              helper.make_tensor_value_info("g", TensorProto.FLOAT, None)]
    if residual:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    graph = helper.make_graph([node], "normed", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, name) for w, name in zip(weights, names)])
    return with_opsets(graph)


def plain_model(op: str, k: int, n: int, weights: list[np.ndarray], **attrs) -> onnx.ModelProto:
    names = [f"w{i}" for i in range(len(weights))]
    node = helper.make_node(op, ["a", *names], ["y"], domain=DOMAIN, K=k, N=n, **attrs)
    graph = helper.make_graph([node], "plain", [helper.make_tensor_value_info("a", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, name) for w, name in zip(weights, names)])
    return with_opsets(graph)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("path", PATHS)
def test_a_product_given_a_norm_gives_the_product_of_the_normalized_rows(path, rows):
    op, attrs, runs = PATHS[path]
    if not runs:
        pytest.skip(f"{path}: this processor lacks its instructions")
    k, n, shape = 96, 40, ROWS[rows]
    rng = np.random.default_rng(len(path) + 3 * len(rows))
    weights = packed_weights(op, rng, k, n, attrs.get("int8", 0))
    a = (rng.standard_normal((*shape, k)) * rng.uniform(0.01, 30, (*shape, 1))).astype(np.float32)
    a[..., 5] *= 200.0  # NOTE: an outlier channel, as SmolLM2's residual stream has
    g = rng.uniform(0.2, 3.0, k).astype(np.float32)
    want = session(plain_model(op, k, n, weights, **attrs)).run(None, {"a": rms_norm(a, g)})[0]
    got = session(normed_model(op, k, n, weights, len(shape) + 1, **attrs)).run(None, {"a": a, "g": g})[0]
    assert got.shape == (*shape, n)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("path", ["MatMulQ4 int8, C", "MatMulQ8, C", "MatMulBF16, C", "MatMulBF16, AVX-512 BF16",
                                  "MatMulF32, AVX-512F"])
def test_a_norm_and_a_residual_together(path):
    op, attrs, runs = PATHS[path]
    if not runs:
        pytest.skip(f"{path}: this processor lacks its instructions")
    k, n = 64, 32
    rng = np.random.default_rng(9)
    weights = packed_weights(op, rng, k, n, attrs.get("int8", 0))
    a, r = rng.standard_normal((5, k)).astype(np.float32), rng.standard_normal((5, n)).astype(np.float32)
    g = rng.uniform(0.5, 2.0, k).astype(np.float32)
    plain = session(plain_model(op, k, n, weights, **attrs)).run(None, {"a": rms_norm(a, g, 1e-3)})[0]
    got = session(normed_model(op, k, n, weights, 2, residual=True, epsilon=1e-3, **attrs)).run(
        None, {"a": a, "g": g, "r": r})[0]
    np.testing.assert_array_equal(got, r + plain)


def test_epsilon_defaults_to_onnx_norms_and_zero_rows_stay_zero():
    rng = np.random.default_rng(2)
    weights = packed_weights("MatMulBF16", rng, 32, 16)
    a = np.zeros((2, 32), np.float32)
    a[1] = rng.standard_normal(32)
    g = np.ones(32, np.float32)
    got = session(normed_model("MatMulBF16", 32, 16, weights, 2, epsilon=None)).run(None, {"a": a, "g": g})[0]
    want = session(plain_model("MatMulBF16", 32, 16, weights)).run(None, {"a": rms_norm(a, g, 1e-5)})[0]
    np.testing.assert_array_equal(got, want)
    assert not got[0].any()


def test_bad_norms_are_refused_with_the_limit():
    rng = np.random.default_rng(4)
    weights = packed_weights("MatMulQ8", rng, 64, 32)
    model = session(normed_model("MatMulQ8", 64, 32, weights, 2))
    a = np.ones((3, 64), np.float32)
    with pytest.raises(Exception, match=r"MatMulQ8: the norm's weight \(input 4\) has 63 values, expected K = 64"):
        model.run(None, {"a": a, "g": np.ones(63, np.float32)})
    with pytest.raises(Exception, match=r"MatMulQ8: the norm's weight \(input 4\) has rank 2, expected 1"):
        model.run(None, {"a": a, "g": np.ones((1, 64), np.float32)})
    with pytest.raises(Exception, match=r"MatMulQ8: epsilon = -1, expected a positive number \(the RMS norm's\)"):
        session(normed_model("MatMulQ8", 64, 32, weights, 2, epsilon=-1.0))
    weights = packed_weights("MatMulQ4", rng, 64, 32)
    with pytest.raises(Exception, match=r"MatMulQ4: the norm's weight \(input 5\) has 32 values, expected K = 64"):
        session(normed_model("MatMulQ4", 64, 32, weights, 2)).run(None, {"a": a, "g": np.ones(32, np.float32)})
    weights = packed_weights("MatMulBF16", rng, 64, 32)
    with pytest.raises(Exception, match=r"MatMulBF16: the norm's weight \(input 3\) has 65 values, expected K = 64"):
        session(normed_model("MatMulBF16", 64, 32, weights, 2)).run(None, {"a": a, "g": np.ones(65, np.float32)})


def exported_norm_graph(rng: np.random.Generator, k: int = 64, *, readers: tuple[str, ...] = ("MatMulBF16",),
                        axis: int = -1, exponent: float = 2.0, inner_output: bool = False) -> onnx.ModelProto:
    """x [T, K] -> Pow 2, ReduceMean (axes input, keepdims), Add epsilon, Sqrt, Div, Mul by g -> each reader: a
    MatMulBF16 (N 32) or "Neg" (another reader of the normalized rows), as the exports write a layer's norm."""
    inits = [numpy_helper.from_array(np.array(exponent, np.float32), "two"),
             numpy_helper.from_array(np.array([axis], np.int64), "axes"),
             numpy_helper.from_array(np.array(EPSILON, np.float32), "eps"),
             numpy_helper.from_array(rng.uniform(0.5, 2.0, k).astype(np.float32), "norm.weight")]
    nodes = [helper.make_node("Pow", ["x", "two"], ["pow"]),
             helper.make_node("ReduceMean", ["pow", "axes"], ["mean"], keepdims=1),
             helper.make_node("Add", ["mean", "eps"], ["add"]), helper.make_node("Sqrt", ["add"], ["sqrt"]),
             helper.make_node("Div", ["x", "sqrt"], ["div"]), helper.make_node("Mul", ["norm.weight", "div"], ["normed"])]
    outputs = []
    for i, reader in enumerate(readers):
        if reader == "Neg":
            nodes.append(helper.make_node("Neg", ["normed"], [f"y{i}"]))
            shape = ["T", k]
        else:
            inits.append(numpy_helper.from_array(packed_weights("MatMulBF16", rng, k, 32)[0], f"w{i}"))
            nodes.append(helper.make_node("MatMulBF16", ["normed", f"w{i}"], [f"y{i}"], domain=DOMAIN, K=k, N=32))
            shape = ["T", 32]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, shape))
    if inner_output:
        outputs.append(helper.make_tensor_value_info("sqrt", TensorProto.FLOAT, ["T", 1]))
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", k])],
                              outputs, inits)
    return with_opsets(graph)


@pytest.mark.parametrize("readers", [("MatMulBF16",), ("MatMulBF16", "MatMulBF16")], ids=["one product", "two products"])
def test_the_rewrite_takes_the_norm_into_the_products_that_read_it(readers):
    rng = np.random.default_rng(1)
    model = exported_norm_graph(rng, readers=readers)
    x = (rng.standard_normal((6, 64)) * 20).astype(np.float32)
    g = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "norm.weight"))
    before = session(model).run(None, {"x": x})
    assert norm_graph(model) == 1
    assert [node.op_type for node in model.graph.node] == ["MatMulBF16"] * len(readers)
    for i, node in enumerate(model.graph.node):
        assert list(node.input) == ["x", f"w{i}", "", "norm.weight"]
        assert {a.name: a.f for a in node.attribute}["epsilon"] == pytest.approx(EPSILON)
    assert sorted(t.name for t in model.graph.initializer) == ["norm.weight"] + [f"w{i}" for i in range(len(readers))]
    after = session(model).run(None, {"x": x})
    plain = plain_model("MatMulBF16", 64, 32, [numpy_helper.to_array(next(t for t in model.graph.initializer
                                                                             if t.name == "w0"))])
    np.testing.assert_array_equal(after[0], session(plain).run(None, {"a": rms_norm(x, g)})[0])
    for got, want in zip(after, before):  # NOTE: ONNX Runtime's own norm, to a bfloat16 rounding of the rows
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())
    assert norm_graph(model) == 0  # NOTE: nothing left to take


@pytest.mark.parametrize("change", [
    {"readers": ("MatMulBF16", "Neg")},  # NOTE: the normalized rows are read elsewhere too
    {"axis": 0},  # NOTE: not the last axis
    {"exponent": 3.0},  # NOTE: not squares
    {"inner_output": True},  # NOTE: an inner value is a graph output
])
def test_the_rewrite_leaves_what_is_not_a_norm_only_products_read(change):
    model = exported_norm_graph(np.random.default_rng(2), **change)
    before = [node.op_type for node in model.graph.node]
    assert norm_graph(model) == 0
    assert [node.op_type for node in model.graph.node] == before


def test_a_product_with_its_residual_takes_the_norm_after_it():
    model = exported_norm_graph(np.random.default_rng(3))
    model.graph.input.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["T", 32]))
    model.graph.node[-1].input.append("h")
    assert norm_graph(model) == 1
    assert list(model.graph.node[0].input) == ["x", "w0", "h", "norm.weight"]
