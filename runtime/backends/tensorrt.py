"""The TensorRT backend: one engine built by `nanogpt-deploy build-engine`, KV cache kept on the GPU.

Torch-free: TensorRT runs the engine, cuda-python (`cuda.bindings.runtime`) owns the memory. Every
device buffer is allocated once, at load, for the engine's maxima (batch, total context): the three
int64 inputs, the logits, and two sets of KV buffers. The KV sets ping-pong: step n reads `past` from
set A and TensorRT writes `present` (B, nh, P+T, hs) into set B; a KV tensor is packed contiguously at
the start of its buffer, so step n+1 simply binds set B as its past and set A as its present -- no
copy, only two addresses swapped per layer. Only ids / mask / positions go in and only the (B, T, V)
logits come out.

    backend = TensorRTBackend("out/tiny/model.engine")   # or the folder holding model.engine
    backend.reset(batch_size=1)
    logits = backend.forward(ids, mask, positions)        # (B, T, V) float32; the cache grows by T
                                                          # ((B, 1, V) for an export with --logits last)

The engine's JSON sidecar (model.engine.json) says what it was built from and for. Everything that can
be decided without a GPU -- the sidecar schema, compatibility checks, profile selection, the buffer
plan -- is plain Python in runtime/trt_plan.py, unit-tested on CPU; tensorrt and cuda are imported
(runtime/trt_cuda.py) when the backend loads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact import ArtifactError
from ..trt_cuda import cuda_call, current_gpu, import_cudart, import_tensorrt
from ..trt_plan import (
    EngineMeta,
    TensorRTError,
    check_engine,
    check_gpu,
    check_tensorrt_version,
    io_shapes,
    plan_buffers,
    resolve_engine,
    rewind_copy,
    sidecar_path,
)
from . import Backend, Capabilities, merge_rows, pack_rows


def describe_engine(trt, engine) -> dict:
    """The engine's I/O names, dtypes and profile shapes, in the form `check_engine` reads."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    return {
        "inputs": inputs,
        "outputs": [n for n in names if n not in inputs],
        "dtypes": {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))).name for n in names},
        "profiles": [{n: tuple(tuple(d) for d in engine.get_tensor_profile_shape(n, k)) for n in inputs}
                     for k in range(engine.num_optimization_profiles)],
    }


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, model: str | Path, device: int = 0, provider: str | None = None, threads: int | None = None):
        """Open an engine built by `nanogpt-deploy build-engine` (with its model.engine.json beside it).

        Args:
            model: the engine file, or a folder holding model.engine.
            device: the CUDA device to run on; it must have the compute capability the engine was built for.
            provider, threads: accepted for the common `load_backend` options and ignored: an engine
                always runs on the GPU, and its host side is one thread.
        """
        path = resolve_engine(model)
        side = sidecar_path(path)
        if not side.is_file():
            raise ArtifactError(f"{path} has no sidecar {side.name} (what it was built from and for); rebuild it "
                                f"with `nanogpt-deploy build-engine MODEL_DIR --out {path}`")
        meta = EngineMeta.read_json(side)
        if meta.engine_bytes and path.stat().st_size != meta.engine_bytes:
            raise ArtifactError(f"{path} is {path.stat().st_size} bytes, its sidecar describes a "
                                f"{meta.engine_bytes}-byte "
                                f"engine; one of them is from another build: {meta.rebuild_command(path)}")
        trt, cudart = import_tensorrt(), import_cudart()
        check_tensorrt_version(meta, trt.__version__, path)
        gpu_name, cc = current_gpu(cudart, device)
        check_gpu(meta, gpu_name, cc, path)

        self.meta, self.artifact, self.path = meta, meta.artifact, path
        self.config, self.precision = meta.serving_config, meta.precision
        self.tf32 = bool(meta.build.get("tf32", True))  # engines built before the flag was recorded: TensorRT's default
        self.provider = f"cuda:{device} ({gpu_name})"
        self.capabilities = Capabilities(device="cuda", max_context=meta.max_seq, max_batch=meta.max_batch)
        self._trt, self._cudart = trt, cudart
        self._ptrs: list[int] = []
        self._stream, self._device = None, device
        self._on_device()

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise TensorRTError(f"TensorRT {trt.__version__} could not deserialize {path} (see its log above); "
                                f"rebuild it: {meta.rebuild_command(path)}")
        self.plan = plan_buffers(meta.artifact, meta.max_batch, meta.max_seq)
        check_engine(describe_engine(trt, self.engine), meta, self.plan, str(path))

        self._stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._addr = {}
        for b in [*self.plan.inputs, self.plan.logits]:
            self._addr[b.name] = self._malloc(b.nbytes, b.name)
        self._kv = tuple([self._malloc(b.nbytes, b.name) for b in kv_set] for kv_set in self.plan.kv)
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TensorRTError(f"TensorRT could not create an execution context for {path} (out of GPU memory?)")
        self._profile = -1
        self._current = 0  # the ping-pong set holding the past

    def _on_device(self) -> None:
        """Make this backend's GPU current for the calling thread (CUDA's current device is per host thread, and
        the server steps from its scheduler thread, not the one that opened the engine)."""
        cuda_call(self._cudart, self._cudart.cudaSetDevice(self._device), "cudaSetDevice")

    def _malloc(self, nbytes: int, what: str) -> int:
        ptr = int(cuda_call(self._cudart, self._cudart.cudaMalloc(max(nbytes, 1)),
                            f"cudaMalloc({what}, {nbytes} bytes)"))
        self._ptrs.append(ptr)
        return ptr

    def _reset(self, batch_size: int) -> None:
        self.meta.select_profile(batch_size, 1, 0)  # the batch limit, said before any step
        self._current = 0

    def _forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
        self._on_device()
        cudart, ctx = self._cudart, self.context
        B, T = ids.shape
        P = self._length
        k = self.meta.select_profile(B, T, P)  # the engine's own limits, with the rebuild command

        stream = int(self._stream)
        if k != self._profile:
            if not ctx.set_optimization_profile_async(k, stream):
                raise TensorRTError(f"TensorRT refused optimization profile {k} ({self.meta.profiles[k]['name']})")
            self._profile = k
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        for name, arr in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            cuda_call(cudart, cudart.cudaMemcpyAsync(self._addr[name], arr.ctypes.data, arr.nbytes, h2d, self._stream),
                      f"copy {name} to the GPU")
        for name, shape in io_shapes(self.config, B, T, P).items():
            if not ctx.set_input_shape(name, shape):
                raise TensorRTError(f"TensorRT rejected {name} shape {shape} for profile {k}")
        addresses = {**self._addr, **self.plan.kv_addresses(self._kv, self._current)}
        for name, ptr in addresses.items():
            if not ctx.set_tensor_address(name, ptr):
                raise TensorRTError(f"TensorRT rejected the address of {name}")
        if not ctx.execute_async_v3(stream):
            raise TensorRTError(f"TensorRT execute_async_v3 failed (batch {B}, sequence {T}, past {P}); see its log")
        # only the (B, T, V) logits ((B, 1, V) for logits="last") come back, packed at the start of the buffer
        logits = np.empty((B, self.artifact.logits_positions(T), self.config.vocab_size), dtype=self.plan.logits.dtype)
        cuda_call(cudart, cudart.cudaMemcpyAsync(logits.ctypes.data, self._addr["logits"], logits.nbytes,
                                                 cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
                  "copy logits from the GPU")
        cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._current = 1 - self._current  # this step's present is the next step's past
        return logits.astype(np.float32, copy=False)

    def _rewind(self, length: int) -> None:
        """Drop the cache's positions past `length`: a device-to-device repack of the current past set into the
        other ping-pong set (the packed layout's row pitch changes), which becomes the past."""
        self._repack(0, length)

    def _drop_front(self, n: int) -> None:
        """Drop every row's first n positions: the same repack as rewind, from position n on."""
        self._repack(n, self._length - n)

    def _repack(self, start: int, length: int) -> None:
        """Keep positions [start, start + length) of every (batch, head) row: one cudaMemcpy2DAsync per tensor
        from the current set into the other, which becomes the past."""
        self._on_device()
        cudart, c = self._cudart, self.config
        itemsize = np.dtype(self.artifact.kv_dtype).itemsize
        offset, dpitch, spitch, width, height = rewind_copy(self._batch, c.n_head, c.head_dim, itemsize, self._length,
                                                            length, start)
        src, dst = self._kv[self._current], self._kv[1 - self._current]
        if width:
            for s_ptr, d_ptr in zip(src, dst):
                cuda_call(cudart, cudart.cudaMemcpy2DAsync(d_ptr, dpitch, s_ptr + offset, spitch,
                                                           width, height,
                                                           cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                                           self._stream),
                          "repack the KV cache (cudaMemcpy2DAsync)")
            cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._current = 1 - self._current

    def _keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows: each run of kept rows (pack_rows) is copied device to device into the other
        ping-pong set, which becomes the past; a row of the packed past is n_head * length * head_dim."""
        self._on_device()
        cudart, c = self._cudart, self.config
        block = c.n_head * self._length * c.head_dim * np.dtype(self.artifact.kv_dtype).itemsize
        src, dst = self._kv[self._current], self._kv[1 - self._current]
        if block:
            for s_ptr, d_ptr in zip(src, dst):
                for d, r, n in pack_rows(rows, in_place=False):
                    cuda_call(cudart, cudart.cudaMemcpyAsync(d_ptr + d * block, s_ptr + r * block, n * block,
                                                             cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                                             self._stream),
                              "keep rows of the KV cache (cudaMemcpyAsync)")
            cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._current = 1 - self._current

    def _add_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                  width: int) -> np.ndarray:
        """Prefill new rows as their own batch and append them (Backend.add_rows): the running rows' cache and
        the new rows' are merged, right-aligned, through host memory (the packed layout's row pitch changes
        with the width), into the set that becomes the past."""
        B, L, current = self._batch, self._length, self._current
        self.meta.select_profile(B + input_ids.shape[0], 1, width)  # the merged batch's next step must fit the engine
        self._on_device()
        old = self._download(current, B, L)
        self.reset(input_ids.shape[0])
        try:
            logits = self.forward(input_ids, attention_mask, position_ids)
        except Exception:
            self._batch, self._length, self._current = B, L, current
            self._upload(current, old)  # the prefill may have written over it
            raise
        new = self._download(self._current, input_ids.shape[0], input_ids.shape[1])
        self._upload(self._current, [merge_rows(o, nw) for o, nw in zip(old, new)])
        return logits

    def _download(self, kv_set: int, batch: int, length: int) -> list[np.ndarray]:
        """The packed (batch, n_head, length, head_dim) cache tensors of one ping-pong set, on the host."""
        c, cudart = self.config, self._cudart
        out = [np.empty((batch, c.n_head, length, c.head_dim),
                        np.dtype(self.artifact.kv_dtype)) for _ in self._kv[kv_set]]
        for a, ptr in zip(out, self._kv[kv_set]):
            if a.nbytes:
                cuda_call(cudart, cudart.cudaMemcpyAsync(a.ctypes.data, ptr, a.nbytes,
                                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
                          "copy the KV cache to the host")
        cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return out

    def _upload(self, kv_set: int, arrays: list[np.ndarray]) -> None:
        """Write packed cache tensors (C-contiguous) at the start of one ping-pong set's buffers."""
        cudart = self._cudart
        for a, ptr in zip(arrays, self._kv[kv_set]):
            if a.nbytes:
                cuda_call(cudart, cudart.cudaMemcpyAsync(ptr, a.ctypes.data, a.nbytes,
                                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream),
                          "copy the KV cache to the GPU")
        cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Free the device buffers and the stream (also done when the backend is garbage-collected)."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        self.context = None  # the context goes before the memory it points at
        cudart.cudaSetDevice(getattr(self, "_device", 0))  # no raise: this also runs from __del__
        for ptr in getattr(self, "_ptrs", []):
            cudart.cudaFree(ptr)
        self._ptrs = []
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn cuda down already
            pass
