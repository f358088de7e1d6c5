"""The step graph rewritten to attend over per-sequence contiguous caches ("slots") with ONNX Runtime's
fused GroupQueryAttention, in memory, for any export of the paged graph (float32 or quantized).

The paged graph (lepton/models/llama.py `paged_attention`) gathers every sequence's K/V rows out of the
block pools each layer and runs ~30 small ops of rotary, scatter, products and masking. Here each
layer's region between its fused qkv product and its o_proj product becomes one GroupQueryAttention
node (packed qkv, rotary inside, past and present caches [B, KVH, M, D] that the runner binds to one
buffer, so this step's K/V are written in place), or Lepton's SlotAttention (lepton/native), which
computes the same from the same inputs. Every weight product, norm and the lm_head are kept
as exported, so each quantized variant keeps its numbers.

Graph contract (what `lepton.runners.slot_runner` binds):
- input_ids [B, S] int64: S new tokens of each of B sequences (B = 1 when S > 1 and tokens are cached);
- seqlens_k [B] int32: each sequence's cached tokens after this step, minus one;
- total_sequence_length [] int32: max(seqlens_k) + 1;
- logits_indices [L] int64: rows of the flat [B * S] tokens whose logits are returned;
- past_key_{i} / past_value_{i} [B, KVH, M, D] float32 (float16 with cache_dtype float16: Lepton's
  SlotAttentionF16; uint8 [B, KVH, M, D + 4] with cache_dtype int8, rows of D codes and their float32 scale:
  SlotAttentionI8); outputs present_key_{i} / present_value_{i} (the same buffers when bound so) and
  logits [L, V];
- with pools (Lepton's SlotAttention only): pool_rows [B * S] int64, each flat token's row in the paged pools
  (block x block_size + offset; -1: none), and key_pools / value_pools [layers, P, KVH, D] float32, every
  layer's pools (one input each for all the layers: a bound input costs ONNX Runtime a few microseconds a
  run), which each layer's attention writes this step's keys and values into (inputs written in place: the
  runner binds its pools' memory).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lepton.models.llama import ModelConfig
from lepton.native import DOMAIN as LEPTON_DOMAIN
from lepton.runners.graph_edit import MS_DOMAIN, replace_nodes
from lepton.runners.slot_cache import SCALE_BYTES  # NOTE: an int8 row's float32 scale, after its D codes
KERNELS = ("onnxruntime", "lepton")  # GroupQueryAttention, SlotAttention
CACHE_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.UINT8}
CACHE_OPS = {"float32": "SlotAttention", "float16": "SlotAttentionF16", "int8": "SlotAttentionI8"}
SLOT_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length", "logits_indices")


class SlotGraphError(RuntimeError):
    """The graph is not a paged step graph this rewrite knows; serve it with attention=paged."""


def slot_graph(model: onnx.ModelProto, cfg: ModelConfig, cos_half: np.ndarray, sin_half: np.ndarray,
               kernel: str = "onnxruntime", cache_dtype: str = "float32", pools: bool = False) -> onnx.ModelProto:
    """Rewrite the paged step graph in place (see the module docstring); returns it.

    cos_half / sin_half: [max positions, head_dim / 2] float32, the rotate-half tables of the model's RoPE;
    kernel: "onnxruntime" (GroupQueryAttention) or "lepton" (SlotAttention: the session must register
    lepton.native's library); cache_dtype: "float32", or "float16" or "int8" (kernel "lepton" only); pools:
    the attention also writes each step's keys and values into the paged pools (kernel "lepton" only).
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    if cache_dtype not in CACHE_DTYPES or (cache_dtype != "float32" and kernel != "lepton"):
        raise ValueError(f"cache_dtype: {cache_dtype!r} with kernel {kernel!r} (float16 and int8 need kernel 'lepton')")
    if pools and kernel != "lepton":
        raise ValueError(f"pools: the attention writes into the pools with kernel 'lepton' only, not {kernel!r}")
    graph = model.graph
    splits = [n for n in graph.node if n.op_type == "Split" and len(n.output) == 3]
    outputs = _attention_outputs(graph)
    if len(splits) != cfg.num_layers or len(outputs) != cfg.num_layers:
        raise SlotGraphError(f"found {len(splits)} qkv splits and {len(outputs)} attention outputs for "
                             f"{cfg.num_layers} layers; not a paged step graph of this model")
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["slot.batch_len"], name="slot.shape"),
        helper.make_node("Concat", ["slot.batch_len", "slot.minus_one"], ["slot.qkv_shape"], axis=0,
                         name="slot.qkv_shape"),
        helper.make_node("Reshape", ["input_ids", "slot.minus_one"], ["slot.flat_ids"], name="slot.flat_ids"),
    ]
    inits = [
        numpy_helper.from_array(np.array([-1], np.int64), "slot.minus_one"),
        numpy_helper.from_array(np.array([-1, cfg.num_heads * cfg.head_dim], np.int64), "slot.out_shape"),
        numpy_helper.from_array(np.ascontiguousarray(cos_half, np.float32), "slot.cos_cache"),
        numpy_helper.from_array(np.ascontiguousarray(sin_half, np.float32), "slot.sin_cache"),
    ]
    renamed, fused = {"input_ids": "slot.flat_ids"}, {}
    for layer, (split, attention_out) in enumerate(zip(splits, outputs)):
        fused[split.output[0]] = _fused_layer(layer, split.input[0], cfg, kernel, cache_dtype, pools)
        renamed[attention_out] = f"slot.out_{layer}"
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        nodes.append(node)
        if node.op_type == "Split":  # NOTE: right after the qkv split, so the order stays topological
            nodes += fused.get(node.output[0], [])
    _set_io(graph, cfg, cache_dtype, pools)
    replace_nodes(model, [_copy(node) for node in _live(nodes, [o.name for o in graph.output])], inits)
    if kernel == "lepton" and not any(o.domain == LEPTON_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(LEPTON_DOMAIN, 1))
    return model


def _fused_layer(layer: int, qkv: str, cfg: ModelConfig, kernel: str, cache_dtype: str,
                 pools: bool) -> list[onnx.NodeProto]:
    """qkv [B * S, (N + 2 KVH) D] -> [B, S, ...] -> attention -> [B * S, N D] (slot.out_{layer}); Lepton's
    SlotAttention takes and gives the flat tokens itself (B from the caches), no Reshape on either side."""
    caches = [f"past_key_{layer}", f"past_value_{layer}"]
    lengths = ["seqlens_k", "total_sequence_length", "slot.cos_cache", "slot.sin_cache"]
    outputs = [f"slot.attention_{layer}", f"present_key_{layer}", f"present_value_{layer}"]
    heads = dict(num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads, scale=float(cfg.head_dim ** -0.5))
    if kernel == "lepton":
        pool_inputs, pool_layer = (["pool_rows", "key_pools", "value_pools"], {"pool_layer": layer}) if pools else ([], {})
        return [helper.make_node(CACHE_OPS[cache_dtype], [qkv, *caches, *lengths, *pool_inputs],
                                 [f"slot.out_{layer}", *outputs[1:]], **pool_layer,
                                 name=f"slot.attention_{layer}", domain=LEPTON_DOMAIN, **heads)]
    attention = helper.make_node("GroupQueryAttention", [f"slot.qkv_{layer}", "", "", *caches, *lengths], outputs,
                                 name=f"slot.gqa_{layer}", domain=MS_DOMAIN, do_rotary=1, rotary_interleaved=0, **heads)
    return [
        helper.make_node("Reshape", [qkv, "slot.qkv_shape"], [f"slot.qkv_{layer}"], name=f"slot.qkv_{layer}"),
        attention,
        helper.make_node("Reshape", [f"slot.attention_{layer}", "slot.out_shape"], [f"slot.out_{layer}"],
                         name=f"slot.out_{layer}"),
    ]


def _attention_outputs(graph: onnx.GraphProto) -> list[str]:
    """Each layer's attention output: the rows picked by token_slot from the padded [S * Q] layout
    (`out.reshape(S * Q, -1)[token_slot]`, a GatherND over Unsqueeze(token_slot) or a Gather of it)."""
    unsqueezed = {n.output[0] for n in graph.node if n.op_type == "Unsqueeze" and n.input[0] == "token_slot"}
    found = []
    for node in graph.node:
        if node.op_type == "GatherND" and node.input[1] in unsqueezed:
            found.append(node.output[0])
        elif node.op_type == "Gather" and node.input[1] == "token_slot":
            found.append(node.output[0])
    return found


def _set_io(graph: onnx.GraphProto, cfg: ModelConfig, cache_dtype: str, pools: bool) -> None:
    """The slot graph's inputs and outputs (see the module docstring)."""
    cache_type = CACHE_DTYPES[cache_dtype]
    cache = ["B", cfg.num_kv_heads, "M", cfg.head_dim + (SCALE_BYTES if cache_dtype == "int8" else 0)]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "S"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_indices", TensorProto.INT64, ["L"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["L", cfg.vocab_size])]
    if pools:
        inputs.append(helper.make_tensor_value_info("pool_rows", TensorProto.INT64, ["T"]))
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"{kv}_pools", TensorProto.FLOAT,
                                                        [cfg.num_layers, "P", cfg.num_kv_heads, cfg.head_dim]))
    for layer in range(cfg.num_layers):
        for kv in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kv}_{layer}", cache_type, cache))
            outputs.append(helper.make_tensor_value_info(f"present_{kv}_{layer}", cache_type, cache))
    graph.ClearField("input")
    graph.input.extend(inputs)
    graph.ClearField("output")
    graph.output.extend(outputs)
    graph.ClearField("value_info")


def _live(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    """The nodes the outputs depend on, in their order (the paged index and gather nodes drop out)."""
    needed, keep = set(outputs), []
    for node in reversed(nodes):
        if any(name in needed for name in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    return keep[::-1]


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy
