"""Export a GPT to one self-describing ONNX graph with a KV cache (prefill and decode in one graph), proven right.

    from export.onnx import export_onnx
    path = export_onnx(GPT.from_pretrained("random:tiny"), "out/tiny")   # out/tiny/model.onnx
    # CLI: nanogpt-deploy export SOURCE --out DIR [--dtype fp16] [--quantize q8|int8|int4] [--logits last]

Inputs `input_ids [batch, sequence]`, `attention_mask [batch, total_sequence]`, `position_ids
[batch, sequence]`, `past_key_values.{i}.key|value [batch, n_head, past_sequence, head_dim]`; outputs
`logits [batch, sequence, vocab]` (or `[batch, 1, vocab]` with logits="last": the last position only,
so a long prefill skips ln_f + lm_head over the prompt), `present.{i}.key|value` — the names optimum
and onnxruntime-genai use. The config, I/O
layout, tokenizer, precision, source hash, exporter versions and the parity measured at export travel
in `metadata_props`. The graph is traced in fp32, checked (symbolic axes, external data, the tied
embedding stored once), run by onnxruntime against torch at several (batch, sequence, past) shapes,
and only then renamed into DIR; a precision variant (export/quantize.py) is built from that fp32 graph
and judged against it. A failed or killed export leaves no model.onnx behind (a killed one leaves a
hidden `.export-*` folder that the next export into DIR removes); one over a previous export keeps that
one usable until the new one is complete, then swaps the folders (publish).

The pipeline, one module per stage, each readable alone:
    trace.py     torch.onnx.export: names, dynamic axes, metadata           -> tmp/model.onnx
    graph.py     save with external data, check it, metadata, node order    (shared by every stage)
    kv_shared.py kv_cache="shared": attention -> GroupQueryAttention, in place
    check.py     the parity gate: symbolic axes, onnxruntime vs torch, NaN-aware
    quantize.py  fp16 / q8 / int8 / int4 variants, judged against the fp32 graph
    publish.py   prepare DIR, then swap the finished export in atomically
"""
from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from model import GPT
from runtime.artifact import KV_CACHES, Artifact, ArtifactError, data_digests, logits_keep
from runtime.files import sha256_file

from .check import check_finite_weights, check_parity, check_symbolic_axes, parity_shapes, sample_eval_ids
from .ecosystem import write_tool_files
from .graph import ExportError, check_external_data, check_weight_bytes, write_metadata
from .kv_shared import share_kv_cache_file
from .publish import prepare_out_dir, publish
from .quantize import build_and_check_variant
from .trace import DEFAULT_OPSET, MIN_OPSET, max_opset, recorded_source, trace_and_save, versions

__all__ = ["ExportError", "check_options", "export_onnx"]


def export_onnx(model: GPT, out_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET, dtype: str = "fp32",
                quantize: str | None = None, logits: str = "all", kv_cache: str = "concat", source: str = "",
                force: bool = False, tool_files: bool = True,
                validate: bool = True,
                eval_ids: np.ndarray | None = None, gate: bool | None = None, progress=lambda msg: None) -> Path:
    """Trace `model`, validate it, and write DIR/model.onnx (+ model.onnx.data) atomically.

    Args:
        model: the GPT to export (any dtype; it is traced in fp32).
        out_dir: folder receiving model.onnx; must be empty, new, or hold a previous export (else `force`).
        opset: ONNX opset, MIN_OPSET to max_opset() (what torch, onnx and onnxruntime here support).
        dtype: "fp32" or "fp16" (fp16 graph for GPUs, see export/quantize.py).
        quantize: None, "q8", "int8" or "int4" (CPU variants); DIR then holds the quantized graph only.
        logits: "all" (logits [batch, sequence, vocab], what other tools expect) or "last" ([batch, 1,
            vocab]: the last position only; faster prefill / time to first token, and perplexity then
            needs step-by-step decoding) or "last:N" (the last min(sequence, N) positions: a
            speculative-decoding target, runtime/speculative.py, scores N - 1 drafted tokens per step).
        kv_cache: "concat" (present = Concat(past, new): standard ONNX, runs anywhere, TensorRT included) or
            "shared" (onnxruntime's GroupQueryAttention updates one cache buffer in place: faster decode on
            onnxruntime, see export/kv_shared.py; not for TensorRT).
        source: what the model was loaded from, recorded in the metadata (a local path made absolute).
        force: write into a DIR holding unrelated files.
        tool_files: also write what optimum, transformers and onnxruntime-genai need to run DIR as it is
            (config.json, genai_config.json, tokenizer files; export/ecosystem.py).
        validate: run the onnxruntime-vs-torch parity check (fp32 gate PARITY_ATOL).
        eval_ids: (B, T) tokens to judge a variant on; default samples from the model itself.
        gate: fail a variant that misses its thresholds; default True unless the weights are random
            (flat logits make agreement meaningless; the numbers are still recorded).
        progress: called with a line per stage.
    Returns:
        the path of DIR/model.onnx.
    """
    t0 = time.perf_counter()
    check_options(opset, dtype, quantize, logits, kv_cache)
    if model.config.block_size < 7:  # example_inputs: 3 new + 4 past positions
        raise ExportError(f"block_size {model.config.block_size} is too small to export: tracing needs 7 positions "
                          f"(3 new + 4 past; distinct sizes > 1 keep the axes symbolic), so block_size >= 7")
    check_finite_weights(model)
    out_dir = prepare_out_dir(out_dir, force)
    if model.lm_head.weight.dtype != torch.float32:
        model = copy.deepcopy(model).float()
    model = model.eval()
    files = [Path(f) for f in getattr(model, "checkpoint_files", [])]
    artifact = Artifact(config=model.config, precision="fp32", tokenizer=model.config.tokenizer, logits=logits,
                        kv_cache=kv_cache,
                        source=recorded_source(source), source_sha256=sha256_file(files[0]) if files else "",
                        versions=versions(opset),
                        extra={"source_files": {f.name: sha256_file(f) for f in files}} if files else {})

    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        # 1. trace in fp32 (into tmp/fp32/ when a precision variant is to take its place)
        work = Path(tmp) / "fp32" if (dtype != "fp32" or quantize) else Path(tmp)
        work.mkdir(exist_ok=True)
        path = work / "model.onnx"
        progress(f"tracing {model.config.n_layer} layers, {model.num_params() / 1e6:.1f}M parameters (opset {opset}): "
                 f"torch.onnx.export prints nothing until it ends, seconds for small models, a minute or more "
                 f"for 124M on 2 cores")
        trace_and_save(model, path, opset, artifact)
        # 2. its structure: symbolic axes, external data, the tied embedding stored once
        progress("checking axes, external data and weight sizes")
        check_symbolic_axes(path, logits)
        check_external_data(path)
        check_weight_bytes(path, model.num_params() * 4)
        # 3. kv_cache="shared": attention becomes GroupQueryAttention, updating the cache in place
        if kv_cache == "shared":
            progress("rewriting attention into GroupQueryAttention (KV cache updated in place)")
            share_kv_cache_file(path, model.config)
            check_weight_bytes(path, model.num_params() * 4)
        # 4. the parity gate: onnxruntime against torch
        if validate:
            shapes = parity_shapes(model.config.block_size)
            progress(f"validating onnxruntime vs torch at {len(shapes)} (batch, sequence, past) shapes")
            parity = check_parity(model, path, logits=logits, kv_cache=kv_cache)
            artifact = dataclasses.replace(artifact, extra=dict(artifact.extra, parity=parity))
        write_metadata(path, artifact)

        # 5. a precision variant built from the fp32 graph and judged against it; it alone is kept
        variant = quantize or (dtype if dtype != "fp32" else None)
        if variant:
            if gate is None:
                gate = bool(files)
                if not gate:
                    progress("random weights give flat logits: variant agreement is recorded, not enforced")
            if eval_ids is None:
                progress("sampling evaluation tokens from the model")
                eval_ids = sample_eval_ids(model)
            final = Path(tmp) / "model.onnx"
            artifact = build_and_check_variant(path, final, variant, artifact, eval_ids, gate, progress)
            shutil.rmtree(work)
            write_metadata(final, artifact)
        # 6. record the weights' digests, then swap the finished export into DIR
        extra = dict(artifact.extra, export_seconds=round(time.perf_counter() - t0, 2))
        final = Path(tmp) / "model.onnx"
        write_metadata(final, dataclasses.replace(artifact, extra=extra, data_sha256=data_digests(final)))
        if tool_files:
            write_tool_files(Path(tmp), artifact, progress=progress)
        publish(Path(tmp), out_dir)
    return out_dir / "model.onnx"


def check_options(opset: int, dtype: str = "fp32", quantize: str | None = None, logits: str = "all",
                  kv_cache: str = "concat") -> None:
    """export_onnx's checks of its options, cheap: the CLI runs them before it loads a checkpoint."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is below {MIN_OPSET}; the dynamo exporter needs --opset {MIN_OPSET} or higher")
    top, limited_by = max_opset()
    if opset > top:
        raise ExportError(f"opset {opset} is above {top}, the highest {limited_by} supports; "
                          f"choose --opset {MIN_OPSET} (the default) to {top}")
    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"dtype {dtype!r} is not supported; choose fp32 or fp16")
    if quantize not in (None, "q8", "int8", "int4"):
        raise ExportError(f"quantize {quantize!r} is not supported; choose q8, int8 or int4")
    if quantize and dtype != "fp32":
        raise ExportError(f"--quantize {quantize} starts from fp32 weights; drop --dtype {dtype}")
    try:
        logits_keep(logits)
    except ArtifactError as e:
        raise ExportError(f"{e}; choose all, last, or last:N for a speculative-decoding target") from None
    if kv_cache not in KV_CACHES:
        raise ExportError(f"kv_cache {kv_cache!r} is not supported; choose one of {', '.join(KV_CACHES)}")
