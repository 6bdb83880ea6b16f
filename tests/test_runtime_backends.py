"""Backends: onnxruntime vs torch (logits and greedy tokens), batch == singles, the KV cache, clear load errors,
and the torch-free deploy path (a subprocess where `import torch` and `import onnx` fail)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, max_abs_diff
from runtime.artifact import ArtifactError
from runtime.backends import Backend, BackendError, Capabilities, capabilities_of, load_backend
from runtime.generation import SamplingParams, generate

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [100, 200, 300, 400]]
# Random tied weights make plain greedy repeat the last token; a strong repetition penalty (still greedy,
# still deterministic) forces a new token each step, so the cache is exercised with varied ids.
GREEDY = SamplingParams(temperature=0, max_new_tokens=64, stop_token_ids=())
GREEDY_VARIED = SamplingParams(temperature=0, max_new_tokens=64, repetition_penalty=3.0, stop_token_ids=())


@pytest.fixture(scope="module")
def ort_tiny(tiny_onnx_dir):
    return load_backend("onnxruntime", str(tiny_onnx_dir), threads=1)


@pytest.fixture(scope="module")
def torch_tiny(tiny_model):
    from runtime.backends.torch import TorchBackend

    be = TorchBackend("random:tiny@0")
    be.model = tiny_model  # the very weights tiny_onnx_dir was exported from
    return be


def test_logits_match_torch_over_prefill_and_decode(ort_tiny, torch_tiny):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 512, (2, 10))
    mask = np.ones((2, 10), dtype=np.int64)
    mask[1, :3] = 0  # left padding
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    out = {}
    for be in (ort_tiny, torch_tiny):
        be.reset(2)
        out[be.name] = [be.forward(ids[:, :7], mask[:, :7], pos[:, :7]),   # prefill, past 0
                        be.forward(ids[:, 7:8], mask[:, :8], pos[:, 7:8]),  # decode, past 7
                        be.forward(ids[:, 8:], mask, pos[:, 8:])]           # 2 positions, past 8
    for step, (a, b) in enumerate(zip(out["onnxruntime"], out["torch"])):
        assert a.dtype == np.float32 and a.shape == b.shape
        d = max_abs_diff(a, b)
        assert d <= 1e-4, f"step {step}: max|Δ|={d:.2e} > 1e-4"


@pytest.mark.parametrize("params", [GREEDY, GREEDY_VARIED], ids=["greedy", "greedy-repetition-penalty"])
def test_greedy_tokens_identical_torch_vs_onnxruntime(ort_tiny, torch_tiny, params):
    a = generate(ort_tiny, None, PROMPTS, params)
    b = generate(torch_tiny, None, PROMPTS, params)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(len(c.token_ids) == 64 for c in a)
    if params is GREEDY_VARIED:
        assert len(set(a[0].token_ids)) > 32, "the comparison should cover varied tokens"


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_batch_equals_singles(ort_tiny, torch_tiny, backend):
    be = ort_tiny if backend == "onnxruntime" else torch_tiny
    batched = [c.token_ids for c in generate(be, None, PROMPTS, GREEDY_VARIED)]
    singles = [generate(be, None, [p], GREEDY_VARIED)[0].token_ids for p in PROMPTS]
    assert batched == singles


@pytest.fixture(scope="module")
def ort_tiny_shared(tmp_path_factory, tiny_model):
    from export.onnx import export_onnx

    return load_backend("onnxruntime", str(export_onnx(tiny_model, tmp_path_factory.mktemp("shared"),
                                                          kv_cache="shared").parent), threads=1)


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-shared", "torch"])
def test_keep_rows_equals_never_having_had_the_others(ort_tiny, ort_tiny_shared, torch_tiny, backend):
    be = {"onnxruntime": ort_tiny, "onnxruntime-shared": ort_tiny_shared, "torch": torch_tiny}[backend]
    rng = np.random.default_rng(0)
    ids, nxt = rng.integers(0, 512, (5, 6)), rng.integers(0, 512, (5, 1))
    ones, pos = np.ones((5, 8), np.int64), np.tile(np.arange(8), (5, 1))
    keep = [1, 2, 4]
    be.reset(5)
    be.forward(ids, ones[:, :6], pos[:, :6])
    be.keep_rows(keep)
    got = be.forward(nxt[keep], ones[keep, :7], pos[keep, 6:7])
    be.reset(3)
    be.forward(ids[keep], ones[keep, :6], pos[keep, :6])
    want = be.forward(nxt[keep], ones[keep, :7], pos[keep, 6:7])
    assert got.shape == want.shape and max_abs_diff(got, want) < 1e-5
    after = rng.integers(0, 512, (3, 1))
    step = (after, ones[keep], pos[keep, 7:8])
    be.keep_rows([0, 1, 2])  # all of them: nothing changes
    got = be.forward(*step)
    be.reset(3)
    be.forward(ids[keep], ones[keep, :6], pos[keep, :6])
    be.forward(nxt[keep], ones[keep, :7], pos[keep, 6:7])
    want = be.forward(*step)  # the same three rows, never given keep_rows
    assert got.shape == want.shape and max_abs_diff(got, want) < 1e-5
    with pytest.raises(BackendError, match="ascending"):
        be.keep_rows([2, 0])
    with pytest.raises(BackendError, match="0..2"):
        be.keep_rows([3])


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-shared", "torch"])
@pytest.mark.parametrize("new_len", [3, 9], ids=["shorter", "longer"])
def test_add_rows_equals_each_row_alone(ort_tiny, ort_tiny_shared, torch_tiny, backend, new_len):
    """Two rows run 6 tokens; two more join (left-padded among themselves, shorter or longer than the cache);
    the next steps' logits of all four equal each row's alone."""
    be = {"onnxruntime": ort_tiny, "onnxruntime-shared": ort_tiny_shared, "torch": torch_tiny}[backend]
    rng = np.random.default_rng(1)
    old, new = rng.integers(0, 512, (2, 6)), rng.integers(0, 512, (2, new_len))
    new_mask = np.ones((2, new_len), np.int64)
    new_mask[1, :2] = 0  # the second new row has 2 tokens fewer
    steps = rng.integers(0, 512, (3, 4, 1))
    be.reset(2)
    be.forward(old, np.ones((2, 6), np.int64), np.tile(np.arange(6), (2, 1)))
    joined = be.add_rows(new, new_mask, np.maximum(np.cumsum(new_mask, 1) - 1, 0))
    width = max(6, new_len)
    assert be.past_length == width and joined.shape[0] == 2
    mask = np.zeros((4, width), np.int64)
    mask[:2, width - 6:] = 1
    mask[2:, width - new_len:] = new_mask
    lens = mask.sum(1)
    got = []
    for t, ids in enumerate(steps):
        mask = np.concatenate([mask, np.ones((4, 1), np.int64)], 1)
        got.append(be.forward(ids, mask, (lens + t)[:, None]))
    rows = [old[0], old[1], new[0], new[1, 2:]]
    for r, prompt in enumerate(rows):
        be.reset(1)
        first = be.forward(prompt[None], np.ones((1, len(prompt)), np.int64), np.arange(len(prompt))[None])
        if r >= 2:
            assert max_abs_diff(joined[r - 2, -1], first[0, -1]) < 1e-5, f"row {r}'s prefill logits"
        for t in range(3):
            n = len(prompt) + t
            want = be.forward(steps[t, r:r + 1], np.ones((1, n + 1), np.int64), np.array([[n]]))
            assert max_abs_diff(got[t][r], want[0]) < 1e-5, f"row {r}, step {t}"
    with pytest.raises(BackendError, match="at least one real token"):
        be.add_rows(new[:1], np.zeros((1, new_len), np.int64), np.zeros((1, new_len), np.int64))


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-shared", "torch"])
def test_a_failed_add_rows_leaves_the_running_rows_as_they_were(ort_tiny, ort_tiny_shared, torch_tiny, backend,
                                                                 monkeypatch):
    be = {"onnxruntime": ort_tiny, "onnxruntime-shared": ort_tiny_shared, "torch": torch_tiny}[backend]
    rng = np.random.default_rng(2)
    old, new, nxt = rng.integers(0, 512, (2, 6)), rng.integers(0, 512, (1, 9)), rng.integers(0, 512, (2, 1))
    step = (nxt, np.ones((2, 7), np.int64), np.full((2, 1), 6))
    be.reset(2)
    be.forward(old, np.ones((2, 6), np.int64), np.tile(np.arange(6), (2, 1)))
    want = be.forward(*step)
    be.reset(2)
    be.forward(old, np.ones((2, 6), np.int64), np.tile(np.arange(6), (2, 1)))

    def fail(*a, **k):
        raise RuntimeError("the prefill failed")

    with monkeypatch.context() as m:  # the joining rows' prefill fails, however each backend runs it
        where = be.cache if be.name == "onnxruntime" else be  # onnxruntime: its cache layout runs the prefill
        m.setattr(where, "run_rows" if backend == "onnxruntime-shared" else "forward", fail)
        with pytest.raises(RuntimeError, match="the prefill failed"):
            be.add_rows(new, np.ones((1, 9), np.int64), np.arange(9)[None])
    assert be.past_length == 6
    assert max_abs_diff(be.forward(*step), want) < 1e-5


def test_chained_cache_ops_keep_their_memory(ort_tiny):
    """keep_rows, rewind and drop_front back to back (no forward between; speculative decoding and continuous
    batching do this) on the CPU concat cache: the arrays the OrtValues view are held by the backend itself.
    The view `OrtValue.numpy()` gives of an OrtValue made from numpy does not keep that array alive; an
    in-place op on it that outlived the wrapper read onnxruntime arena memory freed and reused by the next
    run (a join after keep_rows + drop_front once gave a row wrong tokens)."""
    rng = np.random.default_rng(4)
    ids, more, nxt = rng.integers(0, 512, (3, 12)), rng.integers(0, 512, (3, 2)), rng.integers(0, 512, (2, 1))
    mask = np.ones((3, 15), np.int64)
    mask[:, :3] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    keep = [0, 2]
    be = ort_tiny
    be.reset(3)
    be.forward(ids, mask[:, :12], pos[:, :12])
    be.forward(more, mask[:, :14], pos[:, 12:14])
    for op in (lambda: be.keep_rows(keep), lambda: be.rewind(12), lambda: be.drop_front(3)):
        op()
        assert all(np.shares_memory(v.numpy(), h) for v, h in zip(be.cache.past, be.cache.past_host))
    got = be.forward(nxt, mask[keep, 3:13], pos[keep, 12:13])
    be.reset(2)
    be.forward(ids[keep, 3:], mask[keep, 3:12], pos[keep, 3:12])
    want = be.forward(nxt, mask[keep, 3:13], pos[keep, 12:13])
    assert max_abs_diff(got, want) < 1e-5


def test_pack_rows_moves_runs_to_the_front():
    from runtime.backends import pack_rows

    assert pack_rows([0, 1, 3, 4, 6]) == [(2, 3, 2), (4, 6, 1)]  # rows 0, 1 stay; 3-4 move as one run
    assert pack_rows([0, 1, 3, 4, 6], in_place=False) == [(0, 0, 2), (2, 3, 2), (4, 6, 1)]  # into another buffer
    assert pack_rows([2]) == [(0, 2, 1)] and pack_rows([0, 1]) == []
    a = np.arange(7 * 3).reshape(7, 3)
    from runtime.backends.ort_cache import _keep

    want = a[[0, 1, 3, 4, 6]].copy()
    assert np.array_equal(_keep(a, [0, 1, 3, 4, 6]), want) and np.shares_memory(_keep(a, [0]), a)


def test_generation_drops_finished_rows_with_the_same_output(ort_tiny, ort_tiny_shared, torch_tiny, monkeypatch):
    """Rows of unequal max_new_tokens: the finished ones leave the batch; each row still gets its tokens alone."""
    params = [SamplingParams(temperature=0, max_new_tokens=n, repetition_penalty=3.0, stop_token_ids=())
              for n in (4, 40, 6, 40)]
    prompts = PROMPTS + [[5, 5, 5]]
    for be in (ort_tiny, ort_tiny_shared, torch_tiny):
        kept, original = [], type(be).keep_rows

        def spy(self, rows, original=original, kept=kept):
            kept.append(list(rows))
            original(self, rows)

        monkeypatch.setattr(type(be), "keep_rows", spy)
        alone = [generate(be, None, [p], sp)[0].token_ids for p, sp in zip(prompts, params)]
        assert [c.token_ids for c in generate(be, None, prompts, params)] == alone, be.name
        assert kept == [[1, 2, 3], [0, 2]], (be.name, kept)  # row 0 done at 4 tokens, then row 2 at 6
        monkeypatch.undo()


def test_rows_admitted_into_a_running_batch_get_their_tokens_alone(ort_tiny, ort_tiny_shared, torch_tiny):
    """Continuous batching: rows join a running Generation after 5 and 12 steps (prompts shorter and longer
    than its cache, one row finished and dropped before the second join); every row still gets exactly the
    tokens its prompt gets alone, and its own timings."""
    from runtime.generation import Generation, GenerationError

    def sp(n):
        return SamplingParams(temperature=0, max_new_tokens=n, repetition_penalty=3.0, stop_token_ids=())

    first, joins = [([1, 2, 3, 4, 5, 6, 7], sp(20)), ([9, 8], sp(8))], {5: [([7] * 30, sp(10)), ([3, 4], sp(24))],
                                                                        12: [([50, 60, 70], sp(6))]}
    everything = first + [r for rs in joins.values() for r in rs]
    for be in (ort_tiny, ort_tiny_shared, torch_tiny):
        alone = [generate(be, None, [p], s)[0].token_ids for p, s in everything]
        g = Generation(be, None, [p for p, _ in first], [s for _, s in first])
        seen = 0
        for d in g:
            if d.row == 0 and len(g.completions[0].token_ids) in joins:
                rows = joins[len(g.completions[0].token_ids)]
                assert g.admit([p for p, _ in rows], [s for _, s in rows]) == list(range(len(g.completions) - len(rows),
                                                                                          len(g.completions)))
            seen += len(d.token_ids)
        assert [c.token_ids for c in g.completions] == alone, be.name
        assert seen == sum(len(t) for t in alone)
        for c in g.completions:
            assert c.finish_reason == "length" and 0 < c.timing.ttft_s <= c.timing.total_s
            assert len(c.timing.decode_latencies_s) == len(c.token_ids) - 1
        with pytest.raises(GenerationError, match="finished"):
            g.admit([[1]], sp(1))
    g = Generation(ort_tiny, None, [[1, 2]], sp(ort_tiny.config.block_size - 2))
    assert not g.fits([3], [1]) and g.fits([2], [0])  # the cache would outgrow block_size
    with pytest.raises(GenerationError, match="do not fit"):
        g.admit([[1, 2, 3]], sp(1))


def test_released_rows_leave_a_long_running_batch(ort_tiny_shared):
    """A server's batch runs while rows keep joining and leaving: release() drops what a finished row held, so
    the batch holds its live rows only; the rows' tokens (as streamed) are still each prompt's alone."""
    from runtime.generation import Generation, GenerationError

    be, rng = ort_tiny_shared, np.random.default_rng(5)
    reqs = [(rng.integers(1, 500, int(rng.integers(1, 9))).tolist(),
             SamplingParams(temperature=0, max_new_tokens=int(rng.integers(1, 7)),
                            stop_token_ids=())) for _ in range(40)]
    got: dict[int, list[int]] = {}
    g = Generation(be, None, [reqs[0][0]], [reqs[0][1]])
    with pytest.raises(GenerationError, match="still running"):
        g.release(0)
    nxt = 1
    for d in g:
        got.setdefault(d.row, []).extend(d.token_ids)
        if d.finish_reason:
            g.release(d.row)
        while nxt < len(reqs) and g.rows < 3 and g.fits([len(reqs[nxt][0])], [reqs[nxt][1].max_new_tokens]):
            g.admit([reqs[nxt][0]], [reqs[nxt][1]])
            nxt += 1
    assert nxt == len(reqs) and len(g.completions) == len(reqs)
    assert all(c.token_ids == [] and c.finish_reason == "length" for c in g.completions)  # stubs only
    assert all(x is None for x in (*g.prompt_ids, *g.params, *g.table.samplers, *g.table.texts))
    assert [got[r] for r in range(len(reqs))] == [generate(be, None, [p], s)[0].token_ids for p, s in reqs]


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-shared", "torch"])
def test_drop_front_equals_never_having_had_the_padding(ort_tiny, ort_tiny_shared, torch_tiny, backend):
    be = {"onnxruntime": ort_tiny, "onnxruntime-shared": ort_tiny_shared, "torch": torch_tiny}[backend]
    rng = np.random.default_rng(2)
    ids, nxt = rng.integers(0, 512, (2, 9)), rng.integers(0, 512, (2, 1))
    mask = np.ones((2, 9), np.int64)
    mask[:, :3] = 0  # both rows left-padded by 3 (row 1 by 5)
    mask[1, 3:5] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    be.reset(2)
    be.forward(ids, mask, pos)
    be.drop_front(3)
    assert be.past_length == 6
    got = be.forward(nxt, np.concatenate([mask[:, 3:], np.ones((2, 1), np.int64)], 1), pos[:, -1:] + 1)
    be.reset(2)
    be.forward(ids[:, 3:], mask[:, 3:], pos[:, 3:])
    want = be.forward(nxt, np.concatenate([mask[:, 3:], np.ones((2, 1), np.int64)], 1), pos[:, -1:] + 1)
    assert max_abs_diff(got, want) < 1e-5
    with pytest.raises(BackendError, match="cannot drop"):
        be.drop_front(8)


def test_a_batch_that_rows_keep_joining_stays_narrow(ort_tiny, ort_tiny_shared, torch_tiny, monkeypatch):
    """A long prompt's row leaves; the short row left behind no longer needs its left padding, which is dropped
    (drop_front) before a new row joins: tokens stay each prompt's alone."""
    from runtime.generation import Generation

    sp = [SamplingParams(temperature=0, max_new_tokens=n, repetition_penalty=3.0,
                         stop_token_ids=()) for n in (4, 30, 12)]
    prompts = [list(range(1, 41)), [9, 8, 7], [5, 6]]
    for be in (ort_tiny, ort_tiny_shared, torch_tiny):
        dropped, original = [], type(be).drop_front
        monkeypatch.setattr(type(be), "drop_front",
                            lambda self, n, original=original, dropped=dropped: (dropped.append(n), original(self, n)))
        alone = [generate(be, None, [p], s)[0].token_ids for p, s in zip(prompts, sp)]
        g = Generation(be, None, prompts[:2], sp[:2])
        for d in g:
            if d.row == 1 and len(g.completions[1].token_ids) == 10:
                g.admit([prompts[2]], sp[2])
                widths = g.decoding.cache.length
        assert [c.token_ids for c in g.completions] == alone, (be.name, getattr(be, "kv_cache", None))
        assert dropped == [37] and widths < 40 - 37 + 10 + 1, (be.name, dropped, widths)  # row 1's padding went
        monkeypatch.undo()


def test_seeded_sampling_is_reproducible(ort_tiny):
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=32, seed=11, stop_token_ids=())
    a, b = (generate(ort_tiny, None, PROMPTS, params) for _ in range(2))
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    c = generate(ort_tiny, None, PROMPTS, SamplingParams(**{**params.__dict__, "seed": 12}))
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_kv_cache_stays_in_ortvalues_between_steps(ort_tiny):
    import onnxruntime as ort

    ort_tiny.reset(2)
    ort_tiny.forward(np.ones((2, 3), np.int64), np.ones((2, 3), np.int64), np.tile(np.arange(3), (2, 1)))
    ort_tiny.forward(np.ones((2, 1), np.int64), np.ones((2, 4), np.int64), np.full((2, 1), 3))
    past = ort_tiny.cache.past
    assert len(past) == 2 * ort_tiny.config.n_layer
    assert all(isinstance(v, ort.OrtValue) and v.shape() == [2, 4, 4, 16] for v in past)
    assert ort_tiny.past_length == 4


def test_step_errors(ort_tiny):
    c = ort_tiny.config
    ort_tiny.reset(1)
    with pytest.raises(BackendError, match=r"token id 600 is outside this model's vocabulary 0\.\.511"):
        ort_tiny.forward(np.array([[600]]), np.ones((1, 1), np.int64), np.zeros((1, 1), np.int64))
    n = c.block_size + 1
    with pytest.raises(BackendError,
                       match=rf"past \(0\) \+ seq \({n}\) = {n} positions exceeds block_size {c.block_size}"):
        ort_tiny.forward(np.ones((1, n), np.int64), np.ones((1, n), np.int64), np.zeros((1, n), np.int64))
    with pytest.raises(BackendError, match=r"attention_mask is \(1, 2\), expected"):
        ort_tiny.forward(np.ones((1, 1), np.int64), np.ones((1, 2), np.int64), np.zeros((1, 1), np.int64))


class BareBackend(Backend):
    """A backend that checks nothing itself: it records what reaches it (the checks must come from Backend)."""
    name, provider, precision = "bare", "cpu", "fp32"

    def __init__(self, capabilities=None, block_size=8):
        from model.config import GPTConfig

        self.config = GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=16, block_size=block_size)
        self.capabilities = capabilities or Capabilities(device="cpu", max_context=block_size)
        self.calls = []

    def _reset(self, batch_size):
        self.calls.append(("reset", batch_size))

    def _forward(self, ids, mask, pos):
        self.calls.append(("forward", ids.shape, ids.dtype, ids.flags.c_contiguous))
        return np.zeros((*ids.shape, self.config.vocab_size), np.float32)

    def _rewind(self, length):
        self.calls.append(("rewind", length))

    def _drop_front(self, n):
        self.calls.append(("drop_front", n))

    def _keep_rows(self, rows):
        self.calls.append(("keep_rows", rows))

    def _add_rows(self, ids, mask, pos, width):
        self.calls.append(("add_rows", ids.shape, width))
        return np.zeros((*ids.shape, self.config.vocab_size), np.float32)


def test_the_base_class_checks_what_a_backend_that_checks_nothing_gets():
    be = BareBackend()
    ones = lambda *shape: np.ones(shape, np.int64)  # noqa: E731
    bad = [
        (lambda: be.forward(np.array([[16]]), ones(1, 1), ones(1, 1)),
         "token id 16 is outside this model's vocabulary"),
        (lambda: be.forward(ones(1, 3), ones(1, 2), ones(1, 3)), r"attention_mask is \(1, 2\), expected"),
        (lambda: be.forward(ones(1, 9), ones(1, 9), ones(1, 9)), "exceeds block_size 8"),
        (lambda: be.forward(ones(3), ones(3), ones(3)), "must both be \\(batch, seq\\)"),
    ]
    for call, match in bad:
        with pytest.raises(BackendError, match=match):
            call()
    assert "forward" not in [c[0] for c in be.calls], be.calls  # no forward reached the backend
    with pytest.raises(BackendError, match="add_rows joins rows to a running batch"):
        BareBackend().add_rows(ones(1, 2), ones(1, 2), ones(1, 2))
    be.calls.clear()
    be.forward(np.ones((2, 3), np.int32), ones(2, 3),
               np.asfortranarray(np.tile(np.arange(3), (2, 1))))  # int32; F order
    assert be.calls == [("reset", 2), ("forward", (2, 3), np.dtype(np.int64), True)]  # int64, C-contiguous
    assert (be.past_length, be._batch) == (3, 2)
    with pytest.raises(BackendError, match="batch size changed from 2 to 1 mid-sequence"):
        be.forward(ones(1, 1), ones(1, 4), ones(1, 1))
    for call, match in [(lambda: be.rewind(4), "cannot rewind the KV cache to 4 positions: it holds 3"),
                        (lambda: be.drop_front(4), "cannot drop the first 4 positions"),
                        (lambda: be.keep_rows([1, 0]), "distinct ascending row indices in 0..1"),
                        (lambda: be.keep_rows([2]), "distinct ascending row indices in 0..1"),
                        (lambda: be.add_rows(ones(1, 2), np.zeros((1, 2), np.int64), ones(1, 2)),
                         "at least one real token")]:
        with pytest.raises(BackendError, match=match):
            call()
    be.calls.clear()
    be.rewind(3), be.drop_front(0), be.keep_rows([0, 1])  # no-ops never reach the backend
    assert be.calls == [] and (be.past_length, be._batch) == (3, 2)
    be.rewind(2), be.drop_front(1), be.keep_rows([1])
    assert be.calls == [("rewind", 2), ("drop_front", 1), ("keep_rows", [1])] and (be.past_length, be._batch) == (1, 1)
    be.add_rows(ones(2, 4), ones(2, 4), ones(2, 4))
    assert be.calls[-1] == ("add_rows", (2, 4), 4) and (be.past_length, be._batch) == (4, 3)


def test_a_backend_cannot_override_the_checked_methods():
    with pytest.raises(TypeError, match="overrides Backend.forward, which check.*implement _forward instead"):
        class Unchecked(BareBackend):  # noqa: F841
            def forward(self, input_ids, attention_mask, position_ids):
                return self._forward(input_ids, attention_mask, position_ids)
    with pytest.raises(TypeError, match="abstract"):
        type("Incomplete", (Backend,), {"_reset": lambda self, b: None})()


def test_capabilities_are_declared_and_read_instead_of_probed(ort_tiny, ort_tiny_shared, torch_tiny):
    for be, ragged in ((ort_tiny, False), (ort_tiny_shared, True), (torch_tiny, False)):
        caps = capabilities_of(be)
        assert caps is be.capabilities
        assert (caps.device, caps.max_context, caps.max_batch, caps.ragged_cache) == ("cpu", 128, None, ragged), be.name
        assert caps.rewind and caps.keep_rows and caps.drop_front and caps.add_rows

    class Fake:  # a duck-typed stand-in (a test's fake, a wrapper): what its methods offer
        config, kv_cache = BareBackend().config, "shared"

        def rewind(self, length): ...

    caps = capabilities_of(Fake())
    assert (caps.rewind, caps.keep_rows, caps.drop_front, caps.add_rows, caps.ragged_cache, caps.max_context) == \
        (True, False, False, False, True, 8)

    # generation reads the declaration: a backend that says it cannot drop rows keeps them (no keep_rows call)
    for keep in (True, False):
        be = BareBackend(Capabilities(device="cpu", max_context=32, keep_rows=keep), block_size=32)
        generate(be, None, [[1, 2], [3]], [SamplingParams(temperature=0, max_new_tokens=n, stop_token_ids=())
                                          for n in (1, 16)])
        assert any(c[0] == "keep_rows" for c in be.calls) == keep, be.calls


def _copy_with_metadata(src: Path, dst: Path, edit) -> Path:
    """Copy an export, letting `edit(metadata_props)` change its metadata (onnx proto, weights left outside)."""
    onnx = pytest.importorskip("onnx")
    dst.mkdir(parents=True, exist_ok=True)
    m = onnx.load(str(src / "model.onnx"), load_external_data=False)
    edit(m.metadata_props)
    onnx.save(m, str(dst / "model.onnx"))
    shutil.copy(src / "model.onnx.data", dst / "model.onnx.data")
    return dst


def test_load_errors_are_clear(tiny_onnx_dir, tmp_path):
    with pytest.raises(ArtifactError, match="does not exist; give the file or the folder holding model.onnx"):
        load_backend("onnxruntime", str(tmp_path / "nowhere"))
    with pytest.raises(BackendError,
                       match=r"unknown backend 'onnx'; choose one of \['onnxruntime', 'tensorrt', 'torch'\]"):
        load_backend("onnx", str(tiny_onnx_dir))
    with pytest.raises(BackendError, match="unknown provider 'gpu'"):
        load_backend("onnxruntime", str(tiny_onnx_dir), provider="gpu")

    bare = _copy_with_metadata(tiny_onnx_dir, tmp_path / "bare", lambda props: props.clear())
    with pytest.raises(ArtifactError, match="has no nanogpt-deploy metadata; export it with"):
        load_backend("onnxruntime", str(bare))

    nodata = tmp_path / "nodata"
    nodata.mkdir()
    shutil.copy(tiny_onnx_dir / "model.onnx", nodata / "model.onnx")
    with pytest.raises(ArtifactError) as e:
        load_backend("onnxruntime", str(nodata))
    assert "model.onnx.data, which is missing" in str(e.value) and "copy the whole exported folder" in str(e.value)


def _zero_filled_copy(src: Path, dst: Path) -> Path:
    """What a failed copy or a sparse pre-allocation leaves: model.onnx intact, model.onnx.data the right size, all
    zeros."""
    shutil.copytree(src, dst)
    size = (dst / "model.onnx.data").stat().st_size
    (dst / "model.onnx.data").write_bytes(bytes(size))
    return dst


def test_zero_filled_weights_are_refused_naming_the_file_and_the_fix(tiny_onnx_dir, tmp_path, capsys):
    from runtime.cli import main
    from runtime.files import sha256_file

    art = load_backend("onnxruntime", str(tiny_onnx_dir)).artifact
    assert art.data_sha256 == {"model.onnx.data": sha256_file(tiny_onnx_dir / "model.onnx.data")}, art.data_sha256
    bad = _zero_filled_copy(tiny_onnx_dir, tmp_path / "zeros")
    with pytest.raises(ArtifactError) as e:
        load_backend("onnxruntime", str(bad))
    msg = str(e.value)
    data = bad / "model.onnx.data"
    assert f"{data} ({data.stat().st_size} bytes) is not the weights file" in msg, msg
    assert "re-copy the whole exported folder or re-export it" in msg and "--no-verify-weights" in msg, msg
    # the CLI: exit 1 with that message (it ran and exited 0 before), and the explicit opt-out still loads it
    gen = ["generate", str(bad), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--json"]
    assert main(gen) == 1 and "is not the weights file exported with model.onnx" in capsys.readouterr().err
    assert main(gen + ["--no-verify-weights"]) == 0, capsys.readouterr().err
    load_backend("onnxruntime", str(bad), verify_weights=False)


def test_an_artifact_without_a_weights_digest_loads_with_a_warning(tiny_onnx_dir, tmp_path):
    from runtime.artifact import PREFIX

    old = _copy_with_metadata(tiny_onnx_dir, tmp_path / "old", lambda props: props.remove(
        next(p for p in props if p.key == PREFIX + "data_sha256")))  # an export from before the field
    with pytest.warns(UserWarning, match="records no digest of its weights .* re-export it to add one"):
        be = load_backend("onnxruntime", str(old))
    assert be.artifact.data_sha256 is None


def test_graph_io_names_that_differ_from_the_metadata_are_listed_both_ways(tiny_onnx_dir, tmp_path):
    """README: the runtime compares the graph's actual I/O names with the expected ones at load and lists both
    differences. One output renamed in the graph (not in the metadata): the old name is missing, the new unexpected."""
    onnx = pytest.importorskip("onnx")
    dst = tmp_path / "renamed"
    dst.mkdir()
    m = onnx.load(str(tiny_onnx_dir / "model.onnx"), load_external_data=False)  # weights stay in model.onnx.data
    old, new = "present.0.value", "present_0_value"
    [out] = [o for o in m.graph.output if o.name == old]
    out.name = new
    for node in m.graph.node:
        node.output[:] = [new if n == old else n for n in node.output]
        node.input[:] = [new if n == old else n for n in node.input]
    onnx.save(m, str(dst / "model.onnx"))
    shutil.copy(tiny_onnx_dir / "model.onnx.data", dst / "model.onnx.data")
    with pytest.raises((ArtifactError, BackendError)) as e:
        load_backend("onnxruntime", str(dst), threads=1)
    msg = str(e.value)
    assert "output names differ" in msg, msg
    assert f"missing [{old!r}]" in msg and f"unexpected [{new!r}]" in msg, msg


def test_cuda_provider_missing_names_the_gpu_extra(tiny_onnx_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA EP present: nothing to refuse")
    with pytest.raises(BackendError, match=r"pip install 'nanogpt-deploy\[gpu\]'"):
        load_backend("onnxruntime", str(tiny_onnx_dir), provider="cuda")


def test_torch_backend_loads_the_source_an_export_records(tiny_onnx_dir, tmp_path):
    from runtime.artifact import PREFIX
    from runtime.backends.torch import checkpoint_source

    def set_source(value):
        def edit(props):
            for p in props:
                if p.key == PREFIX + "source":
                    p.value = value
                    return
            props.add(key=PREFIX + "source", value=value)
        return edit

    good = _copy_with_metadata(tiny_onnx_dir, tmp_path / "good", set_source("random:tiny@0"))
    assert checkpoint_source(good) == "random:tiny@0"
    assert checkpoint_source("random:tiny@0") == "random:tiny@0"
    gone = _copy_with_metadata(tiny_onnx_dir, tmp_path / "gone", set_source("/no/such/ckpt.pt"))
    with pytest.raises(BackendError, match="give the torch backend the checkpoint itself"):
        checkpoint_source(gone)


TORCH_FREE = textwrap.dedent("""
    import json, sys
    sys.modules["torch"] = None   # `import torch` raises ImportError, as on a deploy machine
    sys.modules["onnx"] = None    # the runtime install has onnxruntime, not onnx
    import runtime, runtime.generation, runtime.sampling, runtime.tokenizer, runtime.artifact, runtime.backends
    from runtime.backends import load_backend
    from runtime.generation import SamplingParams, generate
    from runtime.cli import main
    be = load_backend("onnxruntime", sys.argv[1], threads=1)
    [c] = generate(be, None, [[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=()))
    print(json.dumps(c.token_ids))
    assert main(["generate", sys.argv[1], "--prompt-ids", "1,2,3", "--temperature", "0", "--max-new-tokens", "8",
                 "--ignore-eos", "--json", "--threads", "1"]) == 0
    draft = load_backend("onnxruntime", sys.argv[1], threads=1, spinning=False)  # speculative: still no torch
    [s] = generate(be, None, [[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=()),
                   draft=draft)
    assert s.token_ids == c.token_ids
    loaded = {"model.gpt", "model.checkpoints", "export.onnx", "runtime.backends.torch"} & set(sys.modules)
    assert not loaded, f"the deploy path imported {sorted(loaded)}"
""")


def test_runtime_and_onnxruntime_generation_work_without_torch(tiny_onnx_dir, ort_tiny):
    r = subprocess.run([sys.executable, "-c", TORCH_FREE, str(tiny_onnx_dir)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    expected = generate(ort_tiny, None, [[1, 2, 3]], SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=()))
    assert json.loads(lines[0]) == expected[0].token_ids
    doc = json.loads("\n".join(lines[1:]))
    assert doc["completions"][0]["token_ids"] == expected[0].token_ids


@pytest.mark.gpu
def test_cuda_provider_matches_cpu_and_keeps_the_cache_on_the_device(tiny_onnx_dir, ort_tiny):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with CUDAExecutionProvider (pip install 'nanogpt-deploy[gpu]')")
    cuda = load_backend("onnxruntime", str(tiny_onnx_dir), provider="cuda")
    assert cuda.provider == "CUDAExecutionProvider"
    a = generate(cuda, None, PROMPTS, GREEDY_VARIED)
    b = generate(ort_tiny, None, PROMPTS, GREEDY_VARIED)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert all(v.device_name().lower() == "cuda" for v in cuda.cache.past)


@pytest.mark.slow
def test_greedy_tokens_identical_on_the_124m_shape(tmp_path_factory):
    """GPT-2 124M shape (random weights, seed 0): 64 greedy tokens, torch vs onnxruntime."""
    from export.onnx import export_onnx
    from runtime.backends.torch import TorchBackend

    torch_be = TorchBackend("random:gpt2@0")
    out = tmp_path_factory.mktemp("gpt2_onnx")
    import inspect

    # the exporter's own parity check is tested with the exporter; here only generation is compared
    skip_check = {"validate": False} if "validate" in inspect.signature(export_onnx).parameters else {}
    export_onnx(torch_be.model, out, **skip_check)
    ort_be = load_backend("onnxruntime", str(out))
    prompts = [[464, 3290, 318, 13779], [15496, 11]]
    a = generate(ort_be, None, prompts, GREEDY_VARIED)
    b = generate(torch_be, None, prompts, GREEDY_VARIED)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]


@pytest.mark.parametrize("tf32, want", [(None, "0"), (False, "0"), (True, "1")])
def test_cuda_provider_runs_fp32_without_tf32_unless_asked(tiny_onnx_dir, monkeypatch, tf32, want):
    # the CUDA EP runs fp32 MatMuls in TF32 by default (124M fp32: 2.5e-3 off the CPU reference); the providers
    # the session is opened with are checked here, on the CPU (a fake CUDA EP: no session is made)
    import onnxruntime as ort

    import runtime.backends.onnxruntime as ob

    seen = {}

    def fake_open(ort_, path, so, providers):
        seen["providers"] = providers
        raise RuntimeError("stop: no CUDA here")

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ob, "_open_session", fake_open)
    with pytest.raises(RuntimeError, match="stop"):
        ob.OnnxRuntimeBackend(tiny_onnx_dir, provider="cuda", **({} if tf32 is None else {"tf32": tf32}))
    ep, options = seen["providers"][0]
    assert ep == "CUDAExecutionProvider" and options.get("use_tf32") == want, \
        f"tf32={tf32}: CUDA provider options {options}, expected use_tf32={want}"
