"""lepton.native's TopKRescore and the rewrite of an export's rescore chain into it (lepton/runners/rescore_graph.py).

Each row's k largest approximate logits must become the exact dot products (after the optional RMS norm, column
scale and bfloat16 rounding, in that order), every other logit must stay as it was, a NaN is never a candidate,
bad inputs are refused naming what is wrong; the rewrite must replace exactly the exporter's chain and give its
logits to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, RuntimeException

from export.nbits import rescore_nodes
from lepton.native import DOMAIN
from lepton.runners.bf16_graph import from_bf16, to_bf16
from lepton.runners.rescore_graph import rescore_graph
from tests.export.test_bf16_matmul import session

N, K = 300, 40


def rescore_model(k: int, scale: bool = False, norm: bool = False, bfloat16: int = 0, rank: int = 2) -> onnx.ModelProto:
    rows = [f"r{i}" for i in range(rank - 1)]
    inputs = ["x", "h", "table", "scale" if scale else ""] + (["g"] if norm else [])
    node = helper.make_node("TopKRescore", inputs, ["y"], domain=DOMAIN, k=k, bfloat16=bfloat16,
                            **({"epsilon": 1e-5} if norm else {}))
    value_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*rows, "n"]),
                    helper.make_tensor_value_info("h", TensorProto.FLOAT, [*rows, "k"]),
                    helper.make_tensor_value_info("table", TensorProto.FLOAT, ["N", "K"])]
    value_inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["K"]) for name in ("scale", "g")
                     if name in inputs]
    graph = helper.make_graph([node], "rescore", value_inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*rows, "n"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def reference(x, h, table, k, scale=None, g=None, bfloat16=False):
    """float64 of the op's definition: the k largest of each row (ties broken by position) replaced by exact dots."""
    h = h.astype(np.float64)
    if g is not None:
        h = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-5) * g
    if scale is not None:
        h = h * scale
    rows = table.astype(np.float64)
    if bfloat16:
        h, rows = (from_bf16(to_bf16(a.astype(np.float32))).astype(np.float64) for a in (h, rows))
    y = x.astype(np.float64).copy()
    for m in range(x.shape[0]):
        ids = np.argsort(-np.nan_to_num(x[m], nan=-np.inf), kind="stable")[:k]
        ids = ids[~np.isnan(x[m, ids])]
        y[m, ids] = rows[ids] @ h[m]
    return y


@pytest.mark.parametrize("case", ["plain", "scale", "norm", "bfloat16", "norm, scale and bfloat16"])
@pytest.mark.parametrize("rows", [1, 5])
def test_each_rows_top_k_become_the_exact_logits_and_the_rest_stay(case, rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, N)).astype(np.float32)
    h = rng.standard_normal((rows, K)).astype(np.float32)
    table = rng.standard_normal((N, K)).astype(np.float32)
    scale = (0.5 + rng.random(K)).astype(np.float32) if "scale" in case else None
    g = (0.5 + rng.random(K)).astype(np.float32) if "norm" in case else None
    bfloat16 = "bfloat16" in case
    feeds = {"x": x, "h": h, "table": table} | ({"scale": scale} if scale is not None else {}) | ({"g": g} if g is not None else {})
    got = session(rescore_model(16, scale is not None, g is not None, int(bfloat16))).run(None, feeds)[0]
    want = reference(x, h, table, 16, scale, g, bfloat16)
    changed = got != x
    assert (changed.sum(1) == 16).all()  # NOTE: random floats: no exact dot equals its approximation
    np.testing.assert_array_equal(got[~changed], x[~changed])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_leading_dimensions_more_candidates_than_logits_and_nans():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, N)).astype(np.float32)
    x[0, 1, [5, 17]] = np.nan
    h = rng.standard_normal((2, 3, K)).astype(np.float32)
    table = rng.standard_normal((N, K)).astype(np.float32)
    got = session(rescore_model(N + 10, rank=3)).run(None, {"x": x, "h": h, "table": table})[0]
    want = reference(x.reshape(6, N), h.reshape(6, K), table, N).reshape(2, 3, N)
    assert np.isnan(got[0, 1, [5, 17]]).all()  # NOTE: never a candidate, kept for the sampler's check
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want), rtol=2e-5, atol=2e-5)


def test_bad_inputs_and_attributes_are_refused_naming_them():
    x, h, table = (np.zeros(shape, np.float32) for shape in ((2, N), (2, K), (N, K)))
    with pytest.raises(InvalidArgument, match=f"X has {N - 1} values per row, expected the table's N = {N}"):
        session(rescore_model(4)).run(None, {"x": x[:, 1:], "h": h, "table": table})
    with pytest.raises(InvalidArgument, match=f"H has {K + 1} values per row, expected the table's K = {K}"):
        session(rescore_model(4)).run(None, {"x": x, "h": np.zeros((2, K + 1), np.float32), "table": table})
    with pytest.raises(InvalidArgument, match=f"the column scale \\(input 3\\) has 3 values, expected K = {K}"):
        session(rescore_model(4, scale=True)).run(None, {"x": x, "h": h, "table": table, "scale": np.ones(3, np.float32)})
    with pytest.raises(RuntimeException, match="TopKRescore: k = 0, expected at least 1 candidates"):
        session(rescore_model(0))
    with pytest.raises(RuntimeException, match="TopKRescore: bfloat16 = 2"):
        session(rescore_model(4, bfloat16=2))


def exporter_head(scale: bool) -> tuple[onnx.ModelProto, dict]:
    """approx = h W^T (a plain MatMul standing in for the 8-bit head) and the exporter's own rescore chain."""
    rng = np.random.default_rng(3)
    table = rng.standard_normal((N, K)).astype(np.float32)
    column = (0.5 + rng.random(K)).astype(np.float32)
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array((table * column).T.copy(), "w_kn")]
    if scale:
        inits.append(numpy_helper.from_array(column, "head.rescore_scale"))
    nodes = [helper.make_node("MatMul", ["h", "w_kn"], ["approx"], name="head.product")]
    nodes += rescore_nodes("h", "approx", "logits", "table", "head.rescore_scale" if scale else None, 8, "head", inits)
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["L", K])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["L", N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    return model, {"h": rng.standard_normal((4, K)).astype(np.float32)}


@pytest.mark.parametrize("scale", [False, True])
def test_the_exporters_rescore_chain_becomes_one_node_with_its_logits(scale):
    model, feeds = exporter_head(scale)
    want = session(model).run(None, feeds)[0]
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert rescore_graph(rewritten) == 1
    assert [n.op_type for n in rewritten.graph.node] == ["MatMul", "TopKRescore"]
    rescore = rewritten.graph.node[1]
    assert list(rescore.input) == ["approx", "h", "table", "head.rescore_scale" if scale else ""]
    assert {a.name: helper.get_attribute_value(a) for a in rescore.attribute} == {"k": 8, "bfloat16": 0}
    assert {t.name for t in rewritten.graph.initializer} == {"table", "w_kn"} | ({"head.rescore_scale"} if scale else set())
    got = session(rewritten).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_a_chain_whose_values_something_else_reads_stays():
    model, _ = exporter_head(False)
    model.graph.output.append(helper.make_tensor_value_info("head.rescore.ids", TensorProto.INT64, None))
    before = model.SerializeToString()
    assert rescore_graph(model) == 0 and model.SerializeToString() == before
