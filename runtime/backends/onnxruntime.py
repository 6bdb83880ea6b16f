"""The onnxruntime backend: one exported model.onnx on the CPU or CUDA execution provider, no torch.

The KV cache never round-trips through numpy. Each step binds the previous step's `present.*` OrtValues
as this step's `past_key_values.*` inputs (IO binding) and lets onnxruntime allocate the new presents on
the cache's device: host memory on CPU, GPU memory on CUDA, where the cache stays between steps. Only
the ids / mask / positions go in from numpy and only the logits come out to numpy.

A graph exported with `--kv-cache shared` (GroupQueryAttention, export/kv_shared.py) instead gets one
buffer per cache tensor, (B, n_head, capacity, head_dim), bound once as both its past input and its
present output: onnxruntime writes each step's keys and values into it in place, nothing is copied, and
a decode step rebinds only ids / mask / positions / logits. Rows are left-aligned there (row b's tokens
at slots [0, n_b)), so a left-padded prefill, or a multi-token step after a past, runs row by row on each
row's real tokens (the graph's batch-1 case); the capacity doubles when a sequence outgrows it.

    backend = OnnxRuntimeBackend("out/tiny", provider="cpu", threads=2)
    backend.reset(batch_size=1)
    logits = backend.forward(ids, mask, positions)   # (B, T, V) float32; the cache grows by T
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from ..artifact import Artifact, ArtifactError, check_io, check_weights, resolve_onnx
from .ort_graph import BUCKETS
from . import BackendError, check_add_rows, check_drop_front, check_keep_rows, check_rewind, check_step, merge_rows, pack_rows

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
MIN_CAPACITY = 128  # kv_cache="shared": positions a cache buffer holds at least (it doubles when outgrown)
# kv_cache="shared": a longer single-row prompt is prefilled in chunks of this many tokens. The attention
# kernels compute the full (sequence x total) score matrix and mask its causal half; chunks skip most of it
# (a 512-token prompt on the 124M shape, 2 CPU threads: 411 -> 382 ms). 128 is slower again (MatMul efficiency).
PREFILL_CHUNK = 256


def cuda_provider_options(device_id: int = 0, tf32: bool = False) -> dict:
    """CUDAExecutionProvider's options. The CUDA EP runs fp32 MatMuls in TF32 unless told not to (10-bit
    mantissa: the 124M fp32 export differed from the CPU reference by 2.5e-3), so fp32 means fp32 here unless
    `tf32` asks for the speed."""
    return {"device_id": str(int(device_id)), "use_tf32": "1" if tf32 else "0"}


class OnnxRuntimeBackend:
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
            tf32: provider="cuda": let fp32 MatMuls run in TF32 (faster, ~1e-3 off); off by default
                (cuda_provider_options). `self.tf32` says which ran (always False on the CPU).
            verify_weights: check the sha256 of model.onnx.data against the digest recorded at export (about
                1 s per 500 MB, README) and refuse a damaged or foreign weights file; False skips it (CLI
                --no-verify-weights). An artifact exported before digests were recorded loads with a warning.
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
        providers = [(ep, cuda_provider_options(device_id, tf32)), "CPUExecutionProvider"] if provider == "cuda" else [ep]
        self.session = _open_session(ort, path, so, providers)
        if self.session.get_providers()[0] != ep:  # onnxruntime falls back to CPU when CUDA libraries are missing
            raise BackendError(f"{path}: onnxruntime could not start {ep} (session runs on "
                               f"{self.session.get_providers()}); check the CUDA / cuDNN libraries onnxruntime-gpu needs")

        self.artifact = Artifact.from_metadata(self.session.get_modelmeta().custom_metadata_map, str(path))
        if verify_weights and (note := check_weights(path, self.artifact)):
            warnings.warn(note, stacklevel=2)
        check_io(self.artifact.inputs, [i.name for i in self.session.get_inputs()], "input", str(path))
        check_io(self.artifact.outputs, [o.name for o in self.session.get_outputs()], "output", str(path))
        self.config = self.artifact.config
        self.precision = self.artifact.precision
        self.provider = ep
        self.tf32 = bool(tf32) and provider == "cuda"
        self.path = path
        self._ort = ort
        self._device = "cuda" if provider == "cuda" else "cpu"
        self._device_id = device_id
        self._kv_dtype = np.dtype(self.artifact.kv_dtype)
        self._past_names = self.artifact.inputs[3:]
        self._present_names = self.artifact.outputs[1:]
        self._io = self.session.io_binding()
        self._past: list | None = None  # OrtValues, one per past_key_values.* input
        self._past_host: list | None = None  # CPU: the numpy arrays _past wraps, when this backend made them
        self._batch = 0
        self._length = 0  # positions in the cache (the mask's width so far)
        self.kv_cache = self.artifact.kv_cache
        if self.kv_cache == "shared" and provider == "cuda" and self.precision != "fp16":
            raise BackendError(f"{path}: a kv_cache='shared' graph runs GroupQueryAttention, which onnxruntime's CUDA "
                               f"provider has in fp16 only (this graph is {self.precision}); export it with "
                               f"`--dtype fp16 --kv-cache shared`, or use --provider cpu")
        self._cache: list = []  # shared: one buffer per past/present pair (numpy on CPU, OrtValue on CUDA)
        self._base: list = []  # shared, CPU: the arrays _cache views (room for rows joining the batch)
        self._rows = np.zeros(0, np.int64)  # shared: real tokens cached per row
        self._capacity = 0  # shared: positions each buffer holds
        self._bound = None  # shared: which rows the cache bindings point at (None: none, -1: all, b: row b)
        self.decode = _decode_mode(decode, self.kv_cache, provider, path)
        self._static = None  # StaticDecode, made with the fixed buffers
        self._static_capacity = min(int(graph_capacity or self.config.block_size), self.config.block_size)
        self._run_options = None
        if self.decode == "graph":  # capture needs the provider option; the session is opened again with it
            providers = [(ep, {**cuda_provider_options(device_id, tf32), "enable_cuda_graph": "1"}), "CPUExecutionProvider"]
            self.session = _open_session(ort, path, so, providers)
            self._io = self.session.io_binding()
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("gpu_graph_id", "-1")  # uncaptured: prefill, surgery

    @property
    def past_length(self) -> int:
        return self._length

    def reset(self, batch_size: int) -> None:
        c = self.config
        if self.kv_cache == "shared":
            self._batch, self._length, self._bound, self._capacity = batch_size, 0, None, 0
            self._rows = np.zeros(batch_size, np.int64)
            if self.decode == "dynamic":
                self._cache = []  # allocated by the first forward, sized to it
            return
        # Step 0's empty past (B, nh, 0, hs): zero-length host tensors; zero bytes to copy even on CUDA
        empty = np.zeros((batch_size, c.n_head, 0, c.head_dim), dtype=self._kv_dtype)
        ov = self._ort.OrtValue.ortvalue_from_numpy(empty)
        self._past, self._past_host = [ov] * len(self._past_names), None
        self._batch, self._length = batch_size, 0

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        B, T = input_ids.shape
        if B != self._batch:  # 0 before the first reset
            if self._length:
                raise BackendError(f"batch size changed from {self._batch} to {B} mid-sequence; call reset({B}) first")
            self.reset(B)
        check_step(self.config, input_ids, attention_mask, position_ids, self._length)
        if self.kv_cache == "shared":
            return self._forward_shared(input_ids, attention_mask, position_ids)

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
        self._past, self._past_host = list(outputs[1:]), None  # stays on the device: next step's past
        self._length += T
        return outputs[0].numpy().astype(np.float32, copy=False)  # (B, artifact.logits_positions(T), V)

    def rewind(self, length: int) -> None:
        """Drop the cache's positions past `length`. Shared buffers: only the row lengths change (the dropped
        slots are overwritten by the next forward). Concat on the CPU: each present is compacted in its own
        buffer, no allocation (a fresh 94 MB copy of a batch-8 124M cache cost 15-48 ms, mostly page faults;
        in place, 9 ms); on CUDA, a copy of the kept part through host memory."""
        drop = check_rewind(length, self._length)
        if not drop:
            return
        if self.kv_cache == "shared":
            if (self._rows < drop).any():
                raise BackendError(f"cannot rewind {drop} positions: a row holds only {int(self._rows.min())} real tokens")
            self._rows -= drop
        else:
            self._put([_compact(a, length) if self._device == "cpu" else a[:, :, :length] for a in self._host()])
        self._length = length

    def drop_front(self, n: int) -> None:
        """Drop every row's first n positions. Shared buffers: rows are left-aligned there (no padding is cached),
        so only the mask's width shrinks. Concat: compacted in place on the CPU, through host memory on CUDA."""
        length = check_drop_front(n, self._length)
        if not n:
            return
        if self.kv_cache == "shared":
            if (self._length - self._rows < n).any():
                raise BackendError(f"cannot drop the first {n} positions: a row holds real tokens there")
        else:
            self._put([_compact(a, length, n) if self._device == "cpu" else a[:, :, n:] for a in self._host()])
        self._length = length

    def keep_rows(self, rows) -> None:
        """Keep only these rows of the cache. On the CPU the kept rows move to the front of their own buffers
        (no allocation); on CUDA, a copy of the kept rows through host memory."""
        rows = check_keep_rows(rows, self._batch)
        if len(rows) == self._batch:
            return
        if self.kv_cache == "shared":
            if self._device == "cpu":
                self._cache = [_keep(buf, rows) for buf in self._cache]
            elif self._static is not None:  # same addresses: the captured graphs read these buffers
                for buf in self._cache:
                    host = buf.numpy()
                    buf.update_inplace(np.ascontiguousarray(np.concatenate([host[rows], host[len(rows):]])))
            else:
                self._cache = [self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(buf.numpy()[rows]),
                                                                      self._device, self._device_id)
                               for buf in self._cache]
            self._rows, self._bound = self._rows[rows], None
        else:
            self._put([_keep(a, rows) if self._device == "cpu" else a[rows] for a in self._host()])
        self._batch = len(rows)

    def add_rows(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """Prefill new rows and append them to the batch (Backend.add_rows). Concat graph: the new rows run as
        their own batch, then both caches are merged, right-aligned (through host memory on CUDA). Shared
        buffers: the buffers gain the rows, each prefilled alone on its real tokens (rows are left-aligned
        there, so no row gains padding; only the mask's width follows the widest)."""
        B, L = self._batch, self._length
        width = check_add_rows(self.config, input_ids, attention_mask, position_ids, B, L)
        n = input_ids.shape[0]
        n_new = (attention_mask != 0).sum(1)
        if self.kv_cache == "shared":
            if not all(attention_mask[j, -c:].all() for j, c in enumerate(n_new) if c):
                raise BackendError("add_rows: the new rows' attention_mask must pad on the left only")
            self._reserve(width, B + n)
            rows = self._rows
            self._rows, self._batch = np.concatenate([rows, np.zeros(n, np.int64)]), B + n
            try:
                logits = self._run_rows(range(B, B + n), input_ids, position_ids, n_new)
            except Exception:  # the running rows' cache is untouched: they go on alone
                self._rows, self._batch, self._bound = rows, B, None
                if self._device == "cpu":  # views; a CUDA buffer keeps its rows (bindings give the batch's shape)
                    self._cache = [c[:B] for c in self._cache]
                raise
            self._rows[B:] = n_new
            self._length = width
            return logits
        old, old_host = self._past, self._host()
        self.reset(n)
        try:
            logits = self.forward(input_ids, attention_mask, position_ids)
        except Exception:  # the running rows' cache is untouched
            self._past, self._past_host, self._batch, self._length = old, old_host, B, L
            raise
        self._put([merge_rows(o, nw) for o, nw in zip(old_host, self._host())])
        self._batch, self._length = B + n, width
        return logits

    def _host(self) -> list[np.ndarray]:
        """The concat cache as host arrays: on the CPU, views whose memory stays alive while they do (the arrays
        _put wrapped, or views of onnxruntime's own outputs); on CUDA, copies."""
        if self._past_host is not None:
            return self._past_host
        return [v.numpy() for v in self._past]

    def _put(self, arrays: list[np.ndarray]) -> None:
        """Make these host arrays the concat cache: wrapped without a copy on the CPU, copied to the GPU on CUDA.
        On the CPU the arrays stay referenced here, and _host hands them out again, never `OrtValue.numpy()`
        of the wrappers: that view's base holds the OrtValue but not the numpy array it was made from, so an
        in-place view of it outlives the memory once the wrapper goes (keep_rows then rewind read freed
        onnxruntime arena memory that way)."""
        ort = self._ort
        if self._device == "cpu":
            self._past, self._past_host = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays], list(arrays)
        else:
            self._past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self._device, self._device_id)
                          for a in arrays]
            self._past_host = None

    # ------------------------------------------------------------------ kv_cache="shared"

    def _forward_shared(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        B, T = input_ids.shape
        new = attention_mask[:, -T:] != 0  # (B, T): which new positions are real (padding is on the left)
        n_new = new.sum(1)
        if not all(new[b, T - n:].all() for b, n in enumerate(n_new)):
            raise BackendError("attention_mask pads inside the new tokens; a kv_cache='shared' graph takes padding "
                               "on the left of a prompt only")
        if not np.array_equal(attention_mask.sum(1), self._rows + n_new):
            raise BackendError("attention_mask disagrees with the cache (its ones must count each row's cached + new "
                               "tokens); pass the same growing mask every step, or reset()")
        self._reserve(self._length + T)
        if T == 1 or (self._length == 0 and new.all() and (B > 1 or T <= PREFILL_CHUNK)):
            # decode (rows may differ in length), or an unpadded batched prefill: one call
            if not new.all():
                raise BackendError("a decode step's newest mask column must be 1 for every row")
            if T == 1 and self._static is not None and self._static.fits(B, int(self._rows.max())):
                logits = self._static.run(input_ids, position_ids, self._rows)
            else:
                if self._static is not None and T == 1:
                    self._static.note_fallback(f"batch {B} or {int(self._rows.max()) + 1} positions past the buckets")
                logits = self._run_shared(input_ids, attention_mask, position_ids, rows=-1)
        else:  # left-padded prefill, a step after a past, or a long prompt: row by row, real tokens only
            logits = self._run_rows(range(B), input_ids, position_ids, n_new)
        self._rows += n_new
        self._length += T
        return logits

    def _run_rows(self, rows, input_ids: np.ndarray, position_ids: np.ndarray, n_new: np.ndarray) -> np.ndarray:
        """Each cache row rows[j] takes the last n_new[j] tokens of input_ids[j] alone (batch-1 runs on its real
        tokens); returns their logits as one (len(rows), logits_positions(T), V) step. self._rows still counts
        the tokens cached before."""
        T = input_ids.shape[1]
        V, P = self.config.vocab_size, self.artifact.logits_positions(T)
        logits = np.zeros((len(rows), P, V), np.float32)
        for j, (b, n) in enumerate(zip(rows, (int(n) for n in n_new))):
            # chunks of PREFILL_CHUNK: attention then skips most of the causally masked half of a long prompt
            for a in range(T - n, T, PREFILL_CHUNK):
                z = min(a + PREFILL_CHUNK, T)
                row = self._run_shared(input_ids[j:j + 1, a:z], np.ones((1, self._rows[b] + z - T + n), np.int64),
                                       position_ids[j:j + 1, a:z], rows=b)
                # the chunk's logits cover its last positions [z - q, z); the step's cover [T - P, T)
                q = row.shape[1]
                lo = max(z - q, T - P)
                if lo < z:
                    logits[j, lo - (T - P):z - (T - P)] = row[0, lo - (z - q):]
        return logits

    def _run_shared(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, rows: int) -> np.ndarray:
        io, B, T = self._io, ids.shape[0], ids.shape[1]
        rows = -1 if self._batch == 1 else rows  # batch 1: row 0 and "all rows" are the same binding
        if self._bound != rows:  # the cache bindings change only between prefill rows and the batch
            c, cap = self.config, self._capacity
            shape, row_bytes = [B, c.n_head, cap, c.head_dim], c.n_head * cap * c.head_dim * self._kv_dtype.itemsize
            for past, present, buf in zip(self._past_names, self._present_names, self._cache):
                ptr = _data_ptr(buf) + (row_bytes * rows if rows >= 0 else 0)
                io.bind_input(past, self._device, self._device_id, self._kv_dtype, shape, ptr)
                io.bind_output(present, self._device, self._device_id, self._kv_dtype, shape, ptr)
            self._bound = rows
        # bind_cpu_input reads the arrays in place: they stay referenced here until run returns
        feeds = [np.ascontiguousarray(a, dtype=np.int64) for a in (ids, mask, pos)]
        for name, a in zip(("input_ids", "attention_mask", "position_ids"), feeds):
            io.bind_cpu_input(name, a)
        logits = np.empty((B, self.artifact.logits_positions(T), self.config.vocab_size), self._kv_dtype)
        io.bind_output("logits", "cpu", 0, self._kv_dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(io, self._run_options)
        return logits.astype(np.float32, copy=False)

    def _reserve(self, length: int, batch: int | None = None) -> None:
        """Make the shared buffers hold `length` positions and `batch` rows (default: the batch's), keeping what
        the cached rows hold. Positions grow x2. On the CPU the buffers outlive reset() (a later batch that fits
        reuses them: no fresh pages to fault in), never shrink (they keep the most rows and positions any batch
        needed), and a batch that grows (rows joining it) gets room for up to 8 more rows, so the next joins only
        extend views of the same arrays."""
        if self.decode != "dynamic":
            return self._reserve_static(length, batch)
        cpu, held = self._device == "cpu", (len(self._rows) if self._cache else 0)
        batch = len(self._rows) if batch is None else batch
        if cpu and self._base and batch <= self._base[0].shape[0] and length <= self._base[0].shape[2]:
            if not self._cache or len(self._cache[0]) != batch:
                self._cache, self._bound = [base[:batch] for base in self._base], None
            self._capacity = self._base[0].shape[2]
            return
        if not cpu and self._cache and length <= self._capacity and batch == held:
            return
        c, cap = self.config, self._capacity
        new_cap = cap if length <= cap else min(c.block_size, max(length, 2 * cap, MIN_CAPACITY))
        rows = max(batch, min(2 * held, batch + 8)) if cpu and held and batch > held else batch
        if cpu and self._base:  # a longer prompt for one row must not leave the next wide batch fresh pages to
            # fault in (4% of a batch-8 decode here)
            rows, new_cap = max(rows, self._base[0].shape[0]), max(new_cap, self._base[0].shape[2])
        grown = []
        for old in self._cache or [None] * len(self._past_names):
            host = np.zeros((rows, c.n_head, new_cap, c.head_dim), self._kv_dtype)
            if old is not None:
                host[:held, :, :cap] = old if cpu else old.numpy()
            grown.append(host if cpu else self._ort.OrtValue.ortvalue_from_numpy(host, self._device, self._device_id))
        self._base = grown if cpu else []  # CPU: the arrays; the batch's rows are their first
        self._cache = [g[:batch] for g in grown] if cpu else grown
        self._capacity, self._bound = new_cap, None

    def _reserve_static(self, length: int, batch: int | None) -> None:
        """decode="static" / "graph": buffers of a fixed capacity (graph_capacity) and a bucket's rows, allocated
        once and kept across reset(), so the decode buckets' bindings and captured graphs stay valid. Only a
        batch past the largest bucket held, or a sequence past the capacity, moves them (the buckets are then
        bound and captured again)."""
        from .ort_graph import StaticDecode, bucket_for

        batch = len(self._rows) if batch is None else batch
        c, cpu = self.config, self._device == "cpu"
        held_rows, cap = (self._base[0].shape[0], self._base[0].shape[2]) if self._base else (0, 0)
        if not (self._base and batch <= held_rows and length <= cap):
            rows = max(bucket_for(batch) or batch, held_rows)
            new_cap = max(cap, min(c.block_size, max(self._static_capacity, length, 2 * cap)))
            grown = []
            for old in self._base or [None] * len(self._past_names):
                host = np.zeros((rows, c.n_head, new_cap, c.head_dim), self._kv_dtype)
                if old is not None:
                    host[:held_rows, :, :cap] = old if cpu else old.numpy()
                grown.append(host if cpu else self._ort.OrtValue.ortvalue_from_numpy(host, self._device, self._device_id))
            self._base, self._bound = grown, None
            ptrs = [_data_ptr(g) for g in grown]
            if self._static is None:
                self._static = StaticDecode(
                    self.session, self._ort, c, device=self._device, device_id=self._device_id, kv_dtype=self._kv_dtype,
                    past_names=self._past_names, present_names=self._present_names, cache_ptrs=ptrs, capacity=new_cap,
                    positions=self.artifact.logits_positions(1), capture=self.decode == "graph", max_rows=rows)
            else:
                self._static.capacity, self._static.buckets = new_cap, tuple(b for b in BUCKETS if b <= rows) or (rows,)
                self._static.rebind(ptrs)
        if cpu and (not self._cache or len(self._cache[0]) != batch):
            self._cache, self._bound = [base[:batch] for base in self._base], None
        elif not cpu:
            self._cache = self._base
        self._capacity = self._base[0].shape[2]

    def graph_stats(self) -> dict:
        """How decode steps ran: {"decode": mode, and for "static" / "graph" the StaticDecode counters}."""
        return {"decode": self.decode, **(self._static.stats if self._static is not None else {})}


def _decode_mode(decode: str, kv_cache: str, provider: str, path) -> str:
    """Resolve OnnxRuntimeBackend's `decode` option; refuse what cannot run, saying why."""
    modes = ("auto", "graph", "static", "dynamic")
    if decode not in modes:
        raise BackendError(f"unknown decode mode {decode!r}; choose one of {modes}")
    if decode == "auto":
        return "graph" if kv_cache == "shared" and provider == "cuda" else "dynamic"
    if decode != "dynamic" and kv_cache != "shared":
        raise BackendError(f"{path}: decode={decode!r} (fixed-shape steps, CUDA graphs) needs a kv_cache='shared' "
                           f"graph, which updates one cache buffer in place; export with `--kv-cache shared` "
                           f"(and --dtype fp16 for CUDA), or use decode='dynamic'")
    if decode == "graph" and provider != "cuda":
        raise BackendError("CUDA graphs (decode='graph', --cuda-graph) need --provider cuda and onnxruntime-gpu; "
                           "on the CPU use decode='static' (same fixed-shape steps, no capture) or 'dynamic'")
    return decode


def _compact(a: np.ndarray, length: int, start: int = 0) -> np.ndarray:
    """(B, H, P, D) C-contiguous -> its positions [start, start + length) as (B, H, length, D), moved within a's
    own memory (each (b, h) block moves toward the start, in order, so no block overwrites one still to move);
    the result is a view of a."""
    B, H, P, D = a.shape
    flat, n = a.reshape(-1), length * D
    for i in range(B * H):
        src = (i * P + start) * D
        if src != i * n:  # block 0 of a rewind is already in place
            flat[i * n:(i + 1) * n] = flat[src:src + n]  # numpy copies overlapping ranges correctly
    return flat[:B * H * n].reshape(B, H, length, D)


def _keep(a: np.ndarray, rows: list[int]) -> np.ndarray:
    """a[rows] as a view of a's own memory: the rows move to the front (runs of pack_rows, in order)."""
    for dst, src, n in pack_rows(rows):
        a[dst:dst + n] = a[src:src + n]  # numpy copies overlapping ranges correctly
    return a[:len(rows)]


def _data_ptr(buf) -> int:
    return buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data_ptr()


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
