"""Static-shape decode steps for a kv_cache="shared" graph, replayed as CUDA graphs on onnxruntime's CUDA EP.

A 124M decode step on onnxruntime CUDA spends ~2.3 ms launching a few hundred small kernels one by one
while the GPU needs ~0.6 ms for them (docs/gpu.md). A CUDA graph records those launches once and replays
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

    steps = StaticDecode(session, ort, config, device="cuda", device_id=0, kv_dtype=np.float16,
                         cache=buffers, capacity=1024, positions=1, capture=True)
    logits = steps.run(ids, positions, lengths)  # (B, positions, V) float32; lengths: cached tokens per row
"""
from __future__ import annotations

import numpy as np

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
    """One batch size's fixed buffers and IO binding (and, when captured, its CUDA graph)."""

    def __init__(self, owner: "StaticDecode", nb: int, graph_id: int):
        o, ort = owner, owner.ort
        c, cap = o.config, o.capacity
        self.nb, self.graph_id, self.steps = nb, graph_id, 0

        def device(shape, dtype):
            return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, o.device, o.device_id)

        self.ids_host = np.zeros((nb, 1), np.int64)
        self.pos_host = np.zeros((nb, 1), np.int64)
        self.ids, self.pos = device((nb, 1), np.int64), device((nb, 1), np.int64)
        self.mask = device((nb, cap), np.int64)
        self.logits = device((nb, o.positions, c.vocab_size), o.kv_dtype)
        io = o.session.io_binding()
        io.bind_ortvalue_input("input_ids", self.ids)
        io.bind_ortvalue_input("attention_mask", self.mask)
        io.bind_ortvalue_input("position_ids", self.pos)
        shape = [nb, c.n_head, cap, c.head_dim]
        for past, present, ptr in zip(o.past_names, o.present_names, o.cache_ptrs):
            io.bind_input(past, o.device, o.device_id, o.kv_dtype, shape, ptr)
            io.bind_output(present, o.device, o.device_id, o.kv_dtype, shape, ptr)
        io.bind_ortvalue_output("logits", self.logits)
        self.io = io
        self.run_options = ort.RunOptions()
        if o.capture:
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))


class StaticDecode:
    """Decode steps of fixed shape per batch bucket over fixed cache buffers; captured when `capture`.

    `cache_ptrs` are the device addresses of the shared cache buffers, one per past_key_values.* input in
    order, each holding at least max(BUCKETS used) rows of (n_head, capacity, head_dim). When the owner
    moves its buffers it calls `rebind` (the captured graphs read the old addresses; new graph ids follow).
    """

    def __init__(self, session, ort, config, *, device: str, device_id: int, kv_dtype, past_names, present_names,
                 cache_ptrs, capacity: int, positions: int, capture: bool, max_rows: int):
        self.session, self.ort, self.config = session, ort, config
        self.device, self.device_id, self.kv_dtype = device, device_id, np.dtype(kv_dtype)
        self.past_names, self.present_names = list(past_names), list(present_names)
        self.capacity, self.positions, self.capture = capacity, positions, capture
        self.buckets = tuple(b for b in BUCKETS if b <= max_rows) or (max_rows,)
        self._next_graph_id = 0
        self._by_size: dict[int, _Bucket] = {}
        self.stats = {"graph_steps": 0, "fallback_steps": 0, "captured_buckets": [], "fallbacks": {}}
        self.rebind(cache_ptrs)

    def rebind(self, cache_ptrs) -> None:
        """The cache moved: drop every bucket (their bindings and graphs point at the old buffers)."""
        self.cache_ptrs = list(cache_ptrs)
        self._by_size.clear()

    def fits(self, batch: int, length: int) -> bool:
        """Whether a decode step of `batch` rows whose longest holds `length` tokens runs here."""
        return bucket_for(batch, self.buckets) is not None and length + 1 <= self.capacity

    def note_fallback(self, why: str) -> None:
        self.stats["fallback_steps"] += 1
        self.stats["fallbacks"][why] = self.stats["fallbacks"].get(why, 0) + 1

    def run(self, input_ids: np.ndarray, position_ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """(B, 1) ids and positions, (B,) cached tokens per row -> logits (B, positions, V) float32; the new
        keys and values land at slot lengths[b] of each row."""
        B = input_ids.shape[0]
        nb = bucket_for(B, self.buckets)
        b = self._by_size.get(nb)
        if b is None:
            b = self._by_size[nb] = _Bucket(self, nb, self._next_graph_id)
            self._next_graph_id += 1
        b.ids_host[:B], b.ids_host[B:] = input_ids, 0
        b.pos_host[:B], b.pos_host[B:] = position_ids, 0
        b.ids.update_inplace(b.ids_host)
        b.pos.update_inplace(b.pos_host)
        b.mask.update_inplace(static_mask(lengths, nb, self.capacity))
        self.session.run_with_iobinding(b.io, b.run_options)
        b.steps += 1
        self.stats["graph_steps"] += 1
        if self.capture and b.steps == 1:
            self.stats["captured_buckets"].append(nb)
        # a copy: on the CPU, numpy() is a view of the bucket's buffer, which the next step overwrites
        return b.logits.numpy()[:B].astype(np.float32, copy=True)

    def uncaptured_run_options(self):
        """RunOptions for the steps that must not touch a graph (prefill, steps that do not fit a bucket)."""
        ro = self.ort.RunOptions()
        if self.capture:
            ro.add_run_config_entry("gpu_graph_id", SKIP_GRAPH)
        return ro
