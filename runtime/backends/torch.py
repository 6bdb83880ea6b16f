"""The torch reference backend: model.gpt.GPT in eager mode, imported only when `--backend torch` is chosen.

MODEL is any checkpoint source `GPT.from_pretrained` takes (a Hugging Face GPT-2 folder, a nanoGPT
ckpt.pt, a hub name, `random:PRESET[@SEED]`). Given an exported folder / model.onnx instead, it loads
the checkpoint that folder was exported from (the artifact's `source` field), so `generate DIR --backend
torch` compares against the same weights; a folder whose source is not loadable here, or whose checkpoint
files no longer have the sha256 the export recorded, is an error.

    backend = TorchBackend("random:tiny@0"); backend.reset(1); logits = backend.forward(ids, mask, pos)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from model.checkpoints import is_hub_name

from ..artifact import Artifact, read_onnx_artifact
from ..files import sha256_file
from . import Backend, BackendError, Capabilities

DTYPES = {"float32": (torch.float32, "fp32"), "fp32": (torch.float32, "fp32"),
          "float16": (torch.float16, "fp16"), "fp16": (torch.float16, "fp16")}


def checkpoint_source(model: str | os.PathLike) -> str:
    """The checkpoint behind `model`: itself, or for an exported folder / model.onnx its recorded source."""
    return _recorded_source(model)[0]


def _recorded_source(model: str | os.PathLike) -> tuple[str, Path | None, Artifact | None]:
    """(checkpoint source, model.onnx, its artifact) for an export; (model, None, None) for anything else."""
    model = os.fspath(model)
    p = Path(model).expanduser()
    onnx_path = p / "model.onnx" if p.is_dir() else p
    if not (onnx_path.suffix == ".onnx" and onnx_path.is_file()):
        return model, None, None
    art = read_onnx_artifact(onnx_path)
    source = art.source
    loadable = source.startswith("random:") or (source and (Path(source).expanduser().exists() or is_hub_name(source)))
    if not loadable:
        raise BackendError(f"{onnx_path} was exported from {source or 'an unrecorded source'!r}, which is not a "
                           f"checkpoint this machine can load; give the torch backend the checkpoint itself "
                           f"(a folder, ckpt.pt, hub name or random:PRESET)")
    return source, onnx_path, art


def check_source_unchanged(files, art: Artifact, onnx_path: Path) -> None:
    """Raise when a checkpoint file the export hashed (source_sha256 = files[0]; extra["source_files"] by name) has
    changed since: a torch reference on other weights would blame the export for the difference."""
    recorded = dict(art.extra.get("source_files") or {})
    if files and art.source_sha256:
        recorded[Path(files[0]).name] = art.source_sha256
    for f in map(Path, files):
        want = recorded.get(f.name)
        if want and (got := sha256_file(f)) != want:
            raise BackendError(f"{f.resolve()} has changed since {onnx_path} was exported from {art.source!r} (sha256 "
                               f"{got[:12]}..., recorded {want[:12]}...): it is no longer the exported "
                               "model's reference. "
                               f"Give the torch backend the original checkpoint itself (e.g. `nanogpt-deploy verify "
                               f"{onnx_path.parent} CHECKPOINT`), or re-export from this one")


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: str | os.PathLike, device: str = "cpu", dtype: str = "float32",
                 threads: int | None = None, provider: str | None = None):
        """Load `model` (a checkpoint source, or an exported folder: see the module docstring).

        Args:
            device: "cpu" or "cuda" (`provider` is accepted as an alias, as the CLI's --provider).
            dtype: "float32" or "float16" parameters and KV cache; logits are returned as float32.
            threads: torch intra-op threads (default: torch's choice).
        """
        from model import GPT

        device = provider or device
        if dtype not in DTYPES:
            raise BackendError(f"unknown dtype {dtype!r} for the torch backend; choose one of {sorted(DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"device {device!r} requested but this torch ({torch.__version__}) sees no CUDA GPU; "
                               f"use --provider cpu")
        if threads:
            torch.set_num_threads(int(threads))
        torch_dtype, self.precision = DTYPES[dtype]
        self.source, onnx_path, art = _recorded_source(model)
        self.model = GPT.from_pretrained(self.source, dtype=torch_dtype).to(device)
        if art is not None:
            check_source_unchanged(getattr(self.model, "checkpoint_files", []), art, onnx_path)
        self.config = self.model.config
        self.device = torch.device(device)
        self.provider = str(self.device)
        self.capabilities = Capabilities(device="cuda" if self.device.type == "cuda" else "cpu",
                                         max_context=self.config.block_size)
        self._past = None

    def _reset(self, batch_size: int) -> None:
        self._past = self.model.empty_past(batch_size, device=self.device)

    def _rewind(self, length: int) -> None:
        """Drop the cache's positions past `length` (views of the kept part; the next forward concatenates)."""
        self._past = tuple((k[:, :, :length], v[:, :, :length]) for k, v in self._past)

    def _drop_front(self, n: int) -> None:
        """Drop every row's first n positions (views of the rest; the next forward concatenates)."""
        self._past = tuple((k[:, :, n:], v[:, :, n:]) for k, v in self._past)

    def _keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows of the cache (index_select along the batch)."""
        index = torch.tensor(rows, device=self.device)
        self._past = tuple((k.index_select(0, index), v.index_select(0, index)) for k, v in self._past)

    @torch.inference_mode()
    def _add_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                  width: int) -> np.ndarray:
        """Prefill new rows as their own batch, then append their cache to the running rows', both right-aligned
        (Backend.add_rows)."""
        old, B, L = self._past, self._batch, self._length
        self.reset(input_ids.shape[0])
        try:
            logits = self.forward(input_ids, attention_mask, position_ids)
        except Exception:
            self._past, self._batch, self._length = old, B, L
            raise
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, width - t.size(2), 0))  # noqa: E731 - zeros on the left
        self._past = tuple((torch.cat([pad(ko), pad(kn)]), torch.cat([pad(vo), pad(vn)]))
                           for (ko, vo), (kn, vn) in zip(old, self._past))
        return logits

    @torch.inference_mode()
    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        to = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731 - already C-contiguous int64
        logits, self._past = self.model(to(input_ids), to(attention_mask), to(position_ids), self._past)
        return logits.float().cpu().numpy()  # (B, T, V)
