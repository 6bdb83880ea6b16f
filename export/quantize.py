"""Precision variants of an exported fp32 graph: fp16 (GPU), q8, int8 and int4 (CPU), each validated against fp32.

Every variant is built from the validated fp32 `model.onnx` and judged the same way: on a batch of
token sequences, the variant's top-1 token must agree with fp32's and its perplexity must stay close
(`THRESHOLDS`). max|Δ| alone says little for quantized weights; agreement and perplexity say whether
the text would change.

- fp16: onnxruntime's float16 converter; LayerNormalization and Softmax (and, at opset >= 23, the fused
  Attention holding the softmax) stay fp32 behind explicit Casts
  (plain ONNX ops, so the graph still feeds TensorRT strongly-typed builds); every float I/O, the KV
  cache and the logits included, is fp16; the tied embedding stays stored once (fp16). Node and value
  names are made unique after the converter (`unique_names`: some versions define one Cast several times).
- q8, the near-lossless CPU variant: block-wise 8-bit `MatMulNBits` (onnxruntime's contrib op, symmetric, int8
  compute) for the layers' MatMuls (block 32) and for the untied lm_head (block 16). The lookups keep reading the
  exported fp32 table. On the demo model (16,384 held-out tokens): top-1 99.63% against 99.66% with an fp32
  lm_head, for 1.45x the decode speed on GPT-2 124M; an lm_head at block 32 gave 99.55%, and 8-bit lookups beside
  it 99.49-99.58%. Its file holds the vocabulary twice (fp32 table, 8-bit head): smaller than fp32 on GPT-2
  124M (0.6x), larger on a model whose vocabulary is most of its weights (the demo model: 1.2x).
- int8: `quantize_dynamic` restricted to MatMul with constant weights (int8 weights, activations
  quantized per call). The tied lm_head is first given its own transposed initializer, so it is a plain
  MatMul weight and gets quantized too: about 2x faster decode. onnxruntime fuses the result into
  DynamicQuantizeMatMul, which runs faster here than 8-bit MatMulNBits (per-tensor int8 against q8's blocks).
- int4: block-wise `MatMulNBits` (block 256, symmetric, int8 compute) for the layers, as onnxruntime-genai
  builds for CPU. A plain 4-bit lm_head cost the demo model 3 points of top-1.
- int4 splits a tied lm_head (`split_lm_head`): a 4-bit pass over every row, then its top HEAD_TOP_K logits
  redone from the 8-bit lookup table: ~10% faster decode than the 8-bit head at the same top-1. An untied head
  stays one 8-bit MatMulNBits (`NBITS`).
- int8 and int4 read their embedding tables (wte, wpe) through 8-bit block-wise `GatherBlockQuantized`
  lookups (`quantize_lookups`): with an fp32 embedding beside the quantized lm_head a small model's file
  came out larger than fp32 (the demo model's embedding is 6.4M of its 7.3M weights), and a per-tensor
  int8 table cost about a point of top-1. These variants run on onnxruntime only.
  Measurements: docs/benchmarks.md ("CPU variants").

    from export.quantize import quantize_onnx
    quantize_onnx("out/tiny", "out/tiny-int8", "int8")     # from an fp32 export folder
    # or in one go: nanogpt-deploy export SOURCE --out DIR --quantize int8
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from runtime.artifact import data_digests, read_onnx_artifact, resolve_onnx

from .check import new_session
from .graph import ExportError, check_external_data, save_model, toposort, write_metadata
from .publish import clear_temp_dirs, prepare_out_dir, publish

VARIANTS = ("fp16", "q8", "int8", "int4")
# precision -> (min top-1 agreement with fp32, max relative perplexity increase). The export gate catches a broken
# variant on a few hundred tokens; it certifies no finer than that. q8 disagrees with fp32 on ~0.35% of tokens (the
# demo model, 16,384 held-out tokens): a 99.5% gate on 256 tokens would fail ~1 export in 4 by chance (2 flips), so
# it gates at fp16's 99%; `nanogpt-deploy verify` (2,048+ tokens) holds it to 99.5%.
THRESHOLDS = {"fp16": (0.99, 0.01), "q8": (0.99, 0.01), "int8": (0.95, 0.05), "int4": (0.90, 0.10)}
# MatMulNBits variants: precision -> ((bits, block size) of the layers' MatMuls, of the lm_head); bits None: fp32.
# int4 (GPT-2 124M decode, 2 threads, and the demo model's top-1 in `nanogpt-deploy verify`, docs/benchmarks.md):
# the 8-bit lm_head lifts top-1 from 94.2% to 97.5% for 12% more time per token; layer blocks of 256 instead of
# 128 take back 8% of it (97.1%). onnxruntime-genai's CPU default, block 32 everywhere, gives 94.8% and is slower.
# q8: an lm_head at block 16 holds top-1 at fp32-head level (99.63% vs 99.66%; block 32: 99.55%) at 1.45x its speed.
# int4's lm_head entry holds for an untied head only; a tied one is split (COARSE_HEAD, split_lm_head).
NBITS = {"q8": ((8, 32), (8, 16)), "int4": ((4, 256), (8, 128))}
LOOKUP_BLOCK_SIZE = 32  # the embedding lookups' 8-bit blocks (quantize_lookups)
INT8_OPS = ("MatMul",)  # the lookups are 8-bit already
FUSED_OPS = ["FastGelu", "SkipLayerNormalization"]  # fuse_cpu_ops, before quantizing
# int4 with a tied lm_head (split_lm_head): (bits, block size) of its pass over every row, and how many of the best
# rows are redone from the 8-bit lookup table. GPT-2 124M decode (2 threads, interleaved A/B against the 8-bit
# block-128 head): 1.09-1.11x; the demo model (`verify`, 16,384 held-out tokens) top-1 97.36% -> 97.41%, Δppl -0.20%
# -> +0.04%, max|Δlogits| 0.47 -> 1.67 (the tail is 4-bit). A 4-bit block-128 pass costs what block 256 does and
# keeps the tail closer; top-k 16 / 32 / 64 run alike. int8 split the same way: top-1 98.57% -> 99.33% but only
# 1.01-1.05x (its per-tensor DynamicQuantizeMatMul head is already fast), so int8 keeps one head.
COARSE_HEAD = (4, 128)
HEAD_TOP_K = 32
DECODE_STEPS = 8  # the last positions of the evaluation run one token at a time, through the KV cache


def make_variant(src: Path, dst: Path, precision: str, fuse: bool | None = None) -> dict:
    """Write the `precision` variant of the fp32 graph `src` to `dst` (+ dst.data); returns what was done.

    fuse (fp16): FastGelu / SkipLayerNormalization fusions before the conversion, with nothing kept fp32;
    default: for a kv_cache="shared" graph (onnxruntime only), never for a concat graph (TensorRT reads it).
    """
    if precision == "fp16":
        if not (_is_shared(src) if fuse is None else fuse):
            return _to_fp16(src, dst)
        # a shared-cache graph runs on onnxruntime only: its fused kernels (which accumulate in fp32) may replace
        # the plain LayerNorm / GELU nodes and their fp32 Casts, ~40% fewer kernel launches per decode step
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".fused-") as tmp:
            fused = Path(tmp) / "model.onnx"
            save_model(fuse_cpu_ops(_load(src), read_onnx_artifact(src).config), fused)
            return dict(_to_fp16(fused, dst, blocked=[]), fused=FUSED_OPS)
    if precision in ("q8", "int8", "int4"):
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".untied-") as tmp:
            untied = Path(tmp) / "model.onnx"
            art = read_onnx_artifact(src)
            if precision == "q8":  # the lookups read the fp32 table as exported; the lm_head is its 8-bit copy
                save_model(fuse_cpu_ops(untie_lm_head(_load(src)), art.config), untied)
                return dict(_quantize_nbits(untied, dst, precision, art.config.n_embd), fused=FUSED_OPS,
                            embeddings="fp32")
            proto = quantize_lookups(fuse_cpu_ops(untie_lm_head(_load(src)), art.config))
            proto, split = split_lm_head(proto, HEAD_TOP_K) if precision == "int4" else (proto, False)
            save_model(proto, untied)
            head = (COARSE_HEAD[0], _fit(COARSE_HEAD[1], art.config.n_embd)) if split else None
            how = (_quantize_int8(untied, dst) if precision == "int8"
                   else _quantize_nbits(untied, dst, precision, art.config.n_embd, head))
            if split:
                how["lm_head"] = (f"untied, {head[0]}-bit block {head[1]}, its top {HEAD_TOP_K} redone from the "
                                  f"8-bit lookup table")
            return dict(how, fused=FUSED_OPS, embeddings=f"8-bit GatherBlockQuantized, block {LOOKUP_BLOCK_SIZE}")
    raise ExportError(f"unknown precision variant {precision!r}; choose one of {VARIANTS}")


def _is_shared(path: Path) -> bool:
    """Whether the graph runs GroupQueryAttention (a kv_cache="shared" export, onnxruntime only)."""
    import onnx

    return any(n.op_type == "GroupQueryAttention" for n in onnx.load(str(path), load_external_data=False).graph.node)


def _load(path: Path):
    import onnx

    return onnx.load(str(path))  # with external data


def _to_fp16(src: Path, dst: Path, blocked=("LayerNormalization", "Softmax", "Attention")) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    blocked = list(blocked)  # Attention: opset >= 23 hides its softmax inside
    # a path (not a proto) makes the converter use infer_shapes_path, which works past 2 GB
    proto = convert_float_to_float16(str(src), keep_io_types=False, op_block_list=blocked)
    proto = unique_names(proto)  # some converter versions define one Cast several times
    save_model(toposort(proto), dst)  # the converter appends its Casts out of order; TensorRT's parser needs order
    return {"method": "onnxruntime.transformers.float16", "fp32_ops": blocked, "io": "fp16"}


def unique_names(proto):
    """Make the main graph's node names and value definitions unique; returns the proto, changed in place.

    onnxruntime 1.31's float16 converter puts a Cast before each blocked (fp32) node reading an fp16
    initializer, named after the initializer (`X_cast_to_fp32`, node `X_cast_to_fp32_node`), one per
    consumer. The exporter stores equal initializers once (every LayerNorm bias of a random model, and the
    zero Linear biases), so the same Cast is added several times, which onnxruntime refuses ("two nodes
    with same node name", "Duplicate definition of name"); 1.32 shares one Cast. Repeats of the same
    computation under the same output are dropped (their consumers read the first), other duplicate node
    names get a suffix, repeated value_info entries (and those of initializers) are dropped. Two different
    nodes defining one value cannot be repaired: that raises.
    """
    g = proto.graph
    defined = {v.name for v in g.input} | {t.name for t in g.initializer}
    producer: dict[str, object] = {}
    kept = []
    for n in g.node:
        outs = [o for o in n.output if o]
        clash = [o for o in outs if o in producer or o in defined]
        if not clash:
            producer.update(dict.fromkeys(outs, n))
            kept.append(n)
        elif all(producer.get(o) is producer.get(outs[0]) for o in outs) and _same_computation(producer.get(outs[0]), n):
            continue  # the same node again
        else:
            first = producer.get(clash[0])
            raise ExportError(f"fp16 conversion defines {clash[0]!r} twice, by different computations "
                              f"({first.op_type + ' ' + first.name if first is not None else 'a graph input or initializer'} "
                              f"and {n.op_type} {n.name}); convert with --dtype fp32 and report the onnx / onnxruntime versions")
    names = {n.name for n in kept}
    used: set[str] = set()
    for n in kept:
        if n.name and n.name in used:
            k = 1
            while f"{n.name}_{k}" in used or f"{n.name}_{k}" in names:
                k += 1
            n.name = f"{n.name}_{k}"
        used.add(n.name)
    if len(kept) != len(g.node):
        copies = [type(n)() for n in kept]
        for c, n in zip(copies, kept):
            c.CopyFrom(n)
        del g.node[:]
        g.node.extend(copies)
    # value_info naming an initializer goes too: the converter retypes it fp16 even where it keeps the
    # initializer fp32 (one only blocked nodes read), which onnx's full check refuses; the tensor has its type
    seen, infos = {t.name for t in g.initializer}, []
    for v in g.value_info:
        if v.name not in seen:
            seen.add(v.name)
            infos.append(type(v)())
            infos[-1].CopyFrom(v)
    if len(infos) != len(g.value_info):
        del g.value_info[:]
        g.value_info.extend(infos)
    return proto


def _same_computation(a, b) -> bool:
    if a is None:
        return False
    a2, b2 = type(a)(), type(b)()
    a2.CopyFrom(a)
    b2.CopyFrom(b)
    a2.name = b2.name = ""
    return a2.SerializeToString(deterministic=True) == b2.SerializeToString(deterministic=True)


def untie_lm_head(proto):
    """Give the lm_head MatMul its own (C, vocab) initializer instead of Transpose(tied wte).

    Quantizers only quantize MatMuls whose weight is an initializer; behind the Transpose the largest
    matrix of the model would stay fp32. Returns the proto, changed in place.
    """
    from onnx import numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    logits_mm = [n for n in g.node if n.op_type == "MatMul" and "logits" in n.output]
    if not logits_mm:
        raise ExportError("no MatMul produces 'logits'; the graph is not one export_onnx wrote")
    mm = logits_mm[0]
    tr = producers.get(mm.input[1])
    if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
        return proto  # already a plain weight (untied checkpoint or done before)
    w = numpy_helper.to_array(inits[tr.input[0]], base_dir="")  # (vocab, C)
    name = "lm_head.weight.T"
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))  # (C, vocab)
    mm.input[1] = name
    if consumers[tr.output[0]] == 1:
        g.node.remove(tr)
    return proto


def fuse_cpu_ops(proto, config):
    """FastGelu for GPT-2's 8-node tanh GELU and SkipLayerNormalization for residual Add + LayerNorm.

    onnxruntime contrib ops (the CPU variants run on onnxruntime only anyway): with small weights, a decode
    step's time goes as much to the graph's hundreds of tiny nodes as to the MatMuls (opset 18: 577 nodes,
    these fusions remove ~120). Attention fusion is left off: its patterns do not match the dynamo exporter's.
    Returns the fused proto.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    opts = FusionOptions("gpt2")
    opts.enable_attention = opts.enable_embed_layer_norm = opts.enable_rotary_embeddings = False
    opts.enable_shape_inference = False  # onnx's shape inference stops at 2 GB; not needed by these fusions
    with _quiet_onnxruntime_tools():
        model = optimize_model(proto, model_type="gpt2", num_heads=config.n_head, hidden_size=config.n_embd,
                               optimization_options=opts, opt_level=0, use_gpu=False)
    proto = model.model
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):  # the fused ops' domain
        proto.opset_import.add(domain="com.microsoft", version=1)
    return toposort(proto)


def quantize_lookups(proto, block_size: int = 32):
    """The embedding lookups (Gathers of a float (rows, C) initializer: wte, wpe) as 8-bit GatherBlockQuantized.

    Symmetric blocks of `block_size` along C, one fp32 scale per block, stored uint8 around onnxruntime's
    default zero point 128. The lookup dequantizes only the rows it gathers. quantize_dynamic's int8 Gather
    (one scale for the whole table) cost the demo model ~1 point of top-1 agreement (an all-8-bit variant:
    98.5% against 99.5% with the table fp32).
    Returns the proto, changed in place.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    for k, n in enumerate(g.node):
        t = inits.get(n.input[0]) if n.op_type == "Gather" else None
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2 or t.dims[1] % block_size:
            continue
        if any(a.name == "axis" and a.i != 0 for a in n.attribute) or uses[t.name] != 1:
            continue
        w = numpy_helper.to_array(t, base_dir="")  # (rows, C)
        blocks = w.reshape(w.shape[0], -1, block_size)  # (rows, C / block, block)
        scale = np.abs(blocks).max(-1) / 127
        scale[scale == 0] = 1
        q = np.clip(np.rint(blocks / scale[..., None]), -127, 127).astype(np.int16) + 128
        g.initializer.remove(t)
        g.initializer.extend([numpy_helper.from_array(q.astype(np.uint8).reshape(w.shape), t.name + "_Q8"),
                              numpy_helper.from_array(scale.astype(np.float32), t.name + "_scales")])
        g.node[k].CopyFrom(helper.make_node("GatherBlockQuantized", [t.name + "_Q8", n.input[1], t.name + "_scales"],
                                            list(n.output), name=n.name + "_Q8", domain="com.microsoft",
                                            gather_axis=0, quantize_axis=1, block_size=block_size, bits=8))
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.add(domain="com.microsoft", version=1)
    return proto


COARSE, SPLIT_HEAD = "logits_coarse", "lm_head_full"  # split_lm_head: the full pass's output and node name


def split_lm_head(proto, k: int):
    """The lm_head as a cheap pass over every row plus a redo of its k best rows; returns (proto, whether split).

    logits = x @ W runs as before (quantized later at COARSE_HEAD: 4 bits), then the k largest of those logits are
    recomputed from the 8-bit lookup table's rows (the tied wte as GatherBlockQuantized, block LOOKUP_BLOCK_SIZE,
    dequantizing only the k rows it gathers) and scattered back. The top of the distribution, which greedy and
    top-k sampling read and which dominates the softmax, gets 8-bit blocks of 32; the tail keeps the full pass's
    4 bits. Per decode step on GPT-2 124M that reads 19 MB of lm_head instead of the 8-bit head's 39 MB. Needs the
    tied table as a lookup (untie_lm_head, then quantize_lookups); an untied checkpoint's head is left alone (proto
    unchanged, False). The proto is changed in place.
    """
    from onnx import helper, numpy_helper

    g = proto.graph
    head = next((n for n in g.node if n.op_type == "MatMul" and "logits" in n.output), None)
    look = next((n for n in g.node if n.op_type == "GatherBlockQuantized" and n.input[1] == "input_ids"), None)
    if head is None or look is None or head.input[1] != "lm_head.weight.T" or not _tied(proto, head, look):
        return proto, False
    head.output[0], head.name = COARSE, SPLIT_HEAD
    x = head.input[0]
    vocab = next(t.dims[1] for t in g.initializer if t.name == head.input[1])
    g.initializer.extend([numpy_helper.from_array(np.array([min(k, vocab)], np.int64), "lm_head.top_k"),
                          numpy_helper.from_array(np.array([-1], np.int64), "lm_head.last_axis")])
    g.node.extend([
        helper.make_node("TopK", [COARSE, "lm_head.top_k"], ["lm_head.top_values", "lm_head.top_ids"],
                         name="lm_head_top", axis=-1, largest=1, sorted=0),  # (B, T, k)
        helper.make_node("GatherBlockQuantized", [look.input[0], "lm_head.top_ids", look.input[2]],
                         ["lm_head.top_rows"],
                         name="lm_head_top_rows", domain="com.microsoft",
                         **{a.name: helper.get_attribute_value(a) for a in look.attribute}),  # (B, T, k, C)
        helper.make_node("Unsqueeze", [x, "lm_head.last_axis"], ["lm_head.x_col"],
                         name="lm_head_x_col"),  # (B, T, C, 1)
        helper.make_node("MatMul", ["lm_head.top_rows", "lm_head.x_col"], ["lm_head.top_col"], name="lm_head_redo"),
        helper.make_node("Squeeze", ["lm_head.top_col", "lm_head.last_axis"], ["lm_head.top_exact"],
                         name="lm_head_top_exact"),  # (B, T, k)
        helper.make_node("ScatterElements", [COARSE, "lm_head.top_ids", "lm_head.top_exact"], ["logits"],
                         name="lm_head_scatter", axis=-1),
    ])
    return toposort(proto), True


def _tied(proto, head, look) -> bool:
    """Whether the lookup table holds the lm_head's rows (the tied wte): compared on a few rows, dequantized."""
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    w = numpy_helper.to_array(inits[head.input[1]], base_dir="")  # (C, V)
    q = numpy_helper.to_array(inits[look.input[0]], base_dir="")  # (V, C) uint8 around 128
    s = numpy_helper.to_array(inits[look.input[2]], base_dir="")  # (V, C / block)
    if q.shape != w.T.shape:
        return False
    rows = np.linspace(0, q.shape[0] - 1, 16).astype(int)
    deq = (q[rows].astype(np.float32) - 128) * np.repeat(s[rows], q.shape[1] // s.shape[1], axis=1)
    return bool(np.abs(deq - w.T[rows]).max() <= s[rows].max() * 0.51)


@contextlib.contextmanager
def _quiet_onnxruntime_tools():
    """onnxruntime's quantizers and fusers log each node at INFO and advise pre-processing at WARNING, through
    loggers named after their own modules (they put their folder on sys.path): noise for users. Errors pass."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _quantize_int8(src: Path, dst: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # MatMul only: opset >= 23 Attention is left alone
    with _quiet_onnxruntime_tools():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=list(INT8_OPS), weight_type=QuantType.QInt8,
                         per_channel=False, use_external_data_format=True, extra_options={"MatMulConstBOnly": True})
    save_model(toposort(_load(dst)), dst)  # rewrite so the external data follows our naming and threshold
    return {"method": "onnxruntime.quantization.quantize_dynamic", "op_types": list(INT8_OPS), "weight_type": "int8",
            "activations": "uint8, dynamic per tensor", "lm_head": "untied, quantized"}


def _name_lm_head(proto) -> str:
    lm_head = next(n for n in proto.graph.node if n.op_type == "MatMul" and ({"logits", COARSE} & set(n.output)))
    lm_head.name = lm_head.name or "lm_head"  # the quantizers select nodes by name
    return lm_head.name


def _fit(block: int, n_embd: int) -> int:
    """A block is at most the largest power of two <= n_embd (every MatMul's K is n_embd or 4 * n_embd): the
    kernel pads K up to whole blocks, so a 256 block over K=128 stores as many bytes as 8 bits would."""
    return min(block, max(16, 1 << (n_embd.bit_length() - 1)))  # 16: MatMulNBits' smallest block


def _nbits(proto, bits: int, block: int, include, exclude):
    """MatMulNBitsQuantizer (symmetric, int8 compute) on the MatMuls named in include (None: all) but not exclude."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(proto, bits=bits, block_size=block, is_symmetric=True, accuracy_level=4,
                             op_types_to_quantize=("MatMul",), nodes_to_include=include, nodes_to_exclude=exclude)
    with _quiet_onnxruntime_tools():
        q.process()
    return q.model.model


def _quantize_nbits(src: Path, dst: Path, precision: str, n_embd: int, coarse_head=None) -> dict:
    """MatMulNBits for the layers' MatMuls, then for the lm_head, each at its NBITS (bits, block size); a split
    lm_head's full pass (split_lm_head) at coarse_head's instead.

    """
    layers, head = [(bits, _fit(block, n_embd)) if bits else (None, None)
                    for bits, block in (NBITS[precision][0], coarse_head or NBITS[precision][1])]
    proto = _load(src)
    name = _name_lm_head(proto)
    for (bits, block), include, exclude in ((layers, None, [name]), (head, [name], [])):
        if bits is None:
            continue
        proto = _nbits(proto, bits, block, include, exclude)
    save_model(toposort(proto), dst)
    return {"method": "onnxruntime.quantization.MatMulNBitsQuantizer", "bits": layers[0], "block_size": layers[1],
            "symmetric": True, "accuracy_level": 4,
            "lm_head": f"untied, {head[0]}-bit, block {head[1]}" if head[0] else "fp32"}


# ---------------------------------------------------------------------------------- validation

def evaluate_variant(ref: Path, variant: Path, eval_ids: np.ndarray, real_vocab: int, kv_dtype: str) -> dict:
    """Top-1 agreement and perplexity of `variant` against the fp32 graph `ref` on eval_ids (B, T).

    The reference runs the whole sequence at once; the variant runs a prefill and then DECODE_STEPS single
    tokens through its KV cache, so the decode path is judged too. A logits="last" graph (and so its
    variants) gives one position per call: both then run every position as its own decode step.
    """
    ref_logits = _logits(new_session(ref), eval_ids, np.float32, decode_steps=0)
    var_logits = _logits(new_session(variant), eval_ids, np.dtype(kv_dtype), decode_steps=DECODE_STEPS)
    # NaN/inf is a broken graph, not a precision trade-off: refused even ungated (argmax of a NaN row is
    # token 0, and NaN fails no comparison, so the numbers alone would not say so)
    for path, x in ((ref, ref_logits), (variant, var_logits)):
        if not np.isfinite(x).all():
            nan, inf = int(np.isnan(x).sum()), int(np.isinf(x).sum())
            raise ExportError(f"{path} gives non-finite logits on the {eval_ids.shape[0]}x{eval_ids.shape[1]} evaluation "
                              f"tokens: {nan + inf} of {x.size} values ({nan} NaN, {inf} inf); "
                              + ("fp16 overflows past 65504: keep the fp32 export" if kv_dtype == "float16" and path == variant
                                 else "check the weights it was exported from"))
    ref_logits, var_logits = ref_logits[..., :real_vocab], var_logits[..., :real_vocab]
    agree = float(np.mean(ref_logits.argmax(-1) == var_logits.argmax(-1)))
    ppl_ref, ppl = _perplexity(ref_logits, eval_ids), _perplexity(var_logits, eval_ids)
    return {"top1_agreement": round(agree, 5), "ppl_fp32": round(ppl_ref, 4), "ppl": round(ppl, 4),
            "ppl_change": round(ppl / ppl_ref - 1, 5), "max_abs_logit_diff": float(np.abs(ref_logits - var_logits).max()),
            "eval_tokens": int(eval_ids.size)}


def check_variant(metrics: dict, precision: str) -> None:
    min_agree, max_ppl = THRESHOLDS[precision]
    bad = []
    if not metrics["top1_agreement"] >= min_agree:  # `not >=` / `not <=`: a NaN fails too
        bad.append(f"top-1 agreement with fp32 {metrics['top1_agreement']:.2%} < {min_agree * 100:g}%")
    if not metrics["ppl_change"] <= max_ppl:
        bad.append(f"perplexity {metrics['ppl']:.3f} vs fp32 {metrics['ppl_fp32']:.3f} "
                   f"(+{metrics['ppl_change']:.2%}) > +{max_ppl:.0%}")
    if bad:
        raise ExportError(f"{precision} variant failed validation on {metrics['eval_tokens']} tokens: "
                          + "; ".join(bad) + f"; keep the fp32{' or fp16' if precision != 'fp16' else ''} export")


def _logits(session, ids: np.ndarray, kv_dtype, decode_steps: int) -> np.ndarray:
    """(B, T, V) logits of every position: a prefill of T - decode_steps tokens, then one token per call.

    A graph whose logits hold the last position only ([batch, 1, vocab]) is decoded one token at a time
    from the first position, so every position's logits are still produced.
    """
    B, T = ids.shape
    if session.get_outputs()[0].shape[1] != session.get_inputs()[0].shape[1]:  # logits="last" / "last:N": a
        # chunk's call returns its last position(s) only
        decode_steps = T - 1
    kv_names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    shape = next(i.shape for i in session.get_inputs() if i.name.startswith("past_key_values."))
    past = {n: np.zeros((B, shape[1], 0, shape[3]), dtype=kv_dtype) for n in kv_names}
    out, start = [], 0
    for end in [T - decode_steps] + list(range(T - decode_steps + 1, T + 1)):
        if end <= start:
            continue
        feeds = {"input_ids": ids[:, start:end], "attention_mask": np.ones((B, end), np.int64),
                 "position_ids": np.tile(np.arange(start, end, dtype=np.int64), (B, 1)), **past}
        res = session.run(None, feeds)
        out.append(res[0].astype(np.float32))
        past = {n: r for n, r in zip(kv_names, res[1:])}  # present.* follow past_key_values.* order
        start = end
    return np.concatenate(out, axis=1)


def _perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    x = logits[:, :-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()
    return float(np.exp(nll))


# ---------------------------------------------------------------------------------- public entry point

def quantize_onnx(src_dir: str | os.PathLike, out_dir: str | os.PathLike, precision: str, *,
                  eval_ids: np.ndarray | None = None, gate: bool = True, force: bool = False,
                  tool_files: bool = True, progress=lambda msg: None) -> Path:
    """Build the `precision` variant of an fp32 export folder into `out_dir`, validated against it.

    Args:
        src_dir: a folder (or model.onnx) written by export_onnx in fp32.
        out_dir: receives model.onnx (+ model.onnx.data) with `precision` in its metadata; atomic.
        precision: "fp16", "q8", "int8" or "int4" (VARIANTS).
        eval_ids: (B, T) int64 tokens to judge the variant on; default random tokens (use real text or
            model samples for meaningful numbers: random tokens on a trained model are off-distribution).
        gate: raise ExportError when the variant misses THRESHOLDS (False: only record the numbers).
        force: write into an out_dir that holds files other than a previous export.
        tool_files: also write other tools' files (export/ecosystem.py), as export_onnx does.
    Returns:
        the path of the variant's model.onnx.
    """
    src = resolve_onnx(src_dir)
    art = read_onnx_artifact(src)
    if art.precision != "fp32":
        raise ExportError(f"{src} is {art.precision}; variants are built from an fp32 export "
                          f"(nanogpt-deploy export SOURCE --out DIR)")
    out_dir = prepare_out_dir(out_dir, force)
    if eval_ids is None:
        rng = np.random.default_rng(0)
        eval_ids = rng.integers(0, art.config.real_vocab_size, (4, min(64, art.config.block_size)), dtype=np.int64)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        dst = Path(tmp) / "model.onnx"
        artifact = build_and_check_variant(src, dst, precision, art, eval_ids, gate, progress)
        write_metadata(dst, dataclasses.replace(artifact, data_sha256=data_digests(dst)))
        if tool_files:
            from .ecosystem import write_tool_files

            write_tool_files(Path(tmp), artifact, progress=progress)
        publish(Path(tmp), out_dir)
    clear_temp_dirs(out_dir)
    return out_dir / "model.onnx"


def build_and_check_variant(src: Path, dst: Path, precision: str, art, eval_ids, gate: bool, progress):
    """make_variant + evaluate_variant + check_variant; returns the variant's Artifact (metadata not yet written)."""
    progress(f"building the {precision} variant")
    how = make_variant(src, dst, precision)
    check_external_data(dst)
    progress(f"validating {precision} against fp32 on {eval_ids.shape[0]}x{eval_ids.shape[1]} tokens")
    kv_dtype = "float16" if precision == "fp16" else "float32"
    metrics = evaluate_variant(src, dst, eval_ids, art.config.real_vocab_size, kv_dtype)
    metrics["thresholds"] = {"min_top1_agreement": THRESHOLDS[precision][0], "max_ppl_change": THRESHOLDS[precision][1]}
    metrics["gated"] = gate
    if gate:
        check_variant(metrics, precision)
    extra = dict(art.extra, variant=metrics, quantization=how)
    return dataclasses.replace(art, precision=precision, extra=extra)
