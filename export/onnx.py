"""Export a GPT to one self-describing ONNX graph with a KV cache (prefill and decode in one graph).

    from export.onnx import export_onnx
    path = export_onnx(GPT.from_pretrained("random:tiny"), "out/tiny")   # out/tiny/model.onnx

Inputs `input_ids [batch, sequence]`, `attention_mask [batch, total_sequence]`, `position_ids
[batch, sequence]`, `past_key_values.{i}.key|value [batch, n_head, past_sequence, head_dim]`; outputs
`logits`, `present.{i}.key|value` — the names optimum and onnxruntime-genai use. The config, I/O
layout, tokenizer, precision, source hash and exporter versions travel in `metadata_props`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from model import GPT
from runtime.artifact import Artifact, input_names, output_names

MIN_OPSET = 18  # 17 yields an invalid Split with the dynamo exporter
DEFAULT_OPSET = 18  # >= 23 turns SDPA into ONNX Attention, which quantize_dynamic breaks


class ExportError(RuntimeError):
    """An export that failed or did not validate."""


class _FlatIO(torch.nn.Module):
    """Presents GPT.forward with the flat KV tuple the ONNX names follow (key0, value0, key1, ...)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        logits, present = self.model(input_ids, attention_mask, position_ids, past_key_values)
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


def export_onnx(model: GPT, out_dir: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                artifact: Artifact | None = None, external_data: bool = True) -> Path:
    """Trace `model` and write DIR/model.onnx (+ model.onnx.data) atomically; returns the model.onnx path."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is below {MIN_OPSET}; the dynamo exporter needs --opset {MIN_OPSET} or higher")
    model = model.eval()
    n_layer = model.config.n_layer
    artifact = artifact or Artifact(config=model.config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _FlatIO(model), example_inputs(model), dynamo=True, opset_version=opset,
                dynamic_shapes=dynamic_shapes(n_layer), input_names=input_names(n_layer),
                output_names=output_names(n_layer), verbose=False)
        for k, v in artifact.to_metadata().items():
            program.model.metadata_props[k] = v
        program.save(str(tmp_path), external_data=external_data)
        # model.onnx is renamed last: its presence means the export finished
        for f in sorted(Path(tmp).iterdir(), key=lambda f: f.name == "model.onnx"):
            os.replace(f, out_dir / f.name)
    return out_dir / "model.onnx"
