"""Static-shape decode steps for a kv_cache="shared" graph, replayed as CUDA graphs on onnxruntime's CUDA EP.

An uncaptured 124M decode step on onnxruntime CUDA took 1.8-2.0 ms on an H200, mostly launching a few
hundred small kernels one by one; replayed as a graph, 0.7-0.9 ms (docs/gpu.md). A CUDA graph records those launches once and replays
them with one call, but only for a step whose every input and output lives at the same device address with
the same shape each time. This module gives decode steps that shape, as onnxruntime-genai does:

- the KV cache is the shared layout (B, n_head, capacity, head_dim), rows left-aligned, at a capacity fixed
  for the whole run, so its buffers never move;
- a batch of B rows runs as the smallest bucket nb >= B of BUCKETS; each bucket owns device buffers for
  input_ids (nb, 1), position_ids (nb, 1), attention_mask (nb, capacity) and logits, bound once to one IO
  binding, and a graph id of its own (onnxruntime captures one graph per `gpu_graph_id`);
- the attention mask is always `capacity` wide, so GroupQueryAttention's total_sequence_length is constant;
  row b's ones cover its cached tokens and the new one ([0, length_b]) and give seqlens_k = length_b on the
  device. Rows nb - B of a bucket are filler (one token at slot 0; their logits are dropped).

Each step copies ids, positions and the mask into the bucket's buffers (OrtValue.update_inplace keeps the
address), replays, and copies the logits back. Prefill and cache surgery stay on the uncaptured path
(`gpu_graph_id` -1). On the CPU provider the same static steps run without capture: the logits equal the
dynamic path's, which the CPU tests check.

`StaticCache` is the SharedCache layout (runtime/backends/ort_cache.py) over such buffers: its prefill, rewind,
keep_rows and add_rows are SharedCache's, done without moving the buffers; its decode steps run through the
buckets. The onnxruntime backend picks it for decode="static" / "graph".

    cache = StaticCache(session, artifact, OrtDevice(ort, "cuda"), capture=True, capacity=1024)
"""
from __future__ import annotations

import numpy as np

from . import BackendError
from .ort_cache import SharedCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SKIP_GRAPH = "-1"  # onnxruntime's gpu_graph_id that runs a step without capturing or replaying a graph


def bucket_for(batch: int, buckets=BUCKETS) -> int | None:
    """The smallest bucket holding `batch` rows; None past the largest (the step then runs uncaptured)."""
    return next((b for b in buckets if b >= batch), None)


def static_mask(lengths: np.ndarray, nb: int, capacity: int) -> np.ndarray:
    """(nb, capacity) int64: row j's ones at [0, lengths[j]] (its cached tokens and the new one); filler rows
    past len(lengths) hold one token at slot 0."""
    full = np.zeros(nb, np.int64)
    full[:len(lengths)] = lengths
    return (np.arange(capacity, dtype=np.int64)[None, :] <= full[:, None]).astype(np.int64)


class _Bucket:
    """One batch size's fixed device buffers and IO binding over the cache (and, when captured, its CUDA graph)."""

    def __init__(self, cache: StaticCache, nb: int, graph_id: int):
        c, dev, cap, ort = cache.config, cache.device, cache.capacity, cache.device.ort

        def device(shape, dtype):
            return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, dev.kind, dev.id)

        self.nb, self.steps = nb, 0
        self.ids_host, self.pos_host = np.zeros((nb, 1), np.int64), np.zeros((nb, 1), np.int64)
        self.ids, self.pos, self.mask = device((nb, 1), np.int64), device((nb, 1), np.int64), device((nb, cap), np.int64)
        self.logits = device((nb, cache.artifact.logits_positions(1), c.vocab_size), cache.kv_dtype)
        self.io = io = cache.session.io_binding()
        io.bind_ortvalue_input("input_ids", self.ids)
        io.bind_ortvalue_input("attention_mask", self.mask)
        io.bind_ortvalue_input("position_ids", self.pos)
        shape = [nb, c.n_head, cap, c.head_dim]  # the buffers' first nb rows
        for past, present, buf in zip(cache.past_names, cache.present_names, cache.base):
            ptr = dev.data_ptr(buf)
            io.bind_input(past, dev.kind, dev.id, cache.kv_dtype, shape, ptr)
            io.bind_output(present, dev.kind, dev.id, cache.kv_dtype, shape, ptr)
        io.bind_ortvalue_output("logits", self.logits)
        self.run_options = ort.RunOptions()
        if cache.capture:
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def run(self, session, ids: np.ndarray, pos: np.ndarray, lengths: np.ndarray, capacity: int) -> np.ndarray:
        """Copy this step's ids, positions and mask into the fixed buffers, run (replay), return (B, P, V) float32."""
        B = ids.shape[0]
        self.ids_host[:B], self.ids_host[B:] = ids, 0
        self.pos_host[:B], self.pos_host[B:] = pos, 0
        self.ids.update_inplace(self.ids_host)
        self.pos.update_inplace(self.pos_host)
        self.mask.update_inplace(static_mask(lengths, self.nb, capacity))
        session.run_with_iobinding(self.io, self.run_options)
        self.steps += 1
        # a copy: on the CPU, numpy() is a view of the bucket's buffer, which the next step overwrites
        return self.logits.numpy()[:B].astype(np.float32, copy=True)


class StaticCache(SharedCache):
    """SharedCache over buffers of a fixed capacity and a bucket's rows, allocated once and kept across reset(), so
    the buckets' bindings and captured graphs stay valid. Only a batch past the rows held, or a sequence past the
    capacity, moves the buffers; the buckets are then bound and captured anew (under new graph ids)."""

    def __init__(self, session, artifact, device, *, capture: bool, capacity: int):
        super().__init__(session, artifact, device)
        self.capture, self.fixed_capacity = capture, capacity
        self.buckets: dict[int, _Bucket] = {}  # bucket size -> its bindings, made at its first step
        self.sizes: tuple[int, ...] = ()  # the bucket sizes the buffers' rows allow
        self.next_graph_id = 0
        self.stats = {"graph_steps": 0, "fallback_steps": 0, "captured_buckets": [], "fallbacks": {}}
        if capture:  # prefill and cache surgery: no graph
            self.run_options = device.ort.RunOptions()
            self.run_options.add_run_config_entry("gpu_graph_id", SKIP_GRAPH)

    def reset(self, batch_size: int) -> None:
        self.bound, self.rows = None, np.zeros(batch_size, np.int64)  # the buffers stay

    def forward(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: int) -> np.ndarray:
        B, T = ids.shape
        if T == 1 and self.base and mask[:, -1].all():
            self.reserve(past + 1)
            if B <= self.sizes[-1]:
                if not np.array_equal(mask.sum(1), self.rows + 1):
                    raise BackendError("attention_mask disagrees with the cache (its ones must count each row's "
                                       "cached + new tokens); pass the same growing mask every step, or reset()")
                nb = bucket_for(B, self.sizes)
                if nb not in self.buckets:
                    self.buckets[nb] = _Bucket(self, nb, self.next_graph_id)
                    self.next_graph_id += 1
                    if self.capture:
                        self.stats["captured_buckets"].append(nb)
                logits = self.buckets[nb].run(self.session, ids, pos, self.rows, self.capacity)
                self.stats["graph_steps"] += 1
                self.rows += 1
                return logits
            why = f"batch {B} past the largest bucket {self.sizes[-1]}"
            self.stats["fallback_steps"] += 1
            self.stats["fallbacks"][why] = self.stats["fallbacks"].get(why, 0) + 1
        return super().forward(ids, mask, pos, past)

    def keep_rows(self, rows: list[int]) -> None:
        """The kept rows move to the front of the same buffers (on CUDA through host memory, written back in
        place: the captured graphs read these addresses)."""
        dev = self.device
        if dev.cpu:
            self.buffers = [dev.take_rows(buf, rows) for buf in self.base]
        else:
            for buf in self.base:
                host = buf.numpy()
                buf.update_inplace(np.ascontiguousarray(np.concatenate([host[rows], host[len(rows):]])))
        self.rows, self.bound = self.rows[rows], None

    def add_rows(self, ids, mask, pos, past: int, width: int) -> np.ndarray:
        B = len(self.rows)
        try:
            return super().add_rows(ids, mask, pos, past, width)
        except Exception:  # SharedCache kept the running rows' lengths; the buffers stay where they are
            self.buffers = [b[:B] for b in self.base] if self.device.cpu else self.base
            raise

    def reserve(self, length: int, batch: int | None = None) -> None:
        batch = len(self.rows) if batch is None else batch
        c, dev = self.config, self.device
        held_rows, cap = _shape(self.base[0])[::2] if self.base else (0, 0)
        if not (self.base and batch <= held_rows and length <= cap):
            rows = max(bucket_for(batch) or batch, held_rows)
            new_cap = max(cap, min(c.block_size, max(self.fixed_capacity, length, 2 * cap)))
            grown = []
            for old in self.base or [None] * len(self.past_names):
                host = np.zeros((rows, c.n_head, new_cap, c.head_dim), self.kv_dtype)
                if old is not None:
                    host[:held_rows, :, :cap] = dev.host(old)
                grown.append(dev.buffer(host))
            self.base, self.buffers, self.bound = grown, [], None  # the old views must not be bound again
            self.buckets.clear()  # their bindings and graphs read the old buffers
            self.sizes = tuple(b for b in BUCKETS if b <= rows) or (rows,)
        if dev.cpu and (not self.buffers or len(self.buffers[0]) != batch):
            self.buffers, self.bound = [b[:batch] for b in self.base], None
        elif not dev.cpu:
            self.buffers = self.base  # bindings give the batch's shape; the buffers hold more rows
        self.capacity = _shape(self.base[0])[2]


def _shape(buf) -> tuple:
    """A cache buffer's shape: a numpy array's attribute, an OrtValue's method."""
    return buf.shape if isinstance(buf, np.ndarray) else tuple(buf.shape())
