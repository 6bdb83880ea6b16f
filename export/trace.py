"""Trace a GPT into an ONNX graph with named I/O, symbolic axes and the artifact's metadata (torch.onnx, dynamo).

The first stage of export_onnx (export/onnx.py). `_FlatIO` presents GPT.forward with the flat KV tuple the
ONNX names follow; `dynamic_shapes` names every axis with its own torch.export.Dim (the attention-mask length
too: no Dim + Dim); the graph is saved with the metadata already in `metadata_props` and its weights in
model.onnx.data. `max_opset`, `versions` and `recorded_source` say what the metadata records.

    trace_and_save(model, Path("tmp/model.onnx"), DEFAULT_OPSET, artifact)
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from pathlib import Path

import torch

from model import GPT
from runtime.artifact import Artifact, input_names, logits_keep, output_names

from . import graph

MIN_OPSET = 18  # 17 yields an invalid Split with the dynamo exporter; the highest is max_opset()
DEFAULT_OPSET = 18  # >= 23 turns SDPA into ONNX Attention, which quantize_dynamic breaks
LOGITS_AXIS = "logits_sequence"  # the logits sequence axis of a logits="last:N" graph: min(sequence, N)


class _FlatIO(torch.nn.Module):
    """Presents GPT.forward with the flat KV tuple the ONNX names follow (key0, value0, key1, ...)."""

    def __init__(self, model: GPT, logits_to_keep: int = 0):
        super().__init__()
        self.model = model
        self.logits_to_keep = logits_to_keep

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        logits, present = self.model(input_ids, attention_mask, position_ids, past_key_values,
                                     logits_to_keep=self.logits_to_keep)
        return (logits, *[t for kv in present for t in kv])


def example_inputs(model: GPT, batch: int = 2, seq: int = 3, past: int = 4):
    c = model.config
    dtype = model.lm_head.weight.dtype
    ids = torch.randint(0, c.real_vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = tuple((torch.randn(batch, c.n_head, past, c.head_dim, dtype=dtype),
                torch.randn(batch, c.n_head, past, c.head_dim, dtype=dtype)) for _ in range(c.n_layer))
    return ids, mask, pos, kv


def dynamic_shapes(n_layer: int) -> dict:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")  # no Dim + Dim
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "past_key_values": tuple(({0: batch, 2: past}, {0: batch, 2: past}) for _ in range(n_layer)),
    }


def trace_and_save(model: GPT, path: Path, opset: int, artifact: Artifact) -> None:
    import onnx_ir as ir

    n_layer = model.config.n_layer
    # the exporter logs a line per optional op library it does not find (torchvision::nms, ...): noise here
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    with torch.no_grad(), warnings.catch_warnings(), _log_level(registration_log, logging.ERROR):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _FlatIO(model, logits_keep(artifact.logits)), example_inputs(model), dynamo=True, opset_version=opset,
            dynamic_shapes=dynamic_shapes(n_layer), input_names=input_names(n_layer),
            output_names=output_names(n_layer), verbose=False)
    for k, v in artifact.to_metadata().items():
        program.model.metadata_props[k] = v
    if logits_keep(artifact.logits) > 1:  # the exporter names the axis "Max(0, sequence - Max(0, sequence - N))"
        logits_out = program.model.graph.outputs[0]
        logits_out.shape = ir.Shape([logits_out.shape[0], LOGITS_AXIS, logits_out.shape[2]])
    ir.save(program.model, path, external_data=path.name + ".data", size_threshold_bytes=graph.EXTERNAL_DATA_THRESHOLD)


@contextlib.contextmanager
def _log_level(logger: logging.Logger, level: int):
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


@functools.cache
def max_opset() -> tuple[int, str]:
    """(the highest ai.onnx opset this install can export and load, what sets it): the least of torch's
    exporter maximum, onnx's opset and the newest operator version onnxruntime registers."""
    import onnx.defs

    limits = {f"onnx {onnx.__version__}": onnx.defs.onnx_opset_version()}
    with contextlib.suppress(ImportError, AttributeError):
        from torch.onnx._constants import ONNX_MAX_OPSET  # torch's declared maximum (2.13: 23)

        limits[f"torch {torch.__version__.split('+')[0]}'s ONNX exporter"] = ONNX_MAX_OPSET
    with contextlib.suppress(ImportError, AttributeError, ValueError):
        import onnxruntime
        from onnxruntime.capi._pybind_state import get_all_operator_schema

        limits[f"onnxruntime {onnxruntime.__version__}"] = max(
            s.since_version for s in get_all_operator_schema() if s.domain in ("", "ai.onnx"))
    name = min(limits, key=limits.get)
    return limits[name], name


def versions(opset: int) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"opset": opset}
    for pkg in ("torch", "onnx", "onnxscript", "onnxruntime", "nanogpt-deploy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def recorded_source(source: str | os.PathLike) -> str:
    """`source` as the metadata records it: a local path absolute and resolved (so the torch reference loads
    that checkpoint from any directory, not whatever the relative path names there); hub names and
    random:PRESET specs as given."""
    source = os.fspath(source)
    if not source or source.startswith("random:"):
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source
