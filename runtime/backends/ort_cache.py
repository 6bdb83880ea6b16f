"""The onnxruntime backend's two KV cache layouts, one class each, and the device they live on.

`ConcatCache` (kv_cache="concat", the standard graph): each step binds the previous step's `present.*`
OrtValues as this step's `past_key_values.*` inputs (IO binding) and lets onnxruntime allocate the new
presents, (B, nh, P+T, hs), on the cache's device; the cache never round-trips through numpy.

`SharedCache` (kv_cache="shared", GroupQueryAttention, export/kv_shared.py): one buffer per cache tensor,
(B, nh, capacity, hs), bound once as both its past input and its present output; onnxruntime writes each
step's keys and values into it in place. Rows are left-aligned there (row b's tokens at slots [0, n_b)),
so a left-padded prefill, or a multi-token step after a past, runs row by row on each row's real tokens
(the graph's batch-1 case); the capacity doubles when a sequence outgrows it. Its two primitives,
`bind_cache(rows)` (point the cache bindings at the buffers' rows) and `run(...)` (one call of the
graph), are what another layout over fixed-capacity buffers would build on.

`OrtDevice` is the one place host memory and a GPU differ: how an array becomes an OrtValue or a cache
buffer, how it comes back, and whether the cache can be compacted in its own memory. The backend
(runtime/backends/onnxruntime.py) checks every request (runtime.backends.Backend) before a layout sees it.

    cache = ConcatCache(session, artifact, OrtDevice(ort, "cpu"))
    cache.reset(2); logits = cache.forward(ids, mask, pos, past=0)
"""
from __future__ import annotations

import abc

import numpy as np

from . import BackendError, merge_rows, pack_rows

MIN_CAPACITY = 128  # SharedCache: positions a cache buffer holds at least (it doubles when outgrown)
# SharedCache: a longer single-row prompt is prefilled in chunks of this many tokens. The attention kernels
# compute the full (sequence x total) score matrix and mask its causal half; chunks skip most of it (a
# 512-token prompt on the 124M shape, 2 CPU threads: 411 -> 382 ms). 128 is slower again (MatMul efficiency).
PREFILL_CHUNK = 256


class OrtDevice:
    """Host memory ("cpu") or one GPU ("cuda", device_id): where a cache lives, and how arrays get there and back."""

    def __init__(self, ort, kind: str, device_id: int = 0):
        self.ort, self.kind, self.id = ort, kind, device_id
        self.cpu = kind == "cpu"

    def ortvalue(self, a: np.ndarray):
        """A host array as an OrtValue here: on the CPU it wraps `a` without a copy (the caller keeps `a` alive);
        on CUDA, a copy in GPU memory."""
        if self.cpu:
            return self.ort.OrtValue.ortvalue_from_numpy(a)
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.kind, self.id)

    def buffer(self, a: np.ndarray):
        """A cache buffer holding `a`: the array itself on the CPU (onnxruntime reads and writes its memory), a GPU
        copy (an OrtValue) on CUDA."""
        return a if self.cpu else self.ortvalue(a)

    @staticmethod
    def host(buf) -> np.ndarray:
        """A buffer or OrtValue as a host array: itself / a view on the CPU, a copy from the GPU on CUDA."""
        return buf if isinstance(buf, np.ndarray) else buf.numpy()

    @staticmethod
    def data_ptr(buf) -> int:
        return buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data_ptr()

    def take_positions(self, a: np.ndarray, start: int, length: int) -> np.ndarray:
        """(B, H, P, D) -> its positions [start, start + length). On the CPU compacted in a's own memory, no
        allocation (a fresh 94 MB copy of a batch-8 124M cache cost 15-48 ms, mostly page faults; in place,
        9 ms); on CUDA `a` is a host copy on its way back to the GPU, and a slice is enough."""
        return _compact(a, length, start) if self.cpu else a[:, :, start:start + length]

    def take_rows(self, a: np.ndarray, rows: list[int]) -> np.ndarray:
        """a[rows]: on the CPU the rows move to the front of a's own memory (no allocation); on CUDA a copy."""
        return _keep(a, rows) if self.cpu else a[rows]


class OrtCache(abc.ABC):
    """A KV cache layout: owns its buffers and the session's IO binding, runs the graph on requests the backend has
    checked. `past` is the cache's width before the call (the backend's past_length)."""

    def __init__(self, session, artifact, device: OrtDevice):
        self.session, self.artifact, self.device = session, artifact, device
        self.config = artifact.config
        self.kv_dtype = np.dtype(artifact.kv_dtype)
        self.past_names, self.present_names = artifact.inputs[3:], artifact.outputs[1:]
        self.io = session.io_binding()

    @abc.abstractmethod
    def reset(self, batch_size: int) -> None: ...

    @abc.abstractmethod
    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: int) -> np.ndarray: ...

    @abc.abstractmethod
    def rewind(self, length: int, past: int) -> None: ...

    @abc.abstractmethod
    def drop_front(self, n: int, past: int) -> None: ...

    @abc.abstractmethod
    def keep_rows(self, rows: list[int]) -> None: ...

    @abc.abstractmethod
    def add_rows(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: int, width: int) -> np.ndarray: ...


class ConcatCache(OrtCache):
    """kv_cache="concat": the presents onnxruntime allocates become the next step's past."""

    def __init__(self, session, artifact, device: OrtDevice):
        super().__init__(session, artifact, device)
        self.past: list | None = None  # OrtValues, one per past_key_values.* input
        self.past_host: list | None = None  # CPU: the numpy arrays `past` wraps, when this cache made them

    def reset(self, batch_size: int) -> None:
        c = self.config
        # Step 0's empty past (B, nh, 0, hs): zero-length host tensors; zero bytes to copy even on CUDA
        empty = np.zeros((batch_size, c.n_head, 0, c.head_dim), dtype=self.kv_dtype)
        ov = self.device.ort.OrtValue.ortvalue_from_numpy(empty)
        self.past, self.past_host = [ov] * len(self.past_names), None

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: int) -> np.ndarray:
        io, dev = self.io, self.device
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        # bind_cpu_input reads the arrays in place: C-contiguous int64 (the backend made them so), alive until run
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", pos)
        for name, value in zip(self.past_names, self.past):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, dev.kind, dev.id)  # onnxruntime allocates (B, nh, P+T, hs) there
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        self.past, self.past_host = list(outputs[1:]), None  # stays on the device: next step's past
        return outputs[0].numpy().astype(np.float32, copy=False)  # (B, artifact.logits_positions(T), V)

    def rewind(self, length: int, past: int) -> None:
        """Each present compacted in its own buffer on the CPU; on CUDA, a copy of the kept part through host memory."""
        self._put([self.device.take_positions(a, 0, length) for a in self._host()])

    def drop_front(self, n: int, past: int) -> None:
        self._put([self.device.take_positions(a, n, past - n) for a in self._host()])

    def keep_rows(self, rows: list[int]) -> None:
        """The kept rows move to the front of their own buffers on the CPU; on CUDA, a copy through host memory."""
        self._put([self.device.take_rows(a, rows) for a in self._host()])

    def add_rows(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: int, width: int) -> np.ndarray:
        """The new rows run as their own batch, then both caches are merged, right-aligned (through host memory on
        CUDA)."""
        old, old_host = self.past, self._host()
        self.reset(ids.shape[0])
        try:
            logits = self.forward(ids, mask, pos, 0)
        except Exception:  # the running rows' cache is untouched
            self.past, self.past_host = old, old_host
            raise
        self._put([merge_rows(o, nw) for o, nw in zip(old_host, self._host())])
        return logits

    def _host(self) -> list[np.ndarray]:
        """The cache as host arrays: on the CPU, views whose memory stays alive while they do (the arrays _put
        wrapped, or views of onnxruntime's own outputs); on CUDA, copies."""
        if self.past_host is not None:
            return self.past_host
        return [v.numpy() for v in self.past]

    def _put(self, arrays: list[np.ndarray]) -> None:
        """Make these host arrays the cache: wrapped without a copy on the CPU, copied to the GPU on CUDA. On the
        CPU the arrays stay referenced here, and _host hands them out again, never `OrtValue.numpy()` of the
        wrappers: that view's base holds the OrtValue but not the numpy array it was made from, so an in-place
        view of it outlives the memory once the wrapper goes (keep_rows then rewind read freed onnxruntime arena
        memory that way)."""
        self.past = [self.device.ortvalue(a) for a in arrays]
        self.past_host = list(arrays) if self.device.cpu else None


class SharedCache(OrtCache):
    """kv_cache="shared": fixed buffers onnxruntime writes into in place; rows left-aligned, each its own length."""

    def __init__(self, session, artifact, device: OrtDevice):
        super().__init__(session, artifact, device)
        self.buffers: list = []  # one per past/present pair (numpy on CPU, OrtValue on CUDA)
        self.base: list = []  # CPU: the arrays `buffers` view (room for rows joining the batch)
        self.rows = np.zeros(0, np.int64)  # real tokens cached per row
        self.capacity = 0  # positions each buffer holds
        self.bound = None  # which rows the cache bindings point at (None: none, -1: all, b: row b)
        self.run_options = None  # onnxruntime RunOptions of this layout's calls (StaticCache: no graph)

    def reset(self, batch_size: int) -> None:
        self.bound, self.capacity = None, 0
        self.rows = np.zeros(batch_size, np.int64)
        self.buffers = []  # allocated by the first forward, sized to it

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: int) -> np.ndarray:
        B, T = ids.shape
        new = mask[:, -T:] != 0  # (B, T): which new positions are real (padding is on the left)
        n_new = new.sum(1)
        if not all(new[b, T - n:].all() for b, n in enumerate(n_new)):
            raise BackendError("attention_mask pads inside the new tokens; a kv_cache='shared' graph takes padding "
                               "on the left of a prompt only")
        if not np.array_equal(mask.sum(1), self.rows + n_new):
            raise BackendError("attention_mask disagrees with the cache (its ones must count each row's cached + new "
                               "tokens); pass the same growing mask every step, or reset()")
        self.reserve(past + T)
        if T == 1 or (past == 0 and new.all() and (B > 1 or T <= PREFILL_CHUNK)):
            # decode (rows may differ in length), or an unpadded batched prefill: one call
            if not new.all():
                raise BackendError("a decode step's newest mask column must be 1 for every row")
            logits = self.run(ids, mask, pos, rows=-1)
        else:  # left-padded prefill, a step after a past, or a long prompt: row by row, real tokens only
            logits = self.run_rows(range(B), ids, pos, n_new)
        self.rows += n_new
        return logits

    def rewind(self, length: int, past: int) -> None:
        """Only the row lengths change (the dropped slots are overwritten by the next forward)."""
        drop = past - length
        if (self.rows < drop).any():
            raise BackendError(f"cannot rewind {drop} positions: a row holds only {int(self.rows.min())} real tokens")
        self.rows -= drop

    def drop_front(self, n: int, past: int) -> None:
        """Rows are left-aligned (no padding is cached), so only the mask's width shrinks."""
        if (past - self.rows < n).any():
            raise BackendError(f"cannot drop the first {n} positions: a row holds real tokens there")

    def keep_rows(self, rows: list[int]) -> None:
        dev = self.device
        self.buffers = [dev.buffer(dev.take_rows(dev.host(buf), rows)) for buf in self.buffers]
        self.rows, self.bound = self.rows[rows], None

    def add_rows(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: int, width: int) -> np.ndarray:
        """The buffers gain the rows, each prefilled alone on its real tokens (rows are left-aligned, so no row gains
        padding; only the mask's width follows the widest)."""
        n, B = ids.shape[0], len(self.rows)
        n_new = (mask != 0).sum(1)
        if not all(mask[j, -c:].all() for j, c in enumerate(n_new) if c):
            raise BackendError("add_rows: the new rows' attention_mask must pad on the left only")
        self.reserve(width, B + n)
        rows = self.rows
        self.rows = np.concatenate([rows, np.zeros(n, np.int64)])
        try:
            logits = self.run_rows(range(B, B + n), ids, pos, n_new)
        except Exception:  # the running rows' cache is untouched: they go on alone
            self.rows, self.bound = rows, None
            self.buffers = [self.device.buffer(self.device.host(b)[:B]) for b in self.buffers]  # CPU: views
            raise
        self.rows[B:] = n_new
        return logits

    def run_rows(self, rows, ids: np.ndarray, pos: np.ndarray, n_new: np.ndarray) -> np.ndarray:
        """Each cache row rows[j] takes the last n_new[j] tokens of ids[j] alone (batch-1 runs on its real tokens);
        returns their logits as one (len(rows), logits_positions(T), V) step. self.rows still counts the tokens
        cached before."""
        T = ids.shape[1]
        V, P = self.config.vocab_size, self.artifact.logits_positions(T)
        logits = np.zeros((len(rows), P, V), np.float32)
        for j, (b, n) in enumerate(zip(rows, (int(n) for n in n_new))):
            # chunks of PREFILL_CHUNK: attention then skips most of the causally masked half of a long prompt
            for a in range(T - n, T, PREFILL_CHUNK):
                z = min(a + PREFILL_CHUNK, T)
                row = self.run(ids[j:j + 1, a:z], np.ones((1, self.rows[b] + z - T + n), np.int64),
                               pos[j:j + 1, a:z], rows=b)
                # the chunk's logits cover its last positions [z - q, z); the step's cover [T - P, T)
                q = row.shape[1]
                lo = max(z - q, T - P)
                if lo < z:
                    logits[j, lo - (T - P):z - (T - P)] = row[0, lo - (z - q):]
        return logits

    def bind_cache(self, rows: int) -> None:
        """Bind every past input and its present output to the same buffer memory: all rows (-1), or row `rows`
        alone as a batch of one. Only when that changes (between prefill rows and the batch)."""
        rows = -1 if len(self.rows) == 1 else rows  # batch 1: row 0 and "all rows" are the same binding
        if self.bound == rows:
            return
        c, cap, dev = self.config, self.capacity, self.device
        B = len(self.rows) if rows < 0 else 1
        shape, row_bytes = [B, c.n_head, cap, c.head_dim], c.n_head * cap * c.head_dim * self.kv_dtype.itemsize
        for past, present, buf in zip(self.past_names, self.present_names, self.buffers):
            ptr = dev.data_ptr(buf) + (row_bytes * rows if rows >= 0 else 0)
            self.io.bind_input(past, dev.kind, dev.id, self.kv_dtype, shape, ptr)
            self.io.bind_output(present, dev.kind, dev.id, self.kv_dtype, shape, ptr)
        self.bound = rows

    def run(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, rows: int) -> np.ndarray:
        """One call of the graph on the cache rows `rows` (bind_cache's argument); ids (B, T) with B = the batch
        (rows -1) or 1. Returns the (B, logits_positions(T), V) logits as float32."""
        io, B, T = self.io, ids.shape[0], ids.shape[1]
        self.bind_cache(rows)
        # bind_cpu_input reads the arrays in place: they stay referenced here until run returns
        feeds = [np.ascontiguousarray(a, dtype=np.int64) for a in (ids, mask, pos)]
        for name, a in zip(("input_ids", "attention_mask", "position_ids"), feeds):
            io.bind_cpu_input(name, a)
        logits = np.empty((B, self.artifact.logits_positions(T), self.config.vocab_size), self.kv_dtype)
        io.bind_output("logits", "cpu", 0, self.kv_dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(io, self.run_options)
        return logits.astype(np.float32, copy=False)

    def reserve(self, length: int, batch: int | None = None) -> None:
        """Make the buffers hold `length` positions and `batch` rows (default: the batch's), keeping what the cached
        rows hold. Positions grow x2. On the CPU the buffers outlive reset() (a later batch that fits reuses them:
        no fresh pages to fault in), never shrink (they keep the most rows and positions any batch needed), and a
        batch that grows (rows joining it) gets room for up to 8 more rows, so the next joins only extend views
        of the same arrays. On CUDA they hold exactly the batch."""
        cpu, held = self.device.cpu, (len(self.rows) if self.buffers else 0)
        batch = len(self.rows) if batch is None else batch
        if cpu and self.base and batch <= self.base[0].shape[0] and length <= self.base[0].shape[2]:
            if not self.buffers or len(self.buffers[0]) != batch:
                self.buffers, self.bound = [base[:batch] for base in self.base], None
            self.capacity = self.base[0].shape[2]
            return
        if not cpu and self.buffers and length <= self.capacity and batch == held:
            return
        c, cap = self.config, self.capacity
        new_cap = cap if length <= cap else min(c.block_size, max(length, 2 * cap, MIN_CAPACITY))
        rows = max(batch, min(2 * held, batch + 8)) if cpu and held and batch > held else batch
        if cpu and self.base:  # a longer prompt for one row must not leave the next wide batch fresh pages to
            # fault in (4% of a batch-8 decode here)
            rows, new_cap = max(rows, self.base[0].shape[0]), max(new_cap, self.base[0].shape[2])
        grown = []
        for old in self.buffers or [None] * len(self.past_names):
            host = np.zeros((rows, c.n_head, new_cap, c.head_dim), self.kv_dtype)
            if old is not None:
                host[:held, :, :cap] = self.device.host(old)
            grown.append(host)
        self.base = grown if cpu else []  # CPU: the arrays; the batch's rows are their first
        self.buffers = [self.device.buffer(g[:batch]) for g in grown]  # on CUDA rows == batch: all of g
        self.capacity, self.bound = new_cap, None


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
