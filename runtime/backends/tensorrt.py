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

The engine's JSON sidecar (model.engine.json) says what it was built from and for: TensorRT version,
GPU, precision, optimization profiles, the source model.onnx hash and its Artifact. Everything that can
be decided without a GPU -- the sidecar schema, compatibility checks, profile selection, the buffer
plan -- is plain Python here and unit-tested on CPU; tensorrt and cuda are imported inside the backend.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.config import GPTConfig

from ..artifact import Artifact, ArtifactError, check_io, input_names, resolve_file
from ..files import atomic_write_text
from . import BackendError, check_add_rows, check_drop_front, check_keep_rows, check_rewind, check_step, merge_rows, pack_rows

ENGINE_FORMAT = "nanogpt-deploy-engine/1"
ENGINE_NAME = "model.engine"
INSTALL_HINT = "pip install 'nanogpt-deploy[tensorrt]' (TensorRT needs an NVIDIA GPU and driver)"


class TensorRTError(RuntimeError):
    """TensorRT missing, an engine that does not fit this machine, or a request outside its profiles."""


# ---- imports of the optional dependencies -------------------------------------------------------------

def import_tensorrt():
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTError(f"the tensorrt package is not installed ({e}); {INSTALL_HINT}") from None
    return tensorrt


def import_cudart():
    """cuda-python's runtime API: `cuda.bindings.runtime` (cuda-python >= 12.6), else the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise TensorRTError(f"cuda-python is not installed ({e}); {INSTALL_HINT}") from None
    return cudart


def cuda_call(cudart, result, what: str):
    """cuda-python returns (error, *values); raise on error, return the value(s)."""
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise TensorRTError(f"CUDA {what} failed: {name}")
    return rest[0] if len(rest) == 1 else (rest or None)


def current_gpu(cudart, device: int = 0) -> tuple[str, str]:
    """(name, compute capability "major.minor") of CUDA device `device`, with a clear error when there is none."""
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        raise TensorRTError("no CUDA GPU is visible (cudaGetDeviceCount found none); TensorRT engines are built "
                            "and run on an NVIDIA GPU: use the onnxruntime backend on this machine")
    if not 0 <= device < count:
        raise TensorRTError(f"CUDA device {device} does not exist; this machine has devices 0..{count - 1}")
    prop = cuda_call(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"


# ---- shapes and profiles ----------------------------------------------------------------------------

def io_shapes(config: GPTConfig, batch: int, seq: int, past: int) -> dict[str, tuple[int, ...]]:
    """Every input's shape for one request: the single place the graph's shape relations live."""
    kv = (batch, config.n_head, past, config.head_dim)  # (B, nh, P, hs)
    shapes = {"input_ids": (batch, seq), "attention_mask": (batch, past + seq), "position_ids": (batch, seq)}
    for name in input_names(config.n_layer)[3:]:
        shapes[name] = kv
    return shapes


def profile_covers(profile: dict, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether every input shape lies inside the profile's [min, max] box (TensorRT's rule)."""
    for name, shape in shapes.items():
        s = profile["shapes"][name]
        if not all(lo <= d <= hi for lo, d, hi in zip(s["min"], shape, s["max"])):
            return False
    return True


def _dim_range(profiles: list[dict], name: str, axis: int) -> tuple[int, int]:
    return (min(p["shapes"][name]["min"][axis] for p in profiles),
            max(p["shapes"][name]["max"][axis] for p in profiles))


def suggest_max_seq(need: int, block_size: int) -> int:
    """The --max-seq to suggest for `need` positions: the next power of two, capped at block_size."""
    n = 1
    while n < need:
        n *= 2
    return min(n, block_size)


# ---- the sidecar -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EngineMeta:
    """What model.engine.json says about its engine (written by export.tensorrt.build_engine)."""
    artifact: Artifact
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    profiles: list  # [{"name": "prefill", "shapes": {input: {"min": [...], "opt": [...], "max": [...]}}}, ...]
    max_batch: int
    max_seq: int  # the longest total context (past + sequence) the buffers and profiles allow
    source_onnx: str = ""
    source_onnx_sha256: str = ""
    engine_bytes: int = 0
    build: dict = field(default_factory=dict)  # opt shapes, workspace, timing cache, build time, date

    @property
    def precision(self) -> str:
        return self.artifact.precision

    @property
    def serving_config(self) -> GPTConfig:
        """The model's config with block_size cut to the positions this engine holds (max_seq), as the backend
        presents it: generation, the scheduler and the server check lengths against it, so a request the
        engine cannot run is refused up front instead of failing its whole batch in the engine's profile check."""
        c = self.artifact.config
        return c if self.max_seq >= c.block_size else dataclasses.replace(c, block_size=self.max_seq)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["artifact"] = self.artifact.to_dict()
        d["format"], d["precision"] = ENGINE_FORMAT, self.precision
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "engine sidecar") -> "EngineMeta":
        if d.get("format") != ENGINE_FORMAT:
            raise ArtifactError(f"{where} is not a nanogpt-deploy engine sidecar (format {d.get('format')!r}, "
                                f"expected {ENGINE_FORMAT!r}); build the engine with `nanogpt-deploy build-engine`")
        try:
            art = Artifact.from_dict(d["artifact"], where)
            meta = cls(artifact=art, **{f.name: d[f.name] for f in dataclasses.fields(cls)
                                        if f.name != "artifact" and f.name in d})
            for p in meta.profiles:
                missing = [n for n in art.inputs if n not in p["shapes"]]
                if missing:
                    raise ValueError(f"profile {p['name']!r} lacks {missing}")
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ArtifactError):
                raise
            raise ArtifactError(f"{where}: damaged engine sidecar: {e}") from None
        if d.get("precision", meta.precision) != meta.precision:
            raise ArtifactError(f"{where}: precision {d['precision']!r} disagrees with its artifact's {meta.precision!r}")
        return meta

    def write_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read_json(cls, path: str | Path) -> "EngineMeta":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ArtifactError(f"cannot read engine sidecar {path}: {e}; rebuild the engine with "
                                f"`nanogpt-deploy build-engine MODEL_DIR --out ENGINE`") from None
        return cls.from_dict(d, str(path))

    def rebuild_command(self, engine: str | Path, max_batch: int | None = None, max_seq: int | None = None) -> str:
        src = Path(self.source_onnx).parent if self.source_onnx else Path("MODEL_DIR")
        return (f"nanogpt-deploy build-engine {src} --out {engine} --max-batch {max_batch or self.max_batch} "
                f"--max-seq {max_seq or self.max_seq}")

    # -- requests --

    def select_profile(self, batch: int, seq: int, past: int) -> int:
        """Index of the profile to run (batch, seq, past) with, or an error saying the limit and the fix.

        Of the profiles whose box holds every input shape, the tightest in sequence wins: a decode step
        (seq 1) runs on the decode profile, a prompt on the prefill profile.
        """
        block = self.artifact.config.block_size
        b_lo, b_hi = _dim_range(self.profiles, "input_ids", 0)
        s_lo, s_hi = _dim_range(self.profiles, "input_ids", 1)
        p_lo, p_hi = _dim_range(self.profiles, self.artifact.inputs[3], 2)
        need = past + seq
        fix = (f"rebuild with --max-seq {suggest_max_seq(need, block)}" if need <= block else
               f"that is beyond the model's block_size {block}: shorten the prompt or generate fewer tokens")
        if not b_lo <= batch <= b_hi:
            raise TensorRTError(f"engine profile allows batch {b_lo}..{b_hi}, request needs {batch}; "
                                f"rebuild with --max-batch {batch}")
        if not s_lo <= seq <= s_hi:
            raise TensorRTError(f"engine profile allows sequence {s_lo}..{s_hi}, request needs {seq}; {fix}")
        if not p_lo <= past <= p_hi:
            raise TensorRTError(f"engine profile allows past_sequence {p_lo}..{p_hi}, request needs {past}; {fix}")
        if need > self.max_seq:  # the profiles are boxes; the buffers hold max_seq positions in all
            raise TensorRTError(f"engine allows past_sequence + sequence up to {self.max_seq}, request needs "
                                f"{past} + {seq} = {need}; {fix}")
        shapes = io_shapes(self.artifact.config, batch, seq, past)
        fits = [k for k, p in enumerate(self.profiles) if profile_covers(p, shapes)]
        if not fits:  # only reachable with hand-made profiles: build_engine's two cover every request above
            raise TensorRTError(f"no engine profile holds batch {batch}, sequence {seq}, past {past} "
                                f"(profiles: {[p['name'] for p in self.profiles]}); rebuild the engine")
        return min(fits, key=lambda k: self.profiles[k]["shapes"]["input_ids"]["max"][1])


def resolve_engine(path: str | Path) -> Path:
    """`DIR` or `DIR/model.engine` -> the engine path, with a clear error when it is not there."""
    return resolve_file(path, ENGINE_NAME, "build one with `nanogpt-deploy build-engine MODEL_DIR --out ENGINE`")


def sidecar_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


# ---- compatibility ----------------------------------------------------------------------------------

def check_tensorrt_version(meta: EngineMeta, installed: str, engine: str | Path) -> None:
    """An engine is a plan for one TensorRT version: it only deserializes under the one that built it."""
    if meta.tensorrt_version != installed:
        raise TensorRTError(f"{engine} was built with TensorRT {meta.tensorrt_version}, this machine has TensorRT "
                            f"{installed}; an engine only loads on the TensorRT version that built it. Rebuild it "
                            f"here: {meta.rebuild_command(engine)}")


def check_gpu(meta: EngineMeta, name: str, compute_capability: str, engine: str | Path) -> None:
    """Another compute capability: error (the kernels are compiled for one architecture). Same capability,
    another model: a warning, as TensorRT itself gives (it runs, but the tactics were timed elsewhere)."""
    if meta.compute_capability != compute_capability:
        raise TensorRTError(f"{engine} was built for {meta.gpu_name} (compute capability {meta.compute_capability}), "
                            f"this machine's GPU is {name} (compute capability {compute_capability}); an engine "
                            f"runs only on the GPU architecture it was built for. Rebuild it here: "
                            f"{meta.rebuild_command(engine)}")
    if meta.gpu_name != name:
        warnings.warn(f"{engine} was built on {meta.gpu_name}, running on {name} (same compute capability "
                      f"{compute_capability}): it works, but its kernels were timed on the other GPU; for the best "
                      f"speed rebuild it here: {meta.rebuild_command(engine)}", stacklevel=3)


def check_engine(desc: dict, meta: EngineMeta, plan: "BufferPlan", where: str) -> None:
    """Check what the deserialized engine says (`describe_engine`) against the sidecar and the buffer plan.

    desc: {"inputs": [...], "outputs": [...], "dtypes": {name: numpy dtype name},
           "profiles": [{input: (min, opt, max)}, ...]}
    """
    art = meta.artifact
    check_io(art.inputs, desc["inputs"], "input", where)
    check_io(art.outputs, desc["outputs"], "output", where)
    expected = plan.dtypes()
    wrong = [f"{n}: engine {desc['dtypes'][n]}, expected {t}" for n, t in expected.items() if desc["dtypes"][n] != t]
    if wrong:
        raise ArtifactError(f"{where}: I/O dtypes differ from a {art.precision} artifact's: {'; '.join(wrong)}")
    if len(desc["profiles"]) != len(meta.profiles):
        raise ArtifactError(f"{where} has {len(desc['profiles'])} optimization profiles, its sidecar describes "
                            f"{len(meta.profiles)}; the sidecar belongs to another build: {meta.rebuild_command(where)}")
    for k, (got, want) in enumerate(zip(desc["profiles"], meta.profiles)):
        for name in art.inputs:
            g = tuple(tuple(int(d) for d in s) for s in got[name])
            w = tuple(tuple(want["shapes"][name][key]) for key in ("min", "opt", "max"))
            if g != w:
                raise ArtifactError(f"{where}: profile {k} ({want['name']}) of {name} is min/opt/max {g} in the engine, "
                                    f"{w} in its sidecar; the sidecar belongs to another build: {meta.rebuild_command(where)}")


# ---- the buffer plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BufferSpec:
    name: str
    shape: tuple  # the largest tensor it must hold
    dtype: str  # numpy dtype name

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class BufferPlan:
    """Every device buffer the backend allocates, once, for (max_batch, max_seq)."""
    inputs: tuple  # BufferSpec for input_ids, attention_mask, position_ids
    logits: BufferSpec
    kv: tuple  # two sets (ping-pong), each a BufferSpec per past_key_values.{i}.{key,value}, in I/O order
    past_names: tuple
    present_names: tuple

    @property
    def buffers(self) -> list[BufferSpec]:
        return [*self.inputs, self.logits, *self.kv[0], *self.kv[1]]

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def dtypes(self) -> dict[str, str]:
        d = {b.name: b.dtype for b in self.inputs}
        d[self.logits.name] = self.logits.dtype
        for past, present, buf in zip(self.past_names, self.present_names, self.kv[0]):
            d[past] = d[present] = buf.dtype
        return d

    def kv_addresses(self, pointers: tuple[list[int], list[int]], current: int) -> dict[str, int]:
        """Tensor name -> device address for one step: past reads set `current`, present writes the other."""
        past, present = pointers[current], pointers[1 - current]
        return {**dict(zip(self.past_names, past)), **dict(zip(self.present_names, present))}


def rewind_copy(batch: int, n_head: int, head_dim: int, itemsize: int, past: int, length: int,
                start: int = 0) -> tuple[int, int, int, int, int]:
    """cudaMemcpy2D's (source offset, dst pitch, src pitch, width, height), all in bytes but height, that repack
    a packed (batch, n_head, past, head_dim) cache into a packed (batch, n_head, length, head_dim) one: one row
    per (batch, head), keeping its positions [start, start + length) (rewind: start 0; drop_front: start n)."""
    row = head_dim * itemsize
    return start * row, length * row, past * row, length * row, batch * n_head


def plan_buffers(artifact: Artifact, max_batch: int, max_seq: int) -> BufferPlan:
    c = artifact.config
    ids = [BufferSpec(n, (max_batch, max_seq), "int64") for n in artifact.inputs[:3]]  # mask: P+T <= max_seq
    # a prefill of max_seq; a logits="last" engine returns one position whatever the prefill length
    logits = BufferSpec("logits", (max_batch, artifact.logits_positions(max_seq), c.vocab_size), artifact.kv_dtype)
    # one buffer holds past (P <= max_seq - 1) or present (P + T <= max_seq), packed at its start
    kv_shape = (max_batch, c.n_head, max_seq, c.head_dim)
    sets = tuple(tuple(BufferSpec(f"kv{s}:{n}", kv_shape, artifact.kv_dtype) for n in artifact.inputs[3:])
                 for s in (0, 1))
    return BufferPlan(tuple(ids), logits, sets, tuple(artifact.inputs[3:]), tuple(artifact.outputs[1:]))


# ---- the backend -------------------------------------------------------------------------------------

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


class TensorRTBackend:
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
            raise ArtifactError(f"{path} is {path.stat().st_size} bytes, its sidecar describes a {meta.engine_bytes}-byte "
                                f"engine; one of them is from another build: {meta.rebuild_command(path)}")
        trt, cudart = import_tensorrt(), import_cudart()
        check_tensorrt_version(meta, trt.__version__, path)
        gpu_name, cc = current_gpu(cudart, device)
        check_gpu(meta, gpu_name, cc, path)

        self.meta, self.artifact, self.path = meta, meta.artifact, path
        self.config, self.precision = meta.serving_config, meta.precision
        self.tf32 = bool(meta.build.get("tf32", True))  # engines built before the flag was recorded: TensorRT's default
        self.provider = f"cuda:{device} ({gpu_name})"
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
        self._batch, self._length, self._current = 0, 0, 0

    def _on_device(self) -> None:
        """Make this backend's GPU current for the calling thread (CUDA's current device is per host thread, and
        the server steps from its scheduler thread, not the one that opened the engine)."""
        cuda_call(self._cudart, self._cudart.cudaSetDevice(self._device), "cudaSetDevice")

    def _malloc(self, nbytes: int, what: str) -> int:
        ptr = int(cuda_call(self._cudart, self._cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({what}, {nbytes} bytes)"))
        self._ptrs.append(ptr)
        return ptr

    @property
    def past_length(self) -> int:
        return self._length

    def reset(self, batch_size: int) -> None:
        self.meta.select_profile(batch_size, 1, 0)  # the batch limit, said before any step
        self._batch, self._length, self._current = batch_size, 0, 0

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        self._on_device()
        cudart, ctx = self._cudart, self.context
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        pos = np.ascontiguousarray(position_ids, dtype=np.int64)
        B, T = ids.shape
        if B != self._batch:
            if self._length:
                raise BackendError(f"batch size changed from {self._batch} to {B} mid-sequence; call reset({B}) first")
            self.reset(B)
        P = self._length
        check_step(self.config, ids, mask, pos, P)
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
        self._current, self._length = 1 - self._current, P + T  # this step's present is the next step's past
        return logits.astype(np.float32, copy=False)

    def rewind(self, length: int) -> None:
        """Drop the cache's positions past `length`: a device-to-device repack of the current past set into the
        other ping-pong set (the packed layout's row pitch changes), which becomes the past."""
        if check_rewind(length, self._length):
            self._repack(0, length)

    def drop_front(self, n: int) -> None:
        """Drop every row's first n positions: the same repack as rewind, from position n on."""
        length = check_drop_front(n, self._length)
        if n:
            self._repack(n, length)

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
                                                           width, height, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
                                                           self._stream),
                          "repack the KV cache (cudaMemcpy2DAsync)")
            cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._current, self._length = 1 - self._current, length

    def keep_rows(self, rows) -> None:
        """Keep only these rows: each run of kept rows (pack_rows) is copied device to device into the other
        ping-pong set, which becomes the past; a row of the packed past is n_head * length * head_dim."""
        rows = check_keep_rows(rows, self._batch)
        if len(rows) == self._batch:
            return
        self._on_device()
        cudart, c = self._cudart, self.config
        block = c.n_head * self._length * c.head_dim * np.dtype(self.artifact.kv_dtype).itemsize
        src, dst = self._kv[self._current], self._kv[1 - self._current]
        if block:
            for s_ptr, d_ptr in zip(src, dst):
                for d, r, n in pack_rows(rows, in_place=False):
                    cuda_call(cudart, cudart.cudaMemcpyAsync(d_ptr + d * block, s_ptr + r * block, n * block,
                                                             cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self._stream),
                              "keep rows of the KV cache (cudaMemcpyAsync)")
            cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._current, self._batch = 1 - self._current, len(rows)

    def add_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Prefill new rows as their own batch and append them (Backend.add_rows): the running rows' cache and
        the new rows' are merged, right-aligned, through host memory (the packed layout's row pitch changes
        with the width), into the set that becomes the past."""
        B, L, current = self._batch, self._length, self._current
        width = check_add_rows(self.config, input_ids, attention_mask, position_ids, B, L)
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
        self._batch, self._length = B + input_ids.shape[0], width
        return logits

    def _download(self, kv_set: int, batch: int, length: int) -> list[np.ndarray]:
        """The packed (batch, n_head, length, head_dim) cache tensors of one ping-pong set, on the host."""
        c, cudart = self.config, self._cudart
        out = [np.empty((batch, c.n_head, length, c.head_dim), np.dtype(self.artifact.kv_dtype)) for _ in self._kv[kv_set]]
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
