"""Compile an exported model.onnx into a TensorRT engine, with the sidecar the TensorRT backend reads.

    from export.tensorrt import build_engine
    build_engine("out/tiny", "out/tiny/model.engine", max_batch=8, max_seq=128)
    # or: nanogpt-deploy build-engine out/tiny --out out/tiny/model.engine --max-seq 128

The network is strongly typed (TensorRT 11 has no other kind; 10.x needs the flag): an fp32 model.onnx
gives an fp32 engine, an fp16 one (`nanogpt-deploy export --dtype fp16`) an fp16 engine -- there is
no BuilderFlag.FP16. The graph is parsed with `parse_from_file` so model.onnx.data is found beside it.
Two optimization profiles cover every request with past + sequence <= max_seq: "prefill" (sequence
1..max_seq, past 0..max_seq-1, tuned for a prompt of opt_seq tokens) and "decode" (sequence 1, past
0..max_seq-1, tuned for one token on a half-full context). In min, opt and max alike attention_mask is
past + sequence, because every shape comes from one function (`io_shapes`). The timing cache is loaded
before and saved (atomically) after each build, so a second build on the same GPU skips most tactic
timing. The engine and its model.engine.json sidecar are written atomically.

Profile computation and flag validation are plain Python (unit-tested on CPU); `build_engine` needs
`pip install 'nanogpt-deploy[tensorrt]'` and an NVIDIA GPU.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import sys
import threading
import time
from pathlib import Path

from model.config import GPTConfig
from runtime.artifact import check_io, read_onnx_artifact, resolve_onnx, sidecar_path
from runtime.files import atomic_path, atomic_write_bytes
from runtime.trt_cuda import cuda_call, current_gpu, import_cudart, import_tensorrt
from runtime.trt_plan import EngineMeta, TensorRTError, io_shapes

DEFAULT_MAX_BATCH = 8
DEFAULT_OPT_BATCH = 1
DEFAULT_OPT_SEQ = 128  # a typical prompt; capped at max_seq
DEFAULT_WORKSPACE_GB = 4.0
ENGINE_PRECISIONS = ("fp32", "fp16")


class EngineBuildError(RuntimeError):
    """A build that cannot start (bad flags) or that TensorRT refused."""


def check_precision(precision: str) -> None:
    """fp32 and fp16 graphs are plain ONNX; the q8/int8/int4 variants use onnxruntime's own quantized ops."""
    if precision not in ENGINE_PRECISIONS:
        raise EngineBuildError(f"a {precision} model.onnx cannot become a TensorRT engine: its quantized ops "
                               f"(MatMulInteger / MatMulNBits) are onnxruntime's; build from the fp32 export or its "
                               f"fp16 variant (`nanogpt-deploy export SOURCE --out DIR --dtype fp16`)")


def check_kv_cache(kv_cache: str) -> None:
    """An in-place ("shared") KV cache is onnxruntime's GroupQueryAttention, which TensorRT's parser lacks."""
    if kv_cache != "concat":
        raise EngineBuildError(f"a kv_cache={kv_cache!r} model.onnx cannot become a TensorRT engine: its "
                               f"GroupQueryAttention is onnxruntime's own operator; export again without "
                               f"`--kv-cache {kv_cache}` (TensorRT builds from the standard concat graph)")


def resolve_limits(config: GPTConfig, max_batch: int = DEFAULT_MAX_BATCH, max_seq: int | None = None,
                   opt_batch: int = DEFAULT_OPT_BATCH, opt_seq: int | None = None,
                   workspace_gb: float = DEFAULT_WORKSPACE_GB) -> dict:
    """The build flags with defaults filled in (max_seq: block_size), or an error naming the flag and the fix."""
    block = config.block_size
    max_seq = block if max_seq is None else max_seq
    if max_batch < 1:
        raise EngineBuildError(f"--max-batch {max_batch} must be at least 1")
    if not 1 <= max_seq <= block:
        raise EngineBuildError(f"--max-seq {max_seq} is outside 1..{block} (the model's block_size: positions it has "
                               f"weights for); use --max-seq {block} or less")
    opt_seq = min(DEFAULT_OPT_SEQ, max_seq) if opt_seq is None else opt_seq
    if not 1 <= opt_batch <= max_batch:
        raise EngineBuildError(f"--opt-batch {opt_batch} is outside 1..{max_batch} (--max-batch); lower --opt-batch "
                               f"or raise --max-batch")
    if not 1 <= opt_seq <= max_seq:
        raise EngineBuildError(f"--opt-seq {opt_seq} is outside 1..{max_seq} (--max-seq); lower --opt-seq or raise "
                               f"--max-seq")
    if not workspace_gb > 0:
        raise EngineBuildError(f"--workspace-gb {workspace_gb} must be positive (TensorRT's scratch memory limit)")
    return dict(max_batch=max_batch, max_seq=max_seq, opt_batch=opt_batch, opt_seq=opt_seq, workspace_gb=workspace_gb)


def compute_profiles(config: GPTConfig, max_batch: int, max_seq: int, opt_batch: int, opt_seq: int) -> list[dict]:
    """min/opt/max shapes of every input for the prefill and decode profiles (JSON-ready lists).

    A profile is a box per input, and every (batch, seq, past) with past + seq <= max_seq lies in the
    prefill box; decode steps (seq 1) also lie in the tighter decode box, which the runtime prefers.
    The prefill box's max corner (seq max_seq with past max_seq-1, mask 2*max_seq-1) is never requested
    -- the runtime enforces past + seq <= max_seq -- but each corner must be a consistent shape set.
    """
    def profile(name, lo, opt, hi):  # (batch, seq, past) per corner
        corners = [io_shapes(config, *c) for c in (lo, opt, hi)]
        return {"name": name, "shapes": {n: {k: list(s[n]) for k, s in zip(("min", "opt", "max"), corners)}
                                         for n in corners[0]}}

    last = max_seq - 1  # the longest past a step can have (it adds at least one position)
    decode_opt_past = min(last, (opt_seq + max_seq) // 2)  # halfway between a typical prompt and a full context
    return [
        profile("prefill", (1, 1, 0), (opt_batch, opt_seq, 0), (max_batch, max_seq, last)),
        profile("decode", (1, 1, 0), (opt_batch, 1, decode_opt_past), (max_batch, 1, last)),
    ]


def onnx_sha256(onnx_path: Path) -> str:
    """sha256 over model.onnx and its external data files (model.onnx.data*), in name order."""
    h = hashlib.sha256()
    for f in [onnx_path, *sorted(onnx_path.parent.glob(onnx_path.name + ".data*"))]:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def default_timing_cache(tensorrt_version: str, compute_capability: str) -> Path:
    """One cache per TensorRT version and GPU architecture: a cache from elsewhere would be rejected anyway."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanogpt-deploy" / "tensorrt"
    return root / f"timing-trt{tensorrt_version}-sm{compute_capability.replace('.', '')}.cache"


def parser_errors(parser) -> str:
    """All of the ONNX parser's errors, one per line, with the node they concern."""
    lines = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        try:
            where = f"node {e.node()} ({e.node_name() or '?'}: {e.node_operator() or '?'})" if e.node() >= 0 else "graph"
            lines.append(f"  [{i + 1}] {where}: {e.desc()}")
        except AttributeError:  # older bindings: the error's own string
            lines.append(f"  [{i + 1}] {e}")
    return "\n".join(lines)


def _progress_monitor(trt, out):
    """A trt.IProgressMonitor printing the build's phases (top two levels) with elapsed time."""

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.t0, self.lock, self.cancelled = time.perf_counter(), threading.Lock(), False
            self.phases = {}  # name -> (depth, steps)

        def _say(self, depth, msg):
            with self.lock:  # TensorRT may call from its own threads
                print(f"[{time.perf_counter() - self.t0:7.1f}s] {'  ' * depth}{msg}", file=out, flush=True)

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = self.phases[parent_phase][0] + 1 if parent_phase in self.phases else 0
            self.phases[phase_name] = (depth, num_steps)
            if depth <= 1:
                self._say(depth, f"{phase_name} ({num_steps} step{'s' * (num_steps != 1)})")

        def step_complete(self, phase_name, step):
            try:
                depth, steps = self.phases.get(phase_name, (9, 0))
                if depth == 0 and steps > 1:
                    self._say(depth, f"{phase_name}: {step + 1}/{steps}")
            except KeyboardInterrupt:  # Ctrl-C lands in whichever callback runs: cancel, do not unwind C++
                self.cancelled = True
            return not self.cancelled  # False asks TensorRT to stop the build

        def phase_finish(self, phase_name):
            self.phases.pop(phase_name, None)

    return BuildProgress()


def set_tf32(trt, config, tf32: bool) -> None:
    """TensorRT turns BuilderFlag.TF32 on in every new builder config: fp32 layers may then run in TF32 (a 10-bit
    mantissa, ~1e-3 off fp32). An fp32 engine is fp32 unless `tf32` asks for the speed."""
    if tf32:
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike | None = None, *,
                 max_batch: int = DEFAULT_MAX_BATCH, max_seq: int | None = None, opt_batch: int = DEFAULT_OPT_BATCH,
                 opt_seq: int | None = None, workspace_gb: float = DEFAULT_WORKSPACE_GB,
                 timing_cache: str | os.PathLike | None | bool = True, device: int = 0, verbose: bool = False,
                 tf32: bool = False, progress=sys.stderr) -> EngineMeta:
    """Build a TensorRT engine from an exported model.onnx and write it with its sidecar, atomically.

    Args:
        onnx_path: an export folder or its model.onnx (fp32 or fp16; the engine keeps its precision).
        engine_path: where to write the engine (default: model.engine beside model.onnx); the sidecar
            goes to ENGINE.json.
        max_batch, max_seq: the largest batch and total context (past + sequence) the engine serves;
            max_seq defaults to the model's block_size. Device buffers are sized for both.
        opt_batch, opt_seq: the shapes TensorRT tunes its kernels for (prompt length; decode is tuned
            for one token on a half-full context).
        workspace_gb: TensorRT's scratch memory limit while building and running.
        timing_cache: a path, True for the per-GPU default under ~/.cache/nanogpt-deploy, or
            None/False for none. Loaded before the build, saved after it.
        device: the CUDA device to build on (the engine runs on GPUs of its compute capability).
        verbose: TensorRT's own verbose log.
        tf32: let fp32 layers run in TF32 (faster, ~1e-3 off); off by default (set_tf32), recorded in the sidecar.
        progress: a text stream for build progress, or None for silence.

    Returns:
        the EngineMeta written to the sidecar.
    """
    onnx_path = resolve_onnx(onnx_path)
    engine_path = Path(engine_path) if engine_path else onnx_path.parent / "model.engine"
    trt, cudart = import_tensorrt(), import_cudart()  # before any work: the missing extra is the first thing said
    art = read_onnx_artifact(onnx_path)
    check_precision(art.precision)
    check_kv_cache(art.kv_cache)
    limits = resolve_limits(art.config, max_batch, max_seq, opt_batch, opt_seq, workspace_gb)
    profiles = compute_profiles(art.config, limits["max_batch"], limits["max_seq"], limits["opt_batch"],
                                limits["opt_seq"])
    gpu_name, cc = current_gpu(cudart, device)
    cuda_call(cudart, cudart.cudaSetDevice(device), "cudaSetDevice")  # the builder times kernels on this GPU
    say = (lambda msg: print(msg, file=progress, flush=True)) if progress else (lambda msg: None)
    say(f"building a TensorRT {trt.__version__} engine from {onnx_path} ({art.precision}) on {gpu_name} "
        f"(sm_{cc.replace('.', '')}): batch <= {limits['max_batch']}, context <= {limits['max_seq']}")

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # strongly typed: precision comes from the graph's own types (TensorRT 11 accepts and ignores the flag)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so model.onnx.data is found beside it
        raise EngineBuildError(f"TensorRT {trt.__version__}'s ONNX parser rejected {onnx_path} "
                               f"({parser.num_errors} error{'s' * (parser.num_errors != 1)}):\n{parser_errors(parser)}")
    check_io(art.inputs, [network.get_input(i).name for i in range(network.num_inputs)], "input", str(onnx_path))
    check_io(art.outputs, [network.get_output(i).name for i in range(network.num_outputs)], "output", str(onnx_path))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(limits["workspace_gb"] * (1 << 30)))
    set_tf32(trt, config, tf32)
    for p in profiles:
        prof = builder.create_optimization_profile()
        for name, s in p["shapes"].items():
            prof.set_shape(name, s["min"], s["opt"], s["max"])
        if config.add_optimization_profile(prof) < 0:
            raise EngineBuildError(f"TensorRT rejected the {p['name']} optimization profile: {p['shapes']}")

    cache_path = (default_timing_cache(trt.__version__, cc) if timing_cache is True else
                  Path(timing_cache) if timing_cache else None)
    cache_blob = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_blob)
    if not config.set_timing_cache(cache, False):  # False: refuse a cache from another GPU
        say(f"timing cache {cache_path} is from another TensorRT or GPU; starting a fresh one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    elif cache_blob:
        say(f"timing cache {cache_path} ({len(cache_blob) / 1e6:.1f} MB) loaded")
    monitor = _progress_monitor(trt, progress) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor  # kept alive by `monitor` until the build returns

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if monitor is not None and monitor.cancelled:
        raise KeyboardInterrupt
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path} (its log above says why; "
                               f"--verbose shows more). Lower --max-batch / --max-seq or raise --workspace-gb if it "
                               f"ran out of memory")
    if cache_path:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))

    meta = EngineMeta(
        artifact=art, tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=cc,
        profiles=profiles, max_batch=limits["max_batch"], max_seq=limits["max_seq"],
        source_onnx=str(onnx_path.resolve()), source_onnx_sha256=onnx_sha256(onnx_path),
        engine_bytes=serialized.nbytes,
        build=dict(tf32=bool(tf32), opt_batch=limits["opt_batch"], opt_seq=limits["opt_seq"], workspace_gb=limits["workspace_gb"],
                   timing_cache=str(cache_path) if cache_path else None, build_seconds=round(seconds, 2),
                   built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")))
    # sidecar first, engine last: a crash in between leaves an engine whose size the sidecar does not match
    meta.write_json(sidecar_path(engine_path))
    with atomic_path(engine_path) as tmp, open(tmp, "wb") as f:
        f.write(memoryview(serialized))
    return meta


__all__ = ["EngineBuildError", "TensorRTError", "build_engine", "check_kv_cache", "check_precision", "compute_profiles",
           "resolve_limits", "set_tf32"]
