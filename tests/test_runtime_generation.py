"""Generation logic against a scripted fake backend: streaming UTF-8, stop strings / ids, cancel, limits, timings.

The fake backend tests runtime/generation, not a backend: its logits put all mass on the next token of a script,
and it records every call so the tests can check what the loop feeds (mask, positions, one token per step).
"""
from __future__ import annotations

import numpy as np
import pytest

from model.config import GPTConfig
from runtime.generation import Completion, Generation, GenerationError, SamplingParams, generate, stream, summary_line

GREEDY = SamplingParams(temperature=0, max_new_tokens=16, stop_token_ids=())


@pytest.fixture(scope="module")
def tok(tokenizer):
    return tokenizer


class ScriptedBackend:
    """Row b's k-th sampled token is scripts[b][k] (then the last id forever); records each forward."""
    name, provider, precision = "fake", "none", "fp32"

    def __init__(self, scripts, vocab_size=50257, block_size=64):
        self.config = GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=vocab_size, block_size=block_size)
        self.scripts = scripts
        self.calls = []

    def reset(self, batch_size):
        self.calls, self.batch = [], batch_size

    def forward(self, input_ids, attention_mask, position_ids):
        self.calls.append((input_ids.copy(), attention_mask.copy(), position_ids.copy()))
        k = len(self.calls) - 1
        B, T = input_ids.shape
        logits = np.full((B, T, self.config.vocab_size), -10.0, dtype=np.float32)
        for b in range(B):
            script = self.scripts[b % len(self.scripts)]
            logits[b, -1, script[min(k, len(script) - 1)]] = 10.0
        return logits


def test_loop_feeds_left_padding_mask_positions_and_one_token_per_step():
    be = ScriptedBackend([[5, 6, 7]])
    cs = generate(be, None, [[1, 2, 3], [4]], SamplingParams(temperature=0, max_new_tokens=3, stop_token_ids=()))
    assert [c.token_ids for c in cs] == [[5, 6, 7], [5, 6, 7]]
    ids, mask, pos = be.calls[0]
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]  # cumsum(mask) - 1, padding clamped to 0
    ids, mask, pos = be.calls[1]
    assert ids.tolist() == [[5], [5]] and pos.tolist() == [[3], [1]] and mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    ids, mask, pos = be.calls[2]
    assert ids.tolist() == [[6], [6]] and pos.tolist() == [[4], [2]] and mask.shape == (2, 5)
    assert len(be.calls) == 3, "no forward after the last token"


def test_stream_never_splits_a_multibyte_character(tok):
    script = tok.encode("a😀b日本")  # 😀 is 2 tokens, 日 and 本 2 each: bytes split mid-character
    assert len(script) > len("a😀b日本")
    be = ScriptedBackend([script])
    deltas = list(stream(be, tok, [[1]], SamplingParams(temperature=0, max_new_tokens=len(script), stop_token_ids=())))
    texts = [d.text for d in deltas]
    assert "".join(texts) == "a😀b日本"
    assert "" in texts, "a delta holding only the first bytes of a character must carry no text"
    assert all("\ufffd" not in t for t in texts), texts
    assert [t for t in texts if t] == ["a", "😀", "b", "日", "本"]


def test_unfinished_character_at_the_end_becomes_replacement_char(tok):
    be = ScriptedBackend([tok.encode("😀")[:1]])
    [c] = generate(be, tok, [[1]], SamplingParams(temperature=0, max_new_tokens=1, stop_token_ids=()))
    assert c.text == "\ufffd" and c.finish_reason == "length"


def test_stop_string_spanning_tokens_is_trimmed_and_never_streamed(tok):
    script = tok.encode("hello world. END more text")
    be = ScriptedBackend([script])
    params = SamplingParams(temperature=0, max_new_tokens=len(script), stop=("d. E",), stop_token_ids=())
    g = Generation(be, tok, [[1]], params)
    streamed = "".join(d.text for d in g)
    [c] = g.completions
    assert c.text == streamed == "hello worl", (c.text, streamed)
    assert c.finish_reason == "stop" and c.stop == "d. E"
    assert c.token_ids == tok.encode("hello world. END"), "tokens up to the one completing the stop string"


def test_first_of_several_stop_strings_wins_and_false_starts_are_released(tok):
    script = tok.encode("x = 1\n\ny = 2\n\n")
    be = ScriptedBackend([script])
    [c] = generate(be, tok, [[1]],
                   SamplingParams(temperature=0, max_new_tokens=20, stop=("y = 3", "\n\n"), stop_token_ids=()))
    assert c.text == "x = 1" and c.stop == "\n\n"
    # "y = " starts the stop string "y = 3" but never completes it: the held-back text comes out
    g = Generation(be, tok, [[1]], SamplingParams(temperature=0, max_new_tokens=len(script), stop=("y = 3",),
                                                   stop_token_ids=()))
    streamed = "".join(d.text for d in g)
    [c] = g.completions
    assert c.text == streamed == "x = 1\n\ny = 2\n\n" and c.finish_reason == "length"


def test_stop_token_id_ends_the_row_and_is_not_output(tok):
    be = ScriptedBackend([[tok.encode("hi")[0], 50256, 42]])
    [c] = generate(be, tok, ["Q:"], SamplingParams(temperature=0, max_new_tokens=10))  # default stop: <|endoftext|>
    assert c.token_ids == tok.encode("hi") and c.text == "hi"
    assert c.finish_reason == "stop" and c.stop == 50256


def test_step_yields_exactly_one_steps_deltas():
    """step() runs one forward and yields each live row's Delta of it: a server needs no guessing where a step ends."""
    be = ScriptedBackend([[5, 6, 7]])
    g = Generation(be, None, [[1, 2, 3], [4]], SamplingParams(temperature=0, max_new_tokens=3, stop_token_ids=()))
    steps = []
    while not g.done:
        steps.append([(d.row, d.token_ids) for d in g.step()])
        assert len(be.calls) == len(steps)
    assert steps == [[(0, [t]), (1, [t])] for t in (5, 6, 7)]
    assert list(g.step()) == [] and len(be.calls) == 3


def test_rows_finish_independently_and_cancel_stops_one_row():
    be = ScriptedBackend([[7, 50256], [8, 9, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25]])
    g = Generation(be, None, [[1], [2], [3]], [SamplingParams(temperature=0, max_new_tokens=5),
                                               SamplingParams(temperature=0, max_new_tokens=6),
                                               SamplingParams(temperature=0, max_new_tokens=6)])
    for d in g:
        if d.row == 2 and len(g.completions[2].token_ids) == 2:
            g.cancel(2)  # as a server does when a client disconnects
    a, b, c = g.completions
    assert (a.token_ids, a.finish_reason, a.stop) == ([7], "stop", 50256)
    assert (b.token_ids, b.finish_reason) == ([8, 9, 10, 11, 12, 13], "length")
    assert (c.token_ids, c.finish_reason) == ([20, 21], "cancelled")
    assert len(be.calls) == 6, "the batch runs until its longest row is done, no further"


class DroppingBackend(ScriptedBackend):
    """A ScriptedBackend with keep_rows: it follows which prompt rows its cache still holds."""

    def reset(self, batch_size):
        super().reset(batch_size)
        self.rows, self.kept = list(range(batch_size)), []

    def keep_rows(self, rows):
        self.kept.append(list(rows))
        self.rows = [self.rows[i] for i in rows]

    def forward(self, input_ids, attention_mask, position_ids):
        assert input_ids.shape[0] == len(self.rows) == attention_mask.shape[0] == position_ids.shape[0]
        self.calls.append((input_ids.copy(), attention_mask.copy(), position_ids.copy()))
        k = len(self.calls) - 1
        logits = np.full((len(self.rows), input_ids.shape[1], self.config.vocab_size), -10.0, dtype=np.float32)
        for i, b in enumerate(self.rows):
            script = self.scripts[b]
            logits[i, -1, script[min(k, len(script) - 1)]] = 10.0
        return logits


def test_finished_rows_leave_the_batch():
    """Once a quarter of the batch has finished (and the rest has DROP_AFTER steps to go), the finished rows
    leave the cache: later steps feed the live rows only, with their own masks and positions."""
    from runtime.generation.cache import DROP_AFTER

    long = list(range(100, 100 + DROP_AFTER + 4))
    be = DroppingBackend([[7, 50256], long, [8, 50256], long[::-1]])
    params = SamplingParams(temperature=0, max_new_tokens=len(long))
    cs = generate(be, None, [[1], [2, 3], [4], [5, 6, 9]], params)
    assert [c.token_ids for c in cs] == [[7], long, [8], long[::-1]]
    assert be.kept == [[1, 3]]  # after step 1 both short rows were done; the others had 12 tokens to go
    ids, mask, pos = be.calls[2]  # the first step without them
    assert ids.tolist() == [[long[1]], [long[-2]]] and pos.tolist() == [[3], [4]]
    assert mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert len(be.calls) == len(long)
    # a backend without keep_rows keeps them riding along (ScriptedBackend), with the same output
    assert [c.token_ids for c in generate(ScriptedBackend(be.scripts), None, [[1], [2, 3], [4], [5, 6, 9]],
                                          params)] == \
        [c.token_ids for c in cs]


def test_timings_are_recorded_per_row():
    be = ScriptedBackend([[5, 6, 7, 8]])
    [c] = generate(be, None, [[1, 2]], SamplingParams(temperature=0, max_new_tokens=4, stop_token_ids=()))
    t = c.timing
    assert 0 < t.prefill_s <= t.ttft_s <= t.total_s
    assert len(t.decode_latencies_s) == 3 and all(x > 0 for x in t.decode_latencies_s)
    line = summary_line([c], be)
    assert line.startswith("4 tokens in ") and line.endswith("tok/s [fake, none, fp32]")


def test_seeded_sampling_does_not_depend_on_the_batch_position():
    noise = np.random.default_rng(0).normal(size=(20, 100)).astype(np.float32)

    class Noisy(ScriptedBackend):  # step k: the same random logits for every row
        def forward(self, input_ids, attention_mask, position_ids):
            self.calls.append(None)
            return np.broadcast_to(noise[len(self.calls) - 1], (*input_ids.shape, 100)).copy()

    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=3, stop_token_ids=())
    other = SamplingParams(temperature=1.0, max_new_tokens=10, seed=9, stop_token_ids=())
    alone = generate(Noisy([[0]], vocab_size=100), None, [[1]], params)[0].token_ids
    batched = generate(Noisy([[0]], vocab_size=100), None, [[4, 4], [1]], [other, params])
    assert batched[1].token_ids == alone
    assert batched[0].token_ids != alone


def test_bad_requests_are_clear_errors(tok):
    be = ScriptedBackend([[5]], vocab_size=512, block_size=64)
    cases = [
        (([""],), "prompt 0 is empty"),
        (([[]],), "prompt 0 is empty"),
        (([[1] * 60], SamplingParams(max_new_tokens=10)),
         "prompt 0 (60 tokens) + max_new_tokens (10) exceeds block_size 64"),
        (([[1] * 40, [1]], [SamplingParams(max_new_tokens=5), SamplingParams(max_new_tokens=30)]),
         "longest prompt (40 tokens) + the largest max_new_tokens (30) exceeds block_size 64"),
        ((["Hello world"],), "token id 15496 but this model's vocabulary is 0..511"),
        (([[1], [2]], [SamplingParams()]), "1 SamplingParams for 2 prompts"),
        (("just a string",), "non-empty list"),
    ]
    for args, message in cases:
        prompts, params = args[0], args[1] if len(args) > 1 else SamplingParams(max_new_tokens=4)
        with pytest.raises(GenerationError) as e:
            Generation(be, tok, prompts, params)
        assert message in str(e.value), f"{message!r} not in {str(e.value)!r}"
    with pytest.raises(GenerationError, match="no tokenizer"):
        Generation(be, None, ["text"], SamplingParams())


def test_a_generation_runs_once():
    g = Generation(ScriptedBackend([[5]]), None, [[1]], SamplingParams(temperature=0, max_new_tokens=1))
    list(g)
    with pytest.raises(GenerationError, match="runs once"):
        list(g)
    assert isinstance(g.completions[0], Completion) and g.completions[0].to_dict()["token_ids"] == [5]


class PaddedVocabBackend(ScriptedBackend):
    """A model whose vocabulary is padded (nanoGPT: 50257 -> 50304): 64 rows, 50 real ids. The highest logit
    is always on a padded id; among the real ids, `best` leads and the others still get some probability."""
    best, real = 7, 50

    def __init__(self):
        super().__init__([[0]], vocab_size=64)
        self.config = GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=64, real_vocab_size=self.real, block_size=64)

    def forward(self, input_ids, attention_mask, position_ids):
        self.calls.append(input_ids.copy())
        B, T = input_ids.shape
        logits = np.zeros((B, T, self.config.vocab_size), dtype=np.float32)
        logits[:, :, self.best] = 2.0
        logits[:, :, self.real:] = 30.0  # padding rows: by far the most likely, never to be sampled
        logits[:, :, self.config.vocab_size - 1] = 40.0
        return logits


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=()),
    SamplingParams(temperature=1.0, seed=0, max_new_tokens=12, stop_token_ids=()),
    SamplingParams(temperature=1.5, top_k=5, top_p=0.9, seed=3, max_new_tokens=12, stop_token_ids=()),
    SamplingParams(temperature=0, repetition_penalty=50.0, max_new_tokens=12, stop_token_ids=()),
], ids=["greedy", "sampled", "top-k-top-p", "greedy-repetition-penalty"])
def test_padded_vocab_ids_are_never_generated(params):
    """README: the padded vocabulary is handled, padded ids are never sampled, even where they score highest."""
    be = PaddedVocabBackend()
    assert be.config.vocab_size > be.config.real_vocab_size
    cs = generate(be, None, [[1, 2], [3]], params)
    for c in cs:
        assert len(c.token_ids) == 12
        assert all(0 <= t < be.real for t in c.token_ids), c.token_ids
    if params.greedy and params.repetition_penalty == 1.0:
        assert [c.token_ids for c in cs] == [[be.best] * 12] * 2  # the argmax over the real ids
    g = Generation(be, None, [[1]], params)
    streamed = [t for d in g for t in d.token_ids]
    assert streamed == g.completions[0].token_ids and all(t < be.real for t in streamed), streamed


def test_a_failed_step_leaves_the_cache_as_it_was():
    """A forward that raises (an out-of-memory, a bad id) must not advance the rows' positions or length: the caller
    drops the request and the next step sees the cache as before."""
    from runtime.generation.cache import Cache

    class Flaky(ScriptedBackend):
        fail = False

        def forward(self, input_ids, attention_mask, position_ids):
            if self.fail:
                raise RuntimeError("out of memory")
            return super().forward(input_ids, attention_mask, position_ids)

    be = Flaky([[5]])
    cache = Cache(be)
    cache.start([[1, 2, 3], [4]])
    length, real, mask = cache.length, cache.real.copy(), cache.mask[:, :cache.length].copy()
    be.fail = True
    for rows in ([[7], [8, 9]], np.array([[7], [8]])):
        with pytest.raises(RuntimeError):
            cache.step(rows)
        assert cache.length == length and cache.real.tolist() == real.tolist()
        assert (cache.mask[:, :length] == mask).all()
    be.fail = False
    cache.step(np.array([[7], [8]]))
    _, mask_after, pos = be.calls[-1]
    assert pos.tolist() == [[3], [1]] and mask_after.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
