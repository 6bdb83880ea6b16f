"""What a TensorRT engine says about itself and what running it takes, in plain Python (no tensorrt, no cuda).

The engine's JSON sidecar (`sidecar_path(engine)`: ENGINE + ".json", so model.engine.json or x.plan.json) says
what it was built from and for: TensorRT version, GPU, precision, optimization profiles, the source
model.onnx hash and its Artifact (`EngineMeta`). Beside it: the graph's shape relations (`io_shapes`),
profile selection, the compatibility checks made at load, and the buffer plan (every device buffer the
backend allocates, once). The builder (export/tensorrt.py), the backend (runtime/backends/tensorrt.py) and
the benchmark all read engines through this module; all of it is unit-tested on CPU.

    meta = EngineMeta.read_json(sidecar_path("out/tiny/model.engine"))
    meta.select_profile(batch=2, seq=1, past=40)   # the profile index, or the limit and the fix
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from model.config import GPTConfig

# ENGINE_NAME, resolve_engine, sidecar_path: the file names live with the rest in artifact.py (imported from here too)
from .artifact import ENGINE_NAME, Artifact, ArtifactError, Record, check_io, input_names, resolve_engine, sidecar_path  # noqa: F401

ENGINE_FORMAT = "nanogpt-deploy-engine/1"


class TensorRTError(RuntimeError):
    """TensorRT missing, an engine that does not fit this machine, or a request outside its profiles."""


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
class EngineMeta(Record):
    """What model.engine.json says about its engine (written by export.tensorrt.build_engine)."""
    FORMAT: ClassVar[str] = ENGINE_FORMAT
    KIND: ClassVar[str] = "engine sidecar"
    READ_HINT: ClassVar[str] = "; rebuild the engine with `nanogpt-deploy build-engine MODEL_DIR --out ENGINE`"
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
        d = super().to_dict()
        d["precision"] = self.precision
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "engine sidecar") -> EngineMeta:
        cls._check_format(d, f"{where} is not a nanogpt-deploy engine sidecar",
                          "build the engine with `nanogpt-deploy build-engine`")
        try:
            art = Artifact.from_dict(d["artifact"], where)
            meta = cls(artifact=art, **cls._plain_fields(d, "artifact"))
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


def check_engine(desc: dict, meta: EngineMeta, plan: BufferPlan, where: str) -> None:
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
