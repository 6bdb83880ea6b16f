"""Rewrite an exported graph's attention into onnxruntime's GroupQueryAttention: a KV cache updated in place.

A standard export (`kv_cache="concat"`) computes `present = Concat(past, new)`: every decode step copies
the whole cache of every layer into a new buffer (at batch 8 on the 124M shape that is 12% of a CPU
decode step) and reshapes Q/K/V into heads through Split / Reshape / Transpose nodes. `kv_cache="shared"`
replaces each layer's Split ... Concat ... attention ... Reshape with one `com.microsoft`
GroupQueryAttention node reading the packed (B, T, 3C) QKV projection. Bound to the same buffer as
`past_key_values.{i}.*` and `present.{i}.*`, its cache is written in place: (B, n_head, capacity,
head_dim), each row's tokens left-aligned at slots [0, length). The I/O names stay the ecosystem's
(onnxruntime-genai's GPT-2 models use the same operator and names); the graph derives GQA's per-row
`seqlens_k = sum(attention_mask) - 1` and `total_sequence_length = attention_mask.shape[1]` itself.

What the runtime must do differently (runtime/backends/onnxruntime.py does it): rows are left-aligned, so
a left-padded prefill runs row by row; a decode step needs every row's newest mask column to be 1. The
graph runs on onnxruntime only (CPU: fp32 / fp16; CUDA: fp16), never on TensorRT.

    proto = share_kv_cache(onnx.load("out/x/model.onnx"), config)
    share_kv_cache_file(Path("out/x/model.onnx"), config)   # the same, rewriting the file (and its data)
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from runtime.artifact import ArtifactError

from .graph import save_model, toposort

MS_DOMAIN = "com.microsoft"
SEQLENS, TOTAL = "gqa.seqlens_k", "gqa.total_sequence_length"


class GraphPatternError(ArtifactError):
    """The graph's attention is not laid out the way this rewrite expects."""


def share_kv_cache(proto, config):
    """Replace every layer's attention with GroupQueryAttention (packed QKV, in-place KV); returns the proto.

    Anchored on the I/O names, not on node names: layer i's `present.{i}.key|value` must come from a
    Concat of `past_key_values.{i}.*` with heads split from one (B, T, 3C) tensor, and the attention
    output (B, nh, T, hs) must go through Transpose(0, 2, 1, 3) + Reshape to (B, T, C). Works on both
    opset 18 (SDPA decomposed into MatMul / Softmax) and opset >= 23 (one Attention node).
    """
    from onnx import TensorProto, helper

    g = proto.graph
    if any(n.op_type == "GroupQueryAttention" for n in g.node):
        raise GraphPatternError("graph already uses GroupQueryAttention (kv_cache is already shared)")
    producer = {o: n for n in g.node for o in n.output}
    consumers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)

    def need(node, op, what):
        if node is None or node.op_type != op:
            got = "nothing" if node is None else f"{node.op_type} {node.name!r}"
            raise GraphPatternError(f"layer attention pattern not found: expected {op} for {what}, found {got}; "
                                    f"export with kv_cache='concat' (the default) instead")
        return node

    def perm(node):
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)

    def split_of(heads: str, layer: int, what: str):
        """heads (B, nh, T, hs) = Transpose(Reshape(Split(qkv)[k])) -> (split node, k)."""
        tr = need(producer.get(heads), "Transpose", f"layer {layer} {what} heads")
        if perm(tr) != [0, 2, 1, 3]:
            raise GraphPatternError(f"layer {layer}: {what} heads transposed by {perm(tr)}, expected [0, 2, 1, 3]")
        rs = need(producer.get(tr.input[0]), "Reshape", f"layer {layer} {what} head view")
        sp = need(producer.get(rs.input[0]), "Split", f"layer {layer} packed QKV split")
        return sp, list(sp.output).index(rs.input[0])

    remove, new_nodes = [], []
    for i in range(config.n_layer):
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        pres_k, pres_v = f"present.{i}.key", f"present.{i}.value"
        cat_k = need(producer.get(pres_k), "Concat", pres_k)
        cat_v = need(producer.get(pres_v), "Concat", pres_v)
        if list(cat_k.input[:1]) != [past_k] or list(cat_v.input[:1]) != [past_v] or len(cat_k.input) != 2:
            raise GraphPatternError(f"layer {i}: {pres_k} is not Concat({past_k}, new keys)")
        sp_k, ik = split_of(cat_k.input[1], i, "key")
        sp_v, iv = split_of(cat_v.input[1], i, "value")
        if sp_k is not sp_v or (ik, iv) != (1, 2) or len(sp_k.output) != 3:
            raise GraphPatternError(f"layer {i}: keys and values do not come from one 3-way split of c_attn's output")
        # the attention core reads present.{i}.value (Attention input 2, or the probs @ V MatMul's input 1)
        core = consumers[pres_v]
        if len(core) != 1 or core[0].op_type not in ("Attention", "MatMul"):
            raise GraphPatternError(f"layer {i}: {pres_v} feeds {[n.op_type for n in core]}, expected one Attention / MatMul")
        after = consumers[core[0].output[0]]
        tr = need(after[0] if len(after) == 1 else None, "Transpose", f"layer {i} attention output")
        if perm(tr) != [0, 2, 1, 3]:
            raise GraphPatternError(f"layer {i}: attention output transposed by {perm(tr)}, expected [0, 2, 1, 3]")
        after = consumers[tr.output[0]]
        rs = need(after[0] if len(after) == 1 else None, "Reshape", f"layer {i} attention output merge")
        remove += [cat_k, cat_v, rs]  # GroupQueryAttention produces their outputs; the rest is pruned
        new_nodes.append(helper.make_node(
            "GroupQueryAttention", [sp_k.input[0], "", "", past_k, past_v, SEQLENS, TOTAL], [rs.output[0], pres_k, pres_v],
            name=f"gqa_{i}", domain=MS_DOMAIN, num_heads=config.n_head, kv_num_heads=config.n_head,
            scale=1.0 / math.sqrt(config.head_dim)))

    # seqlens_k (B,) int32 = tokens per row (past + new) - 1; total_sequence_length: scalar int32 = mask width
    lengths = [
        helper.make_node("ReduceSum", ["attention_mask", "gqa.axes1"], ["gqa.mask_sum"], keepdims=0, name="gqa_mask_sum"),
        helper.make_node("Sub", ["gqa.mask_sum", "gqa.one"], ["gqa.seqlens_i64"], name="gqa_seqlens_sub"),
        helper.make_node("Cast", ["gqa.seqlens_i64"], [SEQLENS], to=TensorProto.INT32, name="gqa_seqlens_cast"),
        helper.make_node("Shape", ["attention_mask"], ["gqa.mask_width"], start=1, end=2, name="gqa_mask_width"),
        helper.make_node("Squeeze", ["gqa.mask_width", "gqa.axes0"], ["gqa.total_i64"], name="gqa_total_squeeze"),
        helper.make_node("Cast", ["gqa.total_i64"], [TOTAL], to=TensorProto.INT32, name="gqa_total_cast"),
    ]
    g.initializer.extend([helper.make_tensor("gqa.axes1", TensorProto.INT64, [1], [1]),
                          helper.make_tensor("gqa.axes0", TensorProto.INT64, [1], [0]),
                          helper.make_tensor("gqa.one", TensorProto.INT64, [], [1])])
    ids = {id(n) for n in remove}
    kept = [n for n in g.node if id(n) not in ids]
    del g.node[:]
    g.node.extend(lengths + kept + new_nodes)
    prune(proto)
    for v in g.output:  # shared: the buffer's capacity; concat-style call: past + new
        if v.name.startswith("present."):
            v.type.tensor_type.shape.dim[2].dim_param = "present_sequence"
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.add(domain=MS_DOMAIN, version=1)
    return toposort(proto)


def share_kv_cache_file(path: Path, config) -> None:
    """share_kv_cache on the graph saved at `path`, written back there (external data included)."""
    import onnx

    save_model(share_kv_cache(onnx.load(str(path)), config), path)


def prune(proto) -> None:
    """Drop nodes whose outputs nobody reads (repeatedly), then unread initializers and stale value_info."""
    g = proto.graph
    wanted = {o.name for o in g.output}
    while True:
        read = wanted | {i for n in g.node for i in n.input}
        dead = [n for n in g.node if not any(o in read for o in n.output)]
        if not dead:
            break
        ids = {id(n) for n in dead}
        kept = [n for n in g.node if id(n) not in ids]
        del g.node[:]
        g.node.extend(kept)
    read = {i for n in g.node for i in n.input}
    kept_init = [t for t in g.initializer if t.name in read]
    del g.initializer[:]
    g.initializer.extend(kept_init)
    made = {o for n in g.node for o in n.output}
    kept_info = [v for v in g.value_info if v.name in made]
    del g.value_info[:]
    g.value_info.extend(kept_info)
