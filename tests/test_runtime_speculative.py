"""Speculative decoding (runtime/generation/speculative.py), Backend.rewind and logits="last:N" exports.

The claim under test: with any draft, the output is the target's own output (greedy, seeded sampling,
repetition penalty, stops, length limits), because the target's sampler picks every token. A draft with
other weights (acceptance low: the rejection path runs every round) and the target's own int8 export
(acceptance high: whole rounds accepted, bonus tokens) must both give exactly the tokens of plain
generation on the target.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import max_abs_diff
from export.check import check_symbolic_axes
from export.onnx import ExportError, export_onnx
from export.trace import LOGITS_AXIS
from model.config import PRESETS
from runtime.artifact import Artifact, ArtifactError, logits_keep, read_onnx_artifact
from runtime.backends import BackendError, load_backend
from runtime.generation import GenerationError, SamplingParams, SpeculativeGeneration, draft_for, generate

TINY_CONFIG = PRESETS["tiny"]

PROMPT = [5, 17, 99, 3, 250, 41, 7]
PARAMS = {
    "greedy": SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=()),
    "penalty": SamplingParams(temperature=0, max_new_tokens=40, repetition_penalty=3.0, stop_token_ids=()),
    "sampled": SamplingParams(temperature=1.0, top_k=0, seed=7, max_new_tokens=40, stop_token_ids=()),
    "top_p": SamplingParams(temperature=0.9, top_p=0.8, seed=3, max_new_tokens=33, stop_token_ids=()),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_model):
    """Targets keeping 5 logits positions (shared and concat KV caches), and two drafts: the same weights in
    int8 (shared and concat), and another random model (seed 1, concat)."""
    from model import GPT

    root = tmp_path_factory.mktemp("spec")
    d = {
        "target_shared": export_onnx(tiny_model, root / "t_shared", logits="last:5", kv_cache="shared").parent,
        "target_concat": export_onnx(tiny_model, root / "t_concat", logits="last:5").parent,
        "int8": export_onnx(tiny_model, root / "int8", quantize="int8", logits="last", kv_cache="shared").parent,
        "int8_concat": export_onnx(tiny_model, root / "int8_concat", quantize="int8", logits="last").parent,
        "other": export_onnx(GPT.from_pretrained("random:tiny@1"), root / "other", logits="last").parent,
        "last": export_onnx(tiny_model, root / "last", logits="last", kv_cache="shared").parent,
    }
    return d


def ort(path, **kw):
    return load_backend("onnxruntime", str(path), threads=2, **kw)


@pytest.mark.parametrize("target", ["target_shared", "target_concat"])
@pytest.mark.parametrize("draft", ["int8", "other"])
@pytest.mark.parametrize("mode", list(PARAMS))
def test_output_is_the_targets_own(exports, target, draft, mode):
    t, dr = ort(exports[target]), ort(exports[draft], spinning=False)
    sp = PARAMS[mode]
    [plain] = generate(t, None, [PROMPT], sp)
    g = SpeculativeGeneration(t, None, [PROMPT], sp, dr, speculate=4, adaptive=False)  # every round guesses 4
    deltas = list(g)
    [spec] = g.completions
    assert spec.token_ids == plain.token_ids and len(spec.token_ids) == sp.max_new_tokens
    assert [tok for d in deltas for tok in d.token_ids] == spec.token_ids  # streamed as produced
    assert spec.finish_reason == "length" and deltas[-1].finish_reason == "length"
    assert len(spec.timing.decode_latencies_s) == len(spec.token_ids) - 1
    s = g.stats
    assert s["rounds"] >= 1 and 0 <= s["accepted"] <= s["drafted"]
    assert s["tokens_per_target_step"] == pytest.approx((len(spec.token_ids) - 1) / s["rounds"])
    if draft == "int8" and mode in ("greedy", "penalty"):
        assert s["acceptance"] > 0.7, s  # the same weights guess the target's greedy picks
        assert s["tokens_per_target_step"] > 2.5, s


def test_a_bad_draft_is_only_slower(exports):
    t, dr = ort(exports["target_shared"]), ort(exports["other"], spinning=False)
    g = SpeculativeGeneration(t, None, [PROMPT], PARAMS["sampled"], dr, speculate=4, adaptive=False)
    list(g)
    assert g.stats["acceptance"] < 0.5, g.stats  # the rejection path ran in most rounds


@pytest.mark.parametrize("draft", ["int8", "other"])
def test_adaptive_depth_keeps_the_output(exports, draft):
    """Adaptive rounds guess 0..K; a draft that almost never agrees (another model, sampled) ends up at 0."""
    t, dr = ort(exports["target_shared"]), ort(exports[draft], spinning=False)
    for mode in ("greedy", "sampled"):
        [plain] = generate(t, None, [PROMPT], PARAMS[mode])
        g = SpeculativeGeneration(t, None, [PROMPT], PARAMS[mode], dr, speculate=4)
        list(g)
        assert g.completions[0].token_ids == plain.token_ids
        if draft == "other" and mode == "sampled":
            assert g.stats["plain_rounds"] > g.stats["rounds"] / 2, g.stats


def test_depth_picks_the_fastest_number_of_guesses():
    from runtime.generation.depth import Depth

    d = Depth(max_k=4)
    assert d.next(4) == 0  # first a plain round: the cost to beat
    d.update(0, [0], 0.023)
    assert d.next(4) == 4  # then the deepest
    d.update(4, [4], None)  # the round the draft prefilled in: no sample of a round's cost
    assert d.next(4) == 4
    d.t_round[4] = 0.043  # the 124M shape at batch 1: an fp32 target step 23 ms, an int8 draft step 5 ms

    def seen(rates):  # evidence: 100 checks at each position, accepted at these rates
        d.tries, d.hits, d.plain = np.full(4, 100.0), np.array(rates, float) * 100, 0

    for rates, want in (([0.99] * 4, 4), ([0.45] * 4, 1), ([0.05] * 4, 0), ([0.45, 0.9, 0.9, 0.9], 4)):
        seen(rates)
        assert d.next(4) == want, rates  # runs of agreement (the last case) are worth guessing deep for
    seen([0.05] * 4)
    assert d.next(2) == 0 and Depth(4, adaptive=False).next(3) == 3
    seen([0.05] * 4)
    assert [d.next(4) for _ in range(Depth.PROBE_EVERY)][-1] == 1  # a probe after PROBE_EVERY plain rounds
    picks = [d.next(4) for _ in range(2 * Depth.PROBE_EVERY)]  # it changed nothing: the next one waits twice as long
    assert picks.index(1) == 2 * Depth.PROBE_EVERY - 1
    seen([0.99] * 4)
    assert d.next(4) == 4 and d.probe_every == Depth.PROBE_EVERY  # agreement came back
    d.t_round[4] = 5 * 0.023  # a draft step as slow as the target's never pays, even when it always agrees
    seen([1.0] * 4)
    assert d.next(4) == 0

    # batch 8: each guess checked costs the target arithmetic too, so fewer guesses pay
    seen([0.7] * 4)
    d.t_round[:] = [0.028, np.nan, np.nan, np.nan, 0.028 + 4 * 0.005]
    assert d.next(4) == 3
    d.t_round[4] = 0.028 + 4 * (0.005 + 0.008)
    assert d.next(4) == 1

    d = Depth(max_k=4)  # a draft that missed every guess of its first (unmeasured) round is not measured again:
    d.update(0, [0] * 8, 0.03)  # even free guesses would not clear the hurdle (a round costs a plain one at least)
    d.update(4, [0] * 8, None)
    assert d.next(4) == 0
    d.plain = Depth.PROBE_EVERY
    assert d.next(4, catch_up=40, left=70) == 0  # a probe would not win its 40-token catch-up back in 70 tokens
    assert d.next(4, catch_up=40, left=80) == 1

    d = Depth(max_k=4)
    d.update(4, [2], 0.02)  # guesses 1, 2 accepted, 3 missed, 4 never checked
    assert d.tries.tolist() == [1, 1, 1, 0] and d.hits.tolist() == [1, 1, 0, 0]
    assert d.acceptance().tolist() == pytest.approx([0.75, 0.875, 0.4375, 0.4375])  # position 4: as position 3
    d.update(4, [4], 0.03)  # all accepted
    assert d.tries.tolist() == pytest.approx([1.9, 1.9, 1.9, 1]) and d.hits.tolist() == pytest.approx([1.9, 1.9, 1, 1])
    assert d.t_round[4] == pytest.approx(0.9 * 0.02 + 0.1 * 0.03)
    d.update(2, [2, 0, 1], 0.05)  # a batch: each row's guesses count; the cost is k's own
    assert d.tries.tolist() == pytest.approx([1.71 + 3, 1.71 + 2, 1.71, 0.9]) and d.t_round[2] == 0.05


@pytest.mark.parametrize("speculate", [1, 2, 4])
def test_any_speculation_depth(exports, speculate):
    t, dr = ort(exports["target_shared"]), ort(exports["int8"], spinning=False)
    sp = PARAMS["penalty"]
    [plain] = generate(t, None, [PROMPT], sp)
    g = SpeculativeGeneration(t, None, [PROMPT], sp, dr, speculate=speculate, adaptive=False)
    list(g)
    assert g.completions[0].token_ids == plain.token_ids and g.stats["drafted"] > 0


def spec(target, tokenizer, prompts, params, draft, speculate=4):
    """Speculative completions with every round guessing `speculate` (so rounds end on stops and limits)."""
    g = SpeculativeGeneration(target, tokenizer, prompts, params, draft, speculate, adaptive=False)
    list(g)
    return g.completions


def test_stops_and_the_block_size_edge(exports, tokenizer):
    t, dr = ort(exports["target_shared"]), ort(exports["int8"], spinning=False)
    [plain] = generate(t, None, [PROMPT], PARAMS["greedy"])
    stop_id = plain.token_ids[9]
    sp = SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=(stop_id,))
    [a], [b] = generate(t, None, [PROMPT], sp), spec(t, None, [PROMPT], sp, dr)
    assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason == "stop" and b.stop == stop_id
    [varied] = generate(t, None, [PROMPT], PARAMS["penalty"])  # no token twice: each stop id ends the row there
    assert len(set(varied.token_ids[:12])) == 12
    for j in range(1, 12):  # a stop token at every place in a round, the first one included (a round of no tokens)
        sp = SamplingParams(temperature=0, max_new_tokens=40, repetition_penalty=3.0,
                            stop_token_ids=(varied.token_ids[j],))
        [a], [b] = generate(t, None, [PROMPT], sp), spec(t, None, [PROMPT], sp, dr)
        assert (b.token_ids, b.finish_reason, len(b.timing.decode_latencies_s)) == \
            (a.token_ids, "stop", max(0, len(a.token_ids) - 1))
    # a stop string, with the tokenizer: cut at the same place
    text_params = SamplingParams(temperature=0, max_new_tokens=40, stop_token_ids=())
    [full] = generate(t, tokenizer, [PROMPT], text_params)
    stop = full.text[len(full.text) // 2:][:3]
    if stop:
        sp = SamplingParams(temperature=0, max_new_tokens=40, stop=(stop,), stop_token_ids=())
        [a], [b] = generate(t, tokenizer, [PROMPT], sp), spec(t, tokenizer, [PROMPT], sp, dr)
        assert (b.text, b.token_ids, b.finish_reason) == (a.text, a.token_ids, a.finish_reason)
    # the last positions of the context: rounds shrink so target and draft stay within block_size
    block = t.config.block_size
    long_prompt = (PROMPT * 40)[: block - 6]
    sp = SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=())
    [a], [b] = generate(t, None, [long_prompt], sp), spec(t, None, [long_prompt], sp, dr)
    assert b.token_ids == a.token_ids and len(b.token_ids) == 6
    for one in (1, 2):  # a single new token: no round at all; two: a round with nothing to guess
        sp = SamplingParams(temperature=0, max_new_tokens=one, stop_token_ids=())
        assert spec(t, None, [PROMPT], sp, dr)[0].token_ids == plain.token_ids[:one]


def test_torch_target_and_draft(exports, tiny_model):
    """Speculation sits above the backend interface: a torch target (all logits) with an onnxruntime draft."""
    from runtime.backends.torch import TorchBackend

    t = TorchBackend("random:tiny@0")
    t.model = tiny_model
    dr = ort(exports["int8"], spinning=False)
    for sp in (PARAMS["greedy"], PARAMS["sampled"]):
        [plain] = generate(t, None, [PROMPT], sp)
        assert spec(t, None, [PROMPT], sp, dr)[0].token_ids == plain.token_ids


BATCH = [PROMPT, [9, 8, 7], list(range(30, 52)), [401]]  # unequal lengths: left padding in both caches
BATCH_PARAMS = [PARAMS["greedy"], PARAMS["penalty"], PARAMS["sampled"],
                dataclasses.replace(PARAMS["top_p"], max_new_tokens=9)]


@pytest.mark.parametrize("draft", ["int8_concat", "other"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_a_batch_gets_each_rows_own_output(exports, draft, adaptive):
    """One target step a round for the whole batch: rows keep different numbers of guesses (holes in both
    caches), finish at different times, and each gets the tokens it gets alone."""
    t, dr = ort(exports["target_concat"]), ort(exports[draft], spinning=False)
    alone = [generate(t, None, [p], sp)[0] for p, sp in zip(BATCH, BATCH_PARAMS)]
    g = SpeculativeGeneration(t, None, BATCH, BATCH_PARAMS, dr, speculate=4, adaptive=adaptive)
    deltas = list(g)
    for row, (c, a) in enumerate(zip(g.completions, alone)):
        assert c.token_ids == a.token_ids and c.finish_reason == a.finish_reason == "length", row
        assert [tok for d in deltas if d.row == row for tok in d.token_ids] == c.token_ids  # streamed as produced
        assert len(c.timing.decode_latencies_s) == len(c.token_ids) - 1
    s = g.stats
    assert 0 < s["accepted"] < s["drafted"] and s["tokens_per_target_step"] >= 1
    if draft == "int8_concat" and not adaptive:  # the same weights in int8 guess greedy rows' picks, batched too
        g = SpeculativeGeneration(t, None, BATCH, PARAMS["greedy"], dr, speculate=4, adaptive=False)
        list(g)
        assert g.stats["acceptance"] > 0.9 and g.stats["tokens_per_target_step"] > 3.5, g.stats


def test_a_batch_with_holes_matches_plain_batched_steps(exports, monkeypatch):
    """The caches' holes are exact: a batch whose rows keep different numbers of guesses (greedy rows beside
    sampled ones, every round 4 guesses) gives the plain batched Generation's tokens, a stop ending a row early."""
    from runtime.generation import cache

    holes = []
    take_back = cache.Cache.take_back

    def counting(self, n, live):
        holes.append(len(set(n[live].tolist())) > 1)  # rows keeping unequal numbers of guesses: holes
        take_back(self, n, live)

    monkeypatch.setattr(cache.Cache, "take_back", counting)
    # finished rows stay (no keep_rows): sampled at temperature 1 on flat logits, a token can turn on the
    # last bits of a logit, which another batch composition (M of the MatMuls) may change
    monkeypatch.setattr("runtime.generation.cache.DROP_AFTER", 10**9)
    t, dr = ort(exports["target_concat"]), ort(exports["int8_concat"], spinning=False)
    prompts = BATCH * 2
    params = [dataclasses.replace(PARAMS["penalty" if i % 2 else "sampled"], max_new_tokens=5 + 4 * i, seed=i)
              for i in range(len(prompts))]  # greedy rows keep most guesses, sampled ones few
    plain = generate(t, None, prompts, params)
    ids = plain[5].token_ids
    cut = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # a token first seen after two others
    params[5] = dataclasses.replace(params[5], stop_token_ids=(ids[cut],))
    g = SpeculativeGeneration(t, None, prompts, params, dr, speculate=4, adaptive=False)
    list(g)
    for row, (c, p) in enumerate(zip(g.completions, plain)):
        want = ids[:cut] if row == 5 else p.token_ids
        assert c.token_ids == want, row
    assert g.completions[5].finish_reason == "stop"
    assert sum(holes) >= 3, holes


@pytest.mark.parametrize("target", ["target_concat", "torch"])
def test_finished_rows_leave_both_caches(exports, tiny_model, monkeypatch, target):
    """Rows of unequal lengths: once a quarter of the batch is done, the finished rows leave the target's and
    the draft's caches (keep_rows, holes and all), and every row still gets its tokens alone."""
    from runtime.generation import cache

    kept = []
    keep_rows = cache.Cache.keep_rows

    def counting(self, rows):
        kept.append(list(rows))
        keep_rows(self, rows)

    monkeypatch.setattr(cache.Cache, "keep_rows", counting)
    if target == "torch":
        from runtime.backends.torch import TorchBackend

        t = TorchBackend("random:tiny@0")
        t.model = tiny_model
    else:
        t = ort(exports[target])
    dr = ort(exports["int8_concat"], spinning=False)
    params = [dataclasses.replace(PARAMS["penalty"], max_new_tokens=n) for n in (40, 3, 40, 9)]
    alone = [generate(t, None, [p], sp)[0].token_ids for p, sp in zip(BATCH, params)]
    assert [c.token_ids for c in spec(t, None, BATCH, params, dr)] == alone
    assert kept and all(len(k) < 4 for k in kept) and len(kept) % 2 == 0, kept  # target and draft alike


def test_rows_released_as_they_finish(exports):
    """As a server does, each row is released once its last Delta is handed on, mid-round too: the batch goes on to
    every row's own output, and the released rows' stubs stay untouched (their round's timing is not written)."""
    t, dr = ort(exports["target_concat"]), ort(exports["int8_concat"], spinning=False)
    params = [dataclasses.replace(PARAMS["penalty"], max_new_tokens=n) for n in (12, 3, 12, 6)]
    alone = [generate(t, None, [p], sp)[0].token_ids for p, sp in zip(BATCH, params)]
    g = SpeculativeGeneration(t, None, BATCH, params, dr, speculate=4, adaptive=False)
    got = [[] for _ in BATCH]
    while not g.done:
        for d in g.step():
            got[d.row] += d.token_ids
            if d.finish_reason:
                g.release(d.row)
    assert got == alone and g.stats["drafted"] > 0
    assert all(c.prompt_ids == [] and not c.timing.decode_latencies_s for c in g.completions)


def test_a_row_cancelled_mid_batch(exports):
    """cancel(row) ends that row at its next token ("cancelled"), as in plain decoding, even mid-round; the other
    rows go on to their own output."""
    t, dr = ort(exports["target_concat"]), ort(exports["int8_concat"], spinning=False)
    sp = PARAMS["penalty"]
    alone = [generate(t, None, [p], sp)[0].token_ids for p in BATCH]
    for cut in (4, 6, 8):  # rounds of up to 5 tokens: some cuts fall inside one
        g = SpeculativeGeneration(t, None, BATCH, sp, dr, speculate=4, adaptive=False)
        for d in g:
            if d.row == 1 and len(g.completions[1].token_ids) == cut:
                g.cancel(1)
        c = g.completions
        assert c[1].finish_reason == "cancelled" and c[1].token_ids == alone[1][:cut], cut
        assert [c[i].token_ids for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]


def test_a_draft_that_always_agrees_has_every_usable_guess_accepted(exports):
    """acceptance = accepted / drafted: a row's stop token id guessed right is a hit, and guesses past a row's end
    (its last token, or its stop mid-round; k follows the row with the most tokens left) are not drafted ones."""
    t, dr = ort(exports["target_concat"]), ort(exports["target_concat"], spinning=False)  # the draft is the target
    varied = dict(temperature=0, repetition_penalty=3.0)  # plain greedy repeats one token on this tiny model
    out = generate(t, None, [BATCH[0]], SamplingParams(max_new_tokens=20, stop_token_ids=(), **varied))[0].token_ids
    stop_id = next(x for j, x in enumerate(out) if j >= 6 and x not in out[:j])  # first seen mid-round
    params = [SamplingParams(max_new_tokens=20, stop_token_ids=(stop_id,), **varied),
              SamplingParams(max_new_tokens=3, stop_token_ids=(), **varied)]
    g = SpeculativeGeneration(t, None, BATCH[:2], params, dr, speculate=4, adaptive=False)
    for _ in g:
        pass
    assert g.completions[0].finish_reason == "stop" and len(g.completions[0].token_ids) >= 6
    assert len(g.completions[1].token_ids) == 3
    assert g.stats["accepted"] == g.stats["drafted"] > 0 and g.stats["acceptance"] == 1.0, g.stats


def test_a_batch_at_the_block_size_edge(exports):
    """Rows whose prompts nearly fill the block, beside short ones: rounds shrink so that every row still fits
    (a round grows the cache by the most guesses one row keeps while another may advance by one)."""
    t, dr = ort(exports["target_concat"]), ort(exports["int8_concat"], spinning=False)
    block = t.config.block_size
    prompts = [(PROMPT * 40)[:block - 12], [3, 1, 4], (PROMPT * 40)[:block - 20]]
    sp = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=())
    alone = [generate(t, None, [p], sp)[0].token_ids for p in prompts]
    assert [c.token_ids for c in spec(t, None, prompts, sp, dr)] == alone
    one = SamplingParams(temperature=0, max_new_tokens=1, stop_token_ids=())
    mixed = spec(t, None, prompts, [sp, one, sp], dr)  # a row done at its first token rides along
    assert [c.token_ids for c in mixed] == [alone[0], alone[1][:1], alone[2]]


def test_a_torch_target_speculates_on_a_batch(exports, tiny_model):
    """The torch model attends through the holes too (its mask is any (B, P+T) 0/1 mask)."""
    from runtime.backends.torch import TorchBackend

    t = TorchBackend("random:tiny@0")
    t.model = tiny_model
    dr = ort(exports["other"], spinning=False)
    alone = [generate(t, None, [p], sp)[0].token_ids for p, sp in zip(BATCH, BATCH_PARAMS)]
    assert [c.token_ids for c in spec(t, None, BATCH, BATCH_PARAMS, dr)] == alone


def test_refusals(exports):
    t, dr = ort(exports["target_shared"]), ort(exports["int8"])
    sp = PARAMS["greedy"]
    with pytest.raises(GenerationError, match="--logits last:5"):
        SpeculativeGeneration(ort(exports["last"]), None, [PROMPT], sp, dr, 4)
    with pytest.raises(GenerationError, match="last:7"):
        SpeculativeGeneration(t, None, [PROMPT], sp, dr, 6)
    with pytest.raises(GenerationError, match="--kv-cache concat to speculate on a batch"):
        SpeculativeGeneration(t, None, [PROMPT, PROMPT], sp, dr, 4)
    concat = ort(exports["target_concat"]), ort(exports["int8_concat"])
    assert draft_for(t, dr, 1) is dr and draft_for(t, dr, 2) is None  # a shared-cache pair: batches run plain
    assert draft_for(*concat, 2) is concat[1] and draft_for(t, None, 1) is None
    with pytest.raises(GenerationError, match="speculate must be"):
        SpeculativeGeneration(t, None, [PROMPT], sp, dr, 0)

    class OtherVocab:
        config = TINY_CONFIG.__class__(**{**TINY_CONFIG.to_dict(), "vocab_size": 1024})

        def rewind(self, length):
            pass

    with pytest.raises(GenerationError, match="vocabulary"):
        SpeculativeGeneration(t, None, [PROMPT], sp, OtherVocab(), 4)

    class NoRewind:
        name, config = "custom", TINY_CONFIG

    with pytest.raises(GenerationError, match="'custom' cannot rewind"):
        SpeculativeGeneration(t, None, [PROMPT], sp, NoRewind(), 4)


# ---------------------------------------------------------------------------------- rewind


@pytest.mark.parametrize("backend", ["ort_shared", "ort_concat", "torch"])
def test_rewind_equals_never_having_gone_there(exports, tiny_model, backend):
    if backend == "torch":
        from runtime.backends.torch import TorchBackend

        be = TorchBackend("random:tiny@0")
        be.model = tiny_model
    else:
        be = ort(exports["target_shared" if backend == "ort_shared" else "target_concat"])
    ids = np.array([PROMPT + [60, 61, 62, 63, 64, 65]], np.int64)
    ones = np.ones((1, 64), np.int64)
    pos = np.arange(64, dtype=np.int64)[None]
    n = len(PROMPT)

    def step(a, z, tokens=None):
        x = ids[:, a:z] if tokens is None else np.array([tokens], np.int64)
        return be.forward(x, ones[:, :z], pos[:, a:z])

    be.reset(1)
    step(0, n)
    step(n, n + 4, [300, 301, 302, 303])  # four guesses...
    be.rewind(n + 1)  # ...of which one was right
    assert be.past_length == n + 1
    got = step(n + 1, n + 3, [400, 401])
    be.reset(1)
    step(0, n)
    step(n, n + 1, [300])
    want = step(n + 1, n + 3, [400, 401])
    assert got.shape == want.shape and max_abs_diff(got, want) < 1e-5
    be.rewind(be.past_length)  # a no-op
    with pytest.raises(BackendError, match="rewind"):
        be.rewind(be.past_length + 1)
    with pytest.raises(BackendError, match="rewind"):
        be.rewind(-1)


def test_last_n_logits_of_a_row_by_row_step(exports):
    """A shared-cache step that runs row by row (left padding, or several tokens after a past) returns the
    last N positions of each row, as the concat graph does in one call."""
    shared, concat = ort(exports["target_shared"]), ort(exports["target_concat"])
    ids = np.array([[0, 0, 5, 17, 99, 3, 250, 41, 7, 8], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]], np.int64)
    mask = np.ones((2, 13), np.int64)
    mask[0, :2] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    out = {}
    for name, be in (("shared", shared), ("concat", concat)):
        be.reset(2)
        first = be.forward(ids, mask[:, :10], pos[:, :10])  # a left-padded prefill: row by row when shared
        more = be.forward(np.array([[1, 2, 3], [4, 5, 6]]), mask, pos[:, 10:])  # 3 tokens after a past
        out[name] = (first, more)
    for a, b in zip(out["shared"], out["concat"]):
        assert a.shape == b.shape and max_abs_diff(a, b) < 1e-4


def test_concat_rewind_compacts_in_place():
    from runtime.backends.ort_cache import _compact

    a = np.random.default_rng(0).standard_normal((3, 4, 10, 5)).astype(np.float32)
    want = a[:, :, :6].copy()
    got = _compact(a, 6)
    assert np.shares_memory(got, a) and np.array_equal(got, want)
    assert np.array_equal(_compact(got, 2), want[:, :, :2])  # twice, without a step between
    assert np.array_equal(_compact(np.ones((2, 3, 4, 5), np.float32), 0), np.ones((2, 3, 0, 5)))


def test_tensorrt_rewind_copy_repacks_the_packed_cache():
    """The pitches runtime/backends/tensorrt.py hands cudaMemcpy2DAsync, replayed on host memory."""
    from runtime.backends.tensorrt import rewind_copy

    B, H, P, D, keep = 2, 3, 7, 4, 5
    cache = np.arange(B * H * P * D, dtype=np.float32).reshape(B, H, P, D)
    for start in (0, 2):  # rewind keeps the first 5 positions; drop_front(2) the last 5
        offset, dpitch, spitch, width, height = rewind_copy(B, H, D, 4, P, keep, start)
        src, dst = cache.tobytes()[offset:], bytearray(B * H * keep * D * 4)
        for r in range(height):
            dst[r * dpitch: r * dpitch + width] = src[r * spitch: r * spitch + width]
        got = np.frombuffer(bytes(dst), np.float32).reshape(B, H, keep, D)
        assert np.array_equal(got, cache[:, :, start:start + keep])


# ---------------------------------------------------------------------------------- logits="last:N"


def test_last_n_artifact_and_graph(exports):
    art = read_onnx_artifact(exports["target_shared"])
    assert art.logits == "last:5" and [art.logits_positions(t) for t in (1, 3, 5, 9)] == [1, 3, 5, 5]
    m = onnx.load(str(exports["target_concat"] / "model.onnx"), load_external_data=False)
    assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_param == LOGITS_AXIS
    check_symbolic_axes(exports["target_concat"] / "model.onnx", "last:5")
    with pytest.raises(ExportError, match="logits_sequence"):
        check_symbolic_axes(exports["last"] / "model.onnx", "last:5")
    assert [logits_keep(m) for m in ("all", "last", "last:2", "last:64")] == [0, 1, 2, 64]
    for bad in ("last:1", "last:0", "last:65", "last:x", "first", ""):
        with pytest.raises(ArtifactError, match="last:N"):
            logits_keep(bad)
    with pytest.raises(ArtifactError):
        Artifact(config=TINY_CONFIG, logits="last:1")


def test_cli(exports, capsys):
    from runtime.cli import main

    common = ["generate", str(exports["target_shared"]), "--prompt-ids", ",".join(map(str, PROMPT)),
              "--temperature", "0", "--max-new-tokens", "24", "--ignore-eos", "--json"]
    assert main(common) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(common + ["--draft", str(exports["int8"]), "--speculate", "3"]) == 0
    out = capsys.readouterr()
    spec = json.loads(out.out)
    assert spec["completions"][0]["token_ids"] == plain["completions"][0]["token_ids"]
    assert spec["speculative"]["draft_precision"] == "int8" and spec["speculative"]["rounds"] >= 1
    assert "guesses accepted" in out.err
    with pytest.raises(SystemExit) as e:  # argparse: usage error before anything loads
        main(["export", "random:tiny@0", "--out", "unused", "--logits", "last:1"])
    assert e.value.code == 2 and "last:N" in capsys.readouterr().err
    assert main(common + ["--speculate", "3"]) != 0
    assert "--speculate needs --draft" in capsys.readouterr().err
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    # serve refuses a pair that cannot speculate at startup, before it binds anything
    assert main(["serve", str(exports["last"]), "--draft", str(exports["int8"]), "--port", "1"]) == 1
    assert "--logits last:5" in capsys.readouterr().err


def test_bench_times_speculative_targets(exports):
    from runtime.tools.bench import Case, Target, find_targets, run_worker

    targets, notes = find_targets([str(exports["target_shared"]), str(exports["last"])], backends=("onnxruntime",),
                                  providers=("cpu",), draft=str(exports["int8"]), speculate=4)
    spec = [t for t in targets if t.draft]
    assert [Path(t.model) for t in spec] == [exports["target_shared"]]
    assert spec[0].label.startswith("onnxruntime cpu fp32 + int8 draft (K=4)")
    assert any("--logits last:5" in n for n in notes)  # the "last" export cannot check 4 guesses
    lines = []
    run_worker({"target": dataclasses.asdict(spec[0]), "cases": [dataclasses.asdict(Case(1, 8, 12)),
                                                                 dataclasses.asdict(Case(2, 8, 12))],
                "warmup": 0, "repeats": 1, "threads": 2}, emit=lines.append)
    result = json.loads(lines[-1])
    one, two = result["cases"]
    assert one["speculative"]["tokens_per_target_step"] > 1 and "decode_tok_s" in one
    assert one["speculative"]["same_tokens_as_target"] is True
    assert "speculative" not in two  # a batch on a shared-cache pair runs on the target alone
    concat = Target("onnxruntime", str(exports["target_concat"]), draft=str(exports["int8_concat"]), speculate=4)
    lines.clear()
    run_worker({"target": dataclasses.asdict(concat), "cases": [dataclasses.asdict(Case(2, 8, 12))],
                "warmup": 0, "repeats": 1, "threads": 2}, emit=lines.append)
    [two] = json.loads(lines[-1])["cases"]
    assert two["speculative"]["same_tokens_as_target"] is True and two["speculative"]["tokens_per_target_step"] > 1
