"""kv_cache="shared": the GroupQueryAttention rewrite (export/kv_shared.py) and the in-place cache the
onnxruntime backend binds to it: parity with torch through ragged batches, growth, and the errors."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import max_abs_diff
from export.check import PARITY_ATOL, new_session, parity_feeds
from export.graph import save_model
from export.kv_shared import GraphPatternError, share_kv_cache
from export.onnx import export_onnx
from runtime.artifact import read_onnx_artifact
from runtime.backends import BackendError, load_backend
from runtime.generation import SamplingParams, generate

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [100, 200, 300, 400]]
GREEDY_VARIED = SamplingParams(temperature=0, max_new_tokens=40, repetition_penalty=3.0, stop_token_ids=())


@pytest.fixture(scope="module", params=[18, 23])
def shared_dir(request, tmp_path_factory, tiny_model):
    """The tiny model exported with kv_cache="shared" (opset 18: SDPA decomposed; 23: one Attention node)."""
    out = tmp_path_factory.mktemp(f"shared{request.param}")
    export_onnx(tiny_model, out, opset=request.param, kv_cache="shared")
    return out


@pytest.fixture(scope="module")
def torch_tiny(tiny_model):
    from runtime.backends.torch import TorchBackend

    be = TorchBackend("random:tiny@0")
    be.model = tiny_model
    return be


def test_export_rewrites_every_layer_and_records_parity(shared_dir, tiny_model):
    m = onnx.load(str(shared_dir / "model.onnx"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("GroupQueryAttention") == tiny_model.config.n_layer
    assert "Concat" not in ops and "Attention" not in ops and "Softmax" not in ops
    art = read_onnx_artifact(shared_dir)
    assert art.kv_cache == "shared"
    parity = art.extra["parity"]
    assert any("pad" in k for k in parity["shapes"])  # ragged rows were checked, in the runtime's layout
    assert parity["max_abs_diff"] <= PARITY_ATOL, parity


def test_rewritten_graph_equals_the_concat_graph_when_called_like_it(tiny_onnx_dir, tiny_model, tmp_path):
    """Without padding, fed like a concat graph (growing past in, past + new out), the rewrite changes nothing."""
    proto = share_kv_cache(onnx.load(str(tiny_onnx_dir / "model.onnx")), tiny_model.config)
    save_model(proto, tmp_path / "model.onnx")
    a, b = new_session(tiny_onnx_dir / "model.onnx"), new_session(tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    for batch, seq, past in [(1, 1, 0), (2, 7, 0), (3, 1, 9), (1, 5, 6)]:
        feeds = parity_feeds(tiny_model.config, batch, seq, past, 0, rng)
        for name, x, y in zip(["logits", "present"], a.run(None, feeds), b.run(None, feeds)):
            assert x.shape == y.shape and max_abs_diff(x, y) < 1e-5, (name, batch, seq, past)


def test_rewrite_refuses_graphs_it_does_not_know(tiny_onnx_dir, tiny_model):
    proto = share_kv_cache(onnx.load(str(tiny_onnx_dir / "model.onnx")), tiny_model.config)
    with pytest.raises(GraphPatternError, match="already uses GroupQueryAttention"):
        share_kv_cache(proto, tiny_model.config)
    proto = onnx.load(str(tiny_onnx_dir / "model.onnx"))
    cat = next(n for n in proto.graph.node if "present.0.key" in n.output)
    cat.op_type = "Identity"
    with pytest.raises(GraphPatternError, match="expected Concat for present.0.key.*kv_cache='concat'"):
        share_kv_cache(proto, tiny_model.config)


def test_backend_steps_match_torch_through_padding_and_ragged_decode(shared_dir, torch_tiny):
    """Left-padded prefill (row by row) then 40 batched decode steps with rows of different lengths."""
    be = load_backend("onnxruntime", str(shared_dir), threads=1)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 512, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[1, :5], mask[2, :2] = 0, 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    be.reset(3), torch_tiny.reset(3)
    worst = 0.0
    for step in range(41):
        want, got = torch_tiny.forward(ids, mask, pos), be.forward(ids, mask, pos)
        real = mask[:, -ids.shape[1]:] == 1
        worst = max(worst, max_abs_diff(want[real], got[real]))
        ids = want[:, -1].argmax(-1)[:, None] if step % 2 else rng.integers(0, 512, (3, 1))
        mask, pos = np.concatenate([mask, np.ones((3, 1), np.int64)], 1), pos[:, -1:] + 1
    assert worst <= PARITY_ATOL, f"max|Δlogits|={worst:.2e} > {PARITY_ATOL}"
    assert list(be.cache.rows) == [49, 44, 47]  # real tokens per row, left-aligned in the buffers


def test_cache_is_written_in_place(shared_dir):
    be = load_backend("onnxruntime", str(shared_dir), threads=1)
    be.reset(2)
    ids, mask = np.array([[0, 0, 5, 6], [1, 2, 3, 4]]), np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    be.forward(ids, mask, np.maximum(np.cumsum(mask, 1) - 1, 0))
    buffers = [id(b) for b in be.cache.buffers]
    key0 = be.cache.buffers[0]
    assert np.any(key0[0, :, 1] != 0) and not np.any(key0[0, :, 2:] != 0)  # row 0: 2 real tokens at slots 0, 1
    assert np.any(key0[1, :, 3] != 0) and not np.any(key0[1, :, 4:] != 0)
    be.forward(np.array([[7], [7]]), np.ones((2, 5), np.int64) - np.array([[1, 1, 0, 0, 0], [0] * 5]),
               np.array([[2], [4]]))
    assert [id(b) for b in be.cache.buffers] == buffers  # no new buffers: onnxruntime wrote into ours
    assert np.any(key0[0, :, 2] != 0) and np.any(key0[1, :, 4] != 0)  # each row's new key at its own length


def test_capacity_grows_and_generation_matches_torch(shared_dir, torch_tiny, monkeypatch):
    import runtime.backends.ort_cache as ortb

    monkeypatch.setattr(ortb, "MIN_CAPACITY", 4)  # 4 -> 8 -> 16 -> 32 -> 64 while generating
    be = load_backend("onnxruntime", str(shared_dir), threads=1)
    got = [c.token_ids for c in generate(be, None, PROMPTS, GREEDY_VARIED)]
    assert be.cache.capacity >= 47 and be.cache.capacity < 128
    want = [c.token_ids for c in generate(torch_tiny, None, PROMPTS, GREEDY_VARIED)]
    assert got == want
    alone = [generate(be, None, [p], GREEDY_VARIED)[0].token_ids for p in PROMPTS]
    assert got == alone



def test_cpu_buffers_outlive_reset_and_never_shrink(shared_dir, torch_tiny, monkeypatch):
    """A one-row prompt longer than the buffers must grow them for every row they held: a wide batch after it
    reuses the same arrays (no fresh pages to fault in mid-decode) and still generates like torch."""
    import runtime.backends.ort_cache as ortb

    monkeypatch.setattr(ortb, "MIN_CAPACITY", 4)
    be = load_backend("onnxruntime", str(shared_dir), threads=1)
    generate(be, None, PROMPTS, GREEDY_VARIED)
    rows, cap = be.cache.base[0].shape[0], be.cache.base[0].shape[2]
    generate(be, None, [list(range(1, cap + 3))], SamplingParams(max_new_tokens=2, temperature=0.0))
    base = be.cache.base[0]
    assert base.shape[0] >= rows and base.shape[2] >= cap + 4
    got = [c.token_ids for c in generate(be, None, PROMPTS, GREEDY_VARIED)]
    assert be.cache.base[0] is base  # reused, not reallocated
    assert got == [c.token_ids for c in generate(torch_tiny, None, PROMPTS, GREEDY_VARIED)]

def test_quantized_shared_variant_generates_like_the_concat_one(tiny_model, tmp_path):
    """int8 with an in-place cache == int8 with a concat cache (one row at a time: int8's dynamic activation
    scale is per tensor, so a row's tokens depend on its batch-mates in either layout)."""
    dirs = {kv: export_onnx(tiny_model, tmp_path / kv, quantize="int8", kv_cache=kv).parent
            for kv in ("concat", "shared")}
    art = read_onnx_artifact(dirs["shared"])
    assert (art.precision, art.kv_cache) == ("int8", "shared")
    tokens = {kv: [generate(load_backend("onnxruntime", str(d), threads=1), None, [p], GREEDY_VARIED)[0].token_ids
                   for p in PROMPTS] for kv, d in dirs.items()}
    assert tokens["shared"] == tokens["concat"]
    assert all(len(t) == 40 for t in tokens["shared"])


def test_bad_masks_are_refused(shared_dir):
    be = load_backend("onnxruntime", str(shared_dir), threads=1)
    be.reset(1)
    with pytest.raises(BackendError, match="pads inside the new tokens"):
        be.forward(np.array([[1, 2, 3]]), np.array([[1, 0, 1]]), np.array([[0, 1, 1]]))
    be.reset(1)
    be.forward(np.array([[1, 2]]), np.ones((1, 2), np.int64), np.array([[0, 1]]))
    with pytest.raises(BackendError, match="disagrees with the cache"):
        be.forward(np.array([[3]]), np.array([[0, 0, 1]]), np.array([[2]]))


def test_tensorrt_refuses_shared_graphs():
    from export.tensorrt import EngineBuildError, check_kv_cache

    check_kv_cache("concat")
    with pytest.raises(EngineBuildError, match="GroupQueryAttention.*without `--kv-cache shared`"):
        check_kv_cache("shared")


@pytest.mark.gpu
def test_cuda_fp16_shared_cache_lives_on_the_device_and_follows_cpu(tiny_model, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with CUDAExecutionProvider (pip install 'nanogpt-deploy[gpu]')")
    out = export_onnx(tiny_model, tmp_path / "fp16", dtype="fp16", kv_cache="shared").parent
    cuda, cpu = (load_backend("onnxruntime", str(out), provider=p) for p in ("cuda", "cpu"))
    a = [c.token_ids for c in generate(cuda, None, PROMPTS, GREEDY_VARIED)]
    b = [c.token_ids for c in generate(cpu, None, PROMPTS, GREEDY_VARIED)]
    agree = np.mean([x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)])
    assert agree >= 0.9, f"fp16 CUDA vs CPU greedy agreement {agree:.2f}"
    assert all(v.device_name().lower() == "cuda" for v in cuda.cache.buffers)
    fp32 = export_onnx(tiny_model, tmp_path / "fp32", kv_cache="shared").parent
    with pytest.raises(BackendError, match="CUDA provider has in fp16 only"):
        load_backend("onnxruntime", str(fp32), provider="cuda")


@pytest.mark.parametrize("logits", ["all", "last"])
def test_long_prompts_prefill_in_chunks_with_the_same_logits(tiny_model, torch_tiny, tmp_path, monkeypatch, logits):
    import runtime.backends.ort_cache as ortb

    out = export_onnx(tiny_model, tmp_path / logits, logits=logits, kv_cache="shared").parent
    be = load_backend("onnxruntime", str(out), threads=1)
    monkeypatch.setattr(ortb, "PREFILL_CHUNK", 3)  # 11 tokens: chunks 3 + 3 + 3 + 2; the padded row: 3 + 3 + 1
    ids = np.random.default_rng(2).integers(0, 512, (2, 11))
    mask = np.ones((2, 11), np.int64)
    mask[1, :4] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    for rows in ([0], [0, 1]):
        be.reset(len(rows)), torch_tiny.reset(len(rows))
        got, want = be.forward(ids[rows], mask[rows], pos[rows]), torch_tiny.forward(ids[rows], mask[rows], pos[rows])
        want = want[:, -got.shape[1]:]
        real = mask[rows][:, -got.shape[1]:] == 1
        assert max_abs_diff(got[real], want[real]) <= PARITY_ATOL
        nxt = np.array([[7]] * len(rows))  # and the cache the chunks left behind decodes right
        m2, p2 = np.concatenate([mask[rows], np.ones((len(rows), 1), np.int64)], 1), pos[rows][:, -1:] + 1
        assert max_abs_diff(be.forward(nxt, m2, p2), torch_tiny.forward(nxt, m2, p2)[:, -1:]) <= PARITY_ATOL
