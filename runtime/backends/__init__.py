"""One backend interface for torch / onnxruntime / TensorRT; sampling and generation live above it.

Each backend owns its KV cache. `forward` appends T positions to it and returns float32 logits.
Choosing a backend is the three-entry table below; each module is imported only when chosen, so the
onnxruntime path never imports torch.
"""
from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from model.config import GPTConfig


class Backend(Protocol):
    config: GPTConfig
    name: str  # "onnxruntime" | "torch" | "tensorrt"
    provider: str  # e.g. "CPUExecutionProvider", "cuda", "cpu"
    precision: str  # "fp32" | "fp16" | "int8" | "int4"

    def reset(self, batch_size: int) -> None:
        """Drop the KV cache; the next forward starts at past length 0 with this batch size."""

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """(B, T) int64 ids, (B, P+T) int64 mask, (B, T) int64 positions -> logits (B, T, V) float32.

        Appends the T new positions to the cache.
        """


BACKENDS = {
    "onnxruntime": "runtime.backends.onnxruntime:OnnxRuntimeBackend",
    "torch": "runtime.backends.torch:TorchBackend",
    "tensorrt": "runtime.backends.tensorrt:TensorRTBackend",
}


class BackendError(ValueError):
    """A backend that cannot be chosen or loaded, said plainly."""


def load_backend(name: str, model: str, **options) -> Backend:
    """Open `model` (an exported folder / model.onnx, an engine, or for torch any checkpoint source)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(model, **options)
