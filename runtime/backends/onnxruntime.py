"""The onnxruntime backend: one exported model.onnx on the CPU or CUDA execution provider, no torch.

The KV cache never round-trips through numpy. Each step binds the previous step's `present.*` OrtValues
as this step's `past_key_values.*` inputs (IO binding) and lets onnxruntime allocate the new presents on
the cache's device: host memory on CPU, GPU memory on CUDA, where the cache stays between steps. Only
the ids / mask / positions go in from numpy and only the logits come out to numpy.

    backend = OnnxRuntimeBackend("out/tiny", provider="cpu", threads=2)
    backend.reset(batch_size=1)
    logits = backend.forward(ids, mask, positions)   # (B, T, V) float32; the cache grows by T
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..artifact import Artifact, ArtifactError, check_io, resolve_onnx
from . import BackendError, check_step

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model: str | Path, provider: str = "cpu", threads: int | None = None,
                 device_id: int = 0, optimize: bool = True):
        """Open an exported folder or its model.onnx.

        Args:
            model: DIR or DIR/model.onnx written by `nanogpt-deploy export` (with model.onnx.data beside it).
            provider: "cpu" or "cuda" (the CUDA EP needs `pip install 'nanogpt-deploy[gpu]'`).
            threads: intra-op threads (default: onnxruntime's choice, all cores).
            device_id: the GPU for provider="cuda".
            optimize: run onnxruntime's graph optimizations (ORT_ENABLE_ALL); off only to debug.
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
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        providers = [(ep, {"device_id": device_id}), "CPUExecutionProvider"] if provider == "cuda" else [ep]
        self.session = _open_session(ort, path, so, providers)
        if self.session.get_providers()[0] != ep:  # onnxruntime falls back to CPU when CUDA libraries are missing
            raise BackendError(f"{path}: onnxruntime could not start {ep} (session runs on "
                               f"{self.session.get_providers()}); check the CUDA / cuDNN libraries onnxruntime-gpu needs")

        self.artifact = Artifact.from_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        check_io(self.artifact.inputs, [i.name for i in self.session.get_inputs()], "input", str(path))
        check_io(self.artifact.outputs, [o.name for o in self.session.get_outputs()], "output", str(path))
        self.config = self.artifact.config
        self.precision = self.artifact.precision
        self.provider = ep
        self.path = path
        self._ort = ort
        self._device = "cuda" if provider == "cuda" else "cpu"
        self._device_id = device_id
        self._kv_dtype = np.dtype(self.artifact.kv_dtype)
        self._past_names = self.artifact.inputs[3:]
        self._present_names = self.artifact.outputs[1:]
        self._io = self.session.io_binding()
        self._past: list | None = None  # OrtValues, one per past_key_values.* input
        self._batch = 0
        self._length = 0  # positions in the cache

    @property
    def past_length(self) -> int:
        return self._length

    def reset(self, batch_size: int) -> None:
        c = self.config
        # Step 0's empty past (B, nh, 0, hs): zero-length host tensors; zero bytes to copy even on CUDA
        empty = np.zeros((batch_size, c.n_head, 0, c.head_dim), dtype=self._kv_dtype)
        ov = self._ort.OrtValue.ortvalue_from_numpy(empty)
        self._past = [ov] * len(self._past_names)
        self._batch, self._length = batch_size, 0

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        B, T = input_ids.shape
        if self._past is None or B != self._batch:
            if self._length:
                raise BackendError(f"batch size changed from {self._batch} to {B} mid-sequence; call reset({B}) first")
            self.reset(B)
        check_step(self.config, input_ids, attention_mask, position_ids, self._length)

        io = self._io
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        # bind_cpu_input reads the arrays in place: they must be C-contiguous int64 and alive until run
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        pos = np.ascontiguousarray(position_ids, dtype=np.int64)
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", pos)
        for name, value in zip(self._past_names, self._past):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in self._present_names:
            io.bind_output(name, self._device, self._device_id)  # onnxruntime allocates (B, nh, P+T, hs) there
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        self._past = list(outputs[1:])  # stays on the device: next step's past
        self._length += T
        return outputs[0].numpy().astype(np.float32, copy=False)  # (B, T, V); (B, 1, V) for logits="last"


def _open_session(ort, path: Path, so, providers):
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail / InvalidGraph / ... types
        msg = str(e)
        m = re.search(r'External data path does not exist: "?([^"\n]+)"?', msg)
        if m or "external data" in msg.lower():
            missing = m.group(1) if m else f"{path}.data"
            raise ArtifactError(f"{path} keeps its weights in {Path(missing).name}, which is missing ({missing}); "
                                f"copy the whole exported folder (model.onnx and model.onnx.data travel together)") from None
        raise ArtifactError(f"{path} could not be opened by onnxruntime: {msg.strip().splitlines()[0]}") from None
