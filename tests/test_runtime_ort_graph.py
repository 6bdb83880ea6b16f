"""The fixed-shape decode path (runtime/backends/ort_graph.py): on the CPU provider it runs the same static steps
the CUDA graphs replay on a GPU, and must give the dynamic path's logits exactly, through padding, rows leaving
and joining, rewinds and a capacity that grows. The CUDA-graph capture itself runs only with onnxruntime-gpu."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.backends import BackendError
from runtime.backends.onnxruntime import OnnxRuntimeBackend
from runtime.backends.ort_graph import BUCKETS, bucket_for, static_mask
from runtime.generation import SamplingParams, generate


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory, tiny_model):
    from export.onnx import export_onnx

    out = {}
    for dt in ("fp32", "fp16"):
        d = tmp_path_factory.mktemp(f"graph_{dt}")
        export_onnx(tiny_model, d, dtype=dt, kv_cache="shared", logits="last:3")
        out[dt] = d
    return out


def _drive(backend, ids: np.ndarray, pads: list[int], steps: int, keep_at: int, keep: list[int], join_at: int):
    """Prefill a left-padded batch, decode `steps` tokens (rows `keep` stay after step keep_at, a new row joins
    at join_at, the last step is rewound and redone); returns every call's logits."""
    B, P = len(pads), ids.shape[1] - steps
    mask = np.ones((B, P), np.int64)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    backend.reset(B)
    out = [backend.forward(ids[:, :P], mask, pos)]
    pos, rows = pos[:, -1:], ids
    for t in range(P, P + steps):
        mask = np.concatenate([mask, np.ones((len(mask), 1), np.int64)], 1)
        pos = pos + 1
        out.append(backend.forward(rows[:, t:t + 1], mask, pos))
        if t == keep_at:
            backend.keep_rows(keep)
            mask, pos, rows = mask[keep], pos[keep], rows[keep]
        if t == join_at:
            new = ids[:1, :5]
            out.append(backend.add_rows(new, np.ones((1, 5), np.int64), np.arange(5)[None]))
            width = mask.shape[1]
            mask = np.concatenate([mask, np.concatenate([np.zeros((1, width - 5), np.int64),
                                                         np.ones((1, 5), np.int64)], 1)])
            pos, rows = np.concatenate([pos, [[4]]]), np.concatenate([rows, ids[:1]])
    backend.rewind(backend.past_length - 1)
    out.append(backend.forward(rows[:, -1:], mask, pos))
    return out


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_static_steps_equal_the_dynamic_path(shared_dirs, dtype):
    ids = np.random.default_rng(0).integers(0, 500, (3, 6 + 40))
    runs = {}
    for decode in ("dynamic", "static"):
        # capacity 16 < the 46 positions: the fixed buffers must grow (and the buckets rebind) mid-run
        be = OnnxRuntimeBackend(shared_dirs[dtype], threads=1, decode=decode, graph_capacity=16)
        runs[decode] = _drive(be, ids, pads=[2, 0, 1], steps=40, keep_at=12, keep=[0, 2], join_at=20)
        stats = be.graph_stats()
    assert len(runs["static"]) == len(runs["dynamic"])
    for i, (a, b) in enumerate(zip(runs["dynamic"], runs["static"])):
        assert a.shape == b.shape, f"call {i}: {a.shape} vs {b.shape}"
        d = float(np.abs(a - b).max())
        assert d == 0.0, f"call {i}: static vs dynamic max|Δ|={d:.2e}"
    assert stats["decode"] == "static" and stats["graph_steps"] == 41 and stats["fallback_steps"] == 0, stats


def test_a_multi_token_step_after_the_capacity_grew_reads_the_new_buffers(shared_dirs):
    """A step the buckets do not serve (T > 1 after a past: a speculative check) binds SharedCache's views, which
    must follow the buffers when they grow (they once kept the old ones: out-of-bounds writes, NaN logits)."""
    ids = np.random.default_rng(3).integers(0, 500, (2, 26))
    out = {}
    for decode in ("dynamic", "static"):
        be = OnnxRuntimeBackend(shared_dirs["fp32"], threads=1, decode=decode, graph_capacity=16)
        be.reset(2)
        mask = np.ones((2, 26), np.int64)
        pos = np.tile(np.arange(26), (2, 1))
        steps = [be.forward(ids[:, :6], mask[:, :6], pos[:, :6])]
        for t in range(6, 20):  # past the capacity of 16: the static buffers grow
            steps.append(be.forward(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1]))
        steps.append(be.forward(ids[:, 20:23], mask[:, :23], pos[:, 20:23]))  # T = 3 after a past
        out[decode] = steps
    for i, (a, b) in enumerate(zip(out["dynamic"], out["static"])):
        assert np.isfinite(b).all() and float(np.abs(a - b).max()) < 1e-5, f"call {i}: {np.abs(a - b).max()}"


def test_static_greedy_generation_is_token_identical(shared_dirs):
    prompts = [[5, 9, 13, 2, 7, 7, 1], [3, 4], [11] * 12]
    params = SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=())
    dyn = generate(OnnxRuntimeBackend(shared_dirs["fp32"], threads=1), None, prompts, params)
    be = OnnxRuntimeBackend(shared_dirs["fp32"], threads=1, decode="static")
    static = generate(be, None, prompts, params)
    assert [c.token_ids for c in static] == [c.token_ids for c in dyn]
    assert be.graph_stats()["graph_steps"] >= 19


def test_buffers_keep_their_address_across_reset_and_row_changes(shared_dirs):
    be = OnnxRuntimeBackend(shared_dirs["fp32"], threads=1, decode="static")
    ids = np.random.default_rng(1).integers(0, 500, (3, 30))
    _drive(be, ids, pads=[0, 0, 0], steps=24, keep_at=8, keep=[1], join_at=10)
    ptrs = [b.ctypes.data for b in be.cache.base]
    _drive(be, ids[:2], pads=[1, 0], steps=24, keep_at=8, keep=[0, 1], join_at=12)
    assert [b.ctypes.data for b in be.cache.base] == ptrs, \
        "the fixed buffers moved: captured graphs would read stale memory"


def test_bucket_rules():
    assert [bucket_for(b) for b in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 16, 64]
    assert bucket_for(BUCKETS[-1] + 1) is None
    m = static_mask(np.array([2, 0]), nb=3, capacity=5)
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]


def test_batches_past_the_largest_bucket_fall_back_and_say_so(shared_dirs, monkeypatch):
    import runtime.backends.ort_graph as og

    monkeypatch.setattr(og, "BUCKETS", (1, 2))  # the buffers still hold 4 rows (bucket_for's own default)
    ids = np.random.default_rng(2).integers(0, 500, (3, 8))
    be = OnnxRuntimeBackend(shared_dirs["fp32"], threads=1, decode="static")
    ref = OnnxRuntimeBackend(shared_dirs["fp32"], threads=1)
    a = _drive(be, ids, pads=[0, 0, 0], steps=2, keep_at=6, keep=[0, 1], join_at=99)
    b = _drive(ref, ids, pads=[0, 0, 0], steps=2, keep_at=6, keep=[0, 1], join_at=99)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    stats = be.graph_stats()
    assert stats["fallback_steps"] == 1 and stats["graph_steps"] == 2, stats  # 3 rows: no bucket; then 2 rows
    assert any("batch 3" in why for why in stats["fallbacks"]), stats


def test_a_static_step_with_a_mask_that_disagrees_with_the_cache_is_refused(shared_dirs):
    be = OnnxRuntimeBackend(shared_dirs["fp32"], threads=1, decode="static")
    be.reset(2)
    be.forward(np.array([[1, 2, 3], [4, 5, 6]]), np.ones((2, 3), np.int64), np.tile(np.arange(3), (2, 1)))
    mask = np.array([[1, 0, 1, 1], [1, 1, 1, 1]])  # row 0: 3 ones, but it caches 3 tokens + this one
    with pytest.raises(BackendError, match="attention_mask disagrees with the cache"):
        be.forward(np.array([[7], [8]]), mask, np.array([[3], [3]]))


def test_graph_mode_is_refused_where_it_cannot_run(shared_dirs, tiny_onnx_dir):
    with pytest.raises(BackendError, match="need --provider cuda"):
        OnnxRuntimeBackend(shared_dirs["fp32"], decode="graph")
    with pytest.raises(BackendError, match="needs a kv_cache='shared' graph"):
        OnnxRuntimeBackend(tiny_onnx_dir, decode="static")
    with pytest.raises(BackendError, match="unknown decode mode"):
        OnnxRuntimeBackend(shared_dirs["fp32"], decode="fast")
    assert OnnxRuntimeBackend(shared_dirs["fp32"]).graph_stats() == {"decode": "dynamic"}  # auto on the CPU


@pytest.mark.gpu
def test_cuda_graph_decode_equals_uncaptured(shared_dirs):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with CUDAExecutionProvider (pip install 'nanogpt-deploy[gpu]')")
    prompts = [[5, 9, 13, 2, 7, 7, 1], [3, 4], [11] * 12]
    params = SamplingParams(temperature=0, max_new_tokens=32, stop_token_ids=())
    dyn = generate(OnnxRuntimeBackend(shared_dirs["fp16"], provider="cuda", decode="dynamic"), None, prompts, params)
    be = OnnxRuntimeBackend(shared_dirs["fp16"], provider="cuda", decode="graph")
    got = generate(be, None, prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in dyn]
    assert be.graph_stats()["captured_buckets"] == [4], be.graph_stats()
