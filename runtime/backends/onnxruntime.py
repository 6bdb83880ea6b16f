"""The onnxruntime backend: one exported model.onnx on the CPU or CUDA execution provider, no torch.

The KV cache never round-trips through numpy: it stays on the cache's device (host memory on CPU, GPU
memory on CUDA) between steps, and only the ids / mask / positions go in from numpy and only the logits
come out. How it is laid out follows the graph's `kv_cache` (runtime/backends/ort_cache.py): "concat"
binds each step's `present.*` OrtValues as the next step's `past_key_values.*` inputs (IO binding);
"shared" (GroupQueryAttention, export/kv_shared.py) gets one buffer per cache tensor that onnxruntime
writes into in place, rows left-aligned, each its own length.

A "shared" graph's decode steps may also run at fixed shapes over fixed buffers, replayed as CUDA graphs on
the CUDA provider (`decode`, runtime/backends/ort_graph.py).

    backend = OnnxRuntimeBackend("out/tiny", provider="cpu", threads=2)
    backend.reset(batch_size=1)
    logits = backend.forward(ids, mask, positions)   # (B, T, V) float32; the cache grows by T
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from ..artifact import ArtifactError, check_io, check_weights, read_onnx_artifact, resolve_onnx
from . import Backend, BackendError, Capabilities
from .ort_cache import ConcatCache, OrtDevice, SharedCache
from .ort_graph import StaticCache

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DECODE_MODES = ("auto", "graph", "static", "dynamic")


def cuda_provider_options(device_id: int = 0, tf32: bool = False) -> dict:
    """CUDAExecutionProvider's options. The CUDA EP runs fp32 MatMuls in TF32 unless told not to (10-bit
    mantissa: the 124M fp32 export differed from the CPU reference by 2.5e-3), so fp32 means fp32 here unless
    `tf32` asks for the speed."""
    return {"device_id": str(int(device_id)), "use_tf32": "1" if tf32 else "0"}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, model: str | Path, provider: str = "cpu", threads: int | None = None,
                 device_id: int = 0, optimize: bool = True, spinning: bool = True, verify_weights: bool = True,
                 tf32: bool = False, decode: str = "auto", graph_capacity: int | None = None):
        """Open an exported folder or its model.onnx.

        Args:
            model: DIR or DIR/model.onnx written by `nanogpt-deploy export` (with model.onnx.data beside it).
            provider: "cpu" or "cuda" (the CUDA EP needs `pip install 'nanogpt-deploy[gpu]'`).
            threads: intra-op threads (default: onnxruntime's choice, all cores).
            device_id: the GPU for provider="cuda".
            optimize: run onnxruntime's graph optimizations (ORT_ENABLE_ALL); off only to debug.
            spinning: let intra-op threads keep spinning after a run returns, waiting for the next one
                (onnxruntime's default). False sets `session.force_spinning_stop`: they still spin between
                the nodes of a run and stop when it returns. Two sessions taking turns on the same cores (a
                speculative draft and its target) need False, or one's idle threads steal the other's cores
                (124M fp32 target + int8 draft, 2 threads: 52.6 tok/s spinning, 103.2 not;
                scripts/speculative_check.py with and without --spin).
            verify_weights: check the sha256 of model.onnx.data against the digest recorded at export (about
                1 s per 500 MB, docs/export.md) and refuse a damaged or foreign weights file; False skips it (CLI
                --no-verify-weights). An artifact exported before digests were recorded loads with a warning.
            tf32: provider="cuda": let fp32 MatMuls run in TF32 (faster, ~1e-3 off); off by default
                (cuda_provider_options). `self.tf32` says which ran (always False on the CPU).
            decode: how a kv_cache="shared" graph runs its decode steps (runtime/backends/ort_graph.py):
                "graph" replays one CUDA graph per batch bucket (provider="cuda" only), "static" runs the same
                fixed-shape steps without capture (CPU or CUDA), "dynamic" binds each step's own shapes;
                "auto" is "graph" on CUDA for a shared graph, else "dynamic".
            graph_capacity: positions the fixed cache holds for "graph" / "static" (default block_size).
        """
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise BackendError(f"unknown provider {provider!r}; choose one of {sorted(PROVIDERS)}")
        ep = PROVIDERS[provider]
        available = ort.get_available_providers()
        if ep not in available:
            raise BackendError(f"provider {provider!r} needs {ep}, which this onnxruntime {ort.__version__} lacks "
                               f"(available: {available}); install the GPU build: pip uninstall onnxruntime && "
                               f"pip install 'nanogpt-deploy[gpu]'")
        path = resolve_onnx(model)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: the "some nodes were not assigned" notices are expected
        if threads:
            so.intra_op_num_threads = int(threads)
        if not spinning:  # threads still spin between the nodes of one run, and stop when it returns
            so.add_session_config_entry("session.force_spinning_stop", "1")
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if decode not in DECODE_MODES:
            raise BackendError(f"unknown decode mode {decode!r}; choose one of {DECODE_MODES}")
        # what the graph is (its kv_cache and precision decide the decode mode and the provider options), read
        # from its metadata before the one session opens
        self.artifact = read_onnx_artifact(path)
        self.kv_cache, self.precision = self.artifact.kv_cache, self.artifact.precision
        if self.kv_cache == "shared" and provider == "cuda" and self.precision != "fp16":
            raise BackendError(f"{path}: a kv_cache='shared' graph runs GroupQueryAttention, which onnxruntime's CUDA "
                               f"provider has in fp16 only (this graph is {self.precision}); export it with "
                               f"`--dtype fp16 --kv-cache shared`, or use --provider cpu")
        self.decode = _decode_mode(decode, self.kv_cache, provider, path)
        options = cuda_provider_options(device_id, tf32)
        if self.decode == "graph":
            options["enable_cuda_graph"] = "1"
        providers = [(ep, options), "CPUExecutionProvider"] if provider == "cuda" else [ep]
        self.session = _open_session(ort, path, so, providers)
        if self.session.get_providers()[0] != ep:  # onnxruntime falls back to CPU when CUDA libraries are missing
            raise BackendError(f"{path}: onnxruntime could not start {ep} (session runs on "
                               f"{self.session.get_providers()}); check the CUDA / cuDNN libraries "
                               "onnxruntime-gpu needs")

        if verify_weights and (note := check_weights(path, self.artifact)):
            warnings.warn(note, stacklevel=2)
        check_io(self.artifact.inputs, [i.name for i in self.session.get_inputs()], "input", str(path))
        check_io(self.artifact.outputs, [o.name for o in self.session.get_outputs()], "output", str(path))
        self.config = self.artifact.config
        self.provider = ep
        self.tf32 = bool(tf32) and provider == "cuda"
        self.path = path
        device = OrtDevice(ort, "cuda" if provider == "cuda" else "cpu", device_id)
        if self.decode == "dynamic":
            layout = SharedCache if self.kv_cache == "shared" else ConcatCache
            self.cache = layout(self.session, self.artifact, device)  # owns the buffers and the IO binding
        else:
            self.cache = StaticCache(self.session, self.artifact, device, capture=self.decode == "graph",
                                     capacity=min(int(graph_capacity or self.config.block_size),
                                                  self.config.block_size))
        self.capabilities = Capabilities(device=device.kind, max_context=self.config.block_size,
                                         ragged_cache=self.kv_cache == "shared")

    def _reset(self, batch_size: int) -> None:
        self.cache.reset(batch_size)

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        return self.cache.forward(input_ids, attention_mask, position_ids, self._length)

    def _rewind(self, length: int) -> None:
        self.cache.rewind(length, self._length)

    def _drop_front(self, n: int) -> None:
        self.cache.drop_front(n, self._length)

    def _keep_rows(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)

    def _add_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                  width: int) -> np.ndarray:
        return self.cache.add_rows(input_ids, attention_mask, position_ids, self._length, width)

    def graph_stats(self) -> dict:
        """How decode steps ran: {"decode": mode}, with StaticCache's counters for "static" / "graph"."""
        return {"decode": self.decode, **getattr(self.cache, "stats", {})}


def _decode_mode(decode: str, kv_cache: str, provider: str, path) -> str:
    """Resolve OnnxRuntimeBackend's `decode` option; refuse what cannot run, saying why."""
    if decode == "auto":
        return "graph" if kv_cache == "shared" and provider == "cuda" else "dynamic"
    if decode != "dynamic" and kv_cache != "shared":
        raise BackendError(f"{path}: decode={decode!r} (fixed-shape steps, CUDA graphs) needs a kv_cache='shared' "
                           f"graph, which updates one cache buffer in place; export with `--kv-cache shared` "
                           f"(and --dtype fp16 for CUDA), or use decode='dynamic'")
    if decode == "graph" and provider != "cuda":
        raise BackendError("CUDA graphs (decode='graph', --decode graph) need --provider cuda and onnxruntime-gpu; "
                           "on the CPU use decode='static' (same fixed-shape steps, no capture) or 'dynamic'")
    return decode


def _open_session(ort, path: Path, so, providers):
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail / InvalidGraph / ... types
        msg = str(e)
        m = re.search(r'External data path does not exist: "?([^"\n]+)"?', msg)
        if m or "external data" in msg.lower():
            missing = m.group(1) if m else f"{path}.data"
            raise ArtifactError(f"{path} keeps its weights in {Path(missing).name}, which is missing ({missing}); "
                                "copy the whole exported folder (model.onnx and model.onnx.data travel "
                                "together)") from None
        raise ArtifactError(f"{path} could not be opened by onnxruntime: {msg.strip().splitlines()[0]}") from None
