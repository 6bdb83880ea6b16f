"""Token generation, written once above the backends: batching, sampling, stops, streaming, timings.

A batch of prompts of different lengths is left-padded into one (B, L) prefill; each decode step then
feeds one token per row. The attention mask is allocated once for the whole run and sliced per step,
positions are `cumsum(mask) - 1` (so padding never shifts a row: under greedy an fp32 row gets the
tokens its prompt gets alone; int8 / int4 kernels may not, README "Batched is not alone"), and text is
decoded incrementally from token bytes, so a UTF-8 character split over tokens is never split across
streamed pieces. Rows stop independently (max_new_tokens, a stop token id, a stop string even when it
spans tokens, or `cancel(row)`); once a quarter of the batch has finished, the finished rows leave it
(`Backend.keep_rows`; a backend without it keeps them riding along with a filler token). Policy on
length: prompt + max_new_tokens beyond the model's block_size is an error before any work is done (no
silent truncation or sliding window).

    from runtime.generate import SamplingParams, generate, stream
    [c] = generate(backend, tokenizer, ["def main():"], SamplingParams(temperature=0, max_new_tokens=32))
    c.text, c.token_ids, c.finish_reason, c.timing.ttft_s, c.timing.decode_latencies_s

    for d in stream(backend, tokenizer, prompts, params):     # Delta(row, text, token_ids, finish_reason)
        print(d.text, end="", flush=True)

    g = Generation(backend, tokenizer, prompts, [params_a, params_b])   # a server's shared batch
    for d in g: ...; g.cancel(1); g.admit([prompt_c], params_c)         # per-row deltas, cancellation, joins
    g.completions                                                      # list[Completion] when done

A backend holds one KV cache, so one Generation runs on it at a time. A server batches the requests that
arrive together into one Generation, and `g.admit(prompts, params)` adds later ones while it runs
(continuous batching): between two steps their prompts are prefilled beside the running rows
(`Backend.add_rows`; the cache is as wide as its longest row, the others left-masked), and they stream
under new row numbers.
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .backends import capabilities_of
from .sampling import Sampler, SamplingParams

__all__ = ["SamplingParams", "Timing", "Completion", "Delta", "Generation", "generate", "stream", "make_generation",
           "GenerationError", "summary_line"]

Prompt = str | Sequence[int]
DROP_AFTER = 8  # finished rows leave a batch when the live ones have this many steps or more to go
TRIM_AT_LEAST = 8  # leading cache columns no row needs (left padding of rows that left) go in runs this long


class GenerationError(ValueError):
    """A request generation cannot serve as given (empty prompt, too long, ids outside the vocabulary)."""


@dataclass
class Timing:
    """Wall-clock seconds of one row. The batch's steps are shared, so rows of one batch share clocks."""
    prefill_s: float = 0.0  # the prompt's forward pass
    ttft_s: float = 0.0  # start -> first token sampled (prefill + sampling)
    decode_latencies_s: list[float] = field(default_factory=list)  # one per token after the first
    total_s: float = 0.0  # start -> this row finished

    def to_dict(self) -> dict:
        return {"prefill_s": self.prefill_s, "ttft_s": self.ttft_s, "total_s": self.total_s,
                "decode_latencies_s": self.decode_latencies_s}


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]  # generated ids; a stop token id is not included, the ids of a stop string are
    text: str  # decoded output, cut before a stop string
    finish_reason: str | None = None  # "length" | "stop" | "cancelled"
    stop: str | int | None = None  # the stop string or stop token id that ended the row
    timing: Timing = field(default_factory=Timing)

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason, "stop": self.stop, "timing": self.timing.to_dict()}


# Generation.release's stubs, one per finish_reason (never mutated: released rows are finished)
_RELEASED: dict[str, Completion] = {}


@dataclass
class Delta:
    """What one row produced in one step: new text (never a partial UTF-8 character) and new ids."""
    row: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # set on the row's last delta


class _TextStream:
    """Incremental detokenization + stop strings for one row.

    Token bytes go through an incremental UTF-8 decoder (a character split over tokens waits for its
    last byte). Text that could still be the start of a stop string is held back until it cannot.
    """

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)
        self.text = ""  # all decoded text so far (trimmed at a stop string once found)
        self.emitted = 0  # chars of self.text already handed out
        self.stopped: str | None = None

    def push(self, token: int) -> str:
        """Add one token; return the text now safe to hand out."""
        if self.tokenizer is None:
            return ""
        start = max(0, len(self.text) - self.longest + 1)  # a match may begin in earlier text
        self.text += self.decoder.decode(self.tokenizer.decode_single_token_bytes(token))
        if self.stops:
            hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                i, self.stopped = min(hits)
                self.text = self.text[:i]
                return self._take(len(self.text))
            return self._take(len(self.text) - self._held_back())
        return self._take(len(self.text))

    def finish(self) -> str:
        """The rest: bytes of an unfinished character (as U+FFFD) and text held back for stop strings."""
        if self.tokenizer is not None and self.stopped is None:
            self.text += self.decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _held_back(self) -> int:
        # the longest tail of the text that is a proper prefix of some stop string
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece


class _Batch:
    """The running batch's state: the rows in the cache, in its order (`slots`: finished rows leave it, joining
    rows append to it), the cache's width, the mask (allocated for every step still to come), and each
    slot's next input id and position."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.slots: list[int] = []
        self.width = 0
        self.mask = np.zeros((0, 0), np.int64)
        self.next_ids = np.zeros((0, 1), np.int64)
        self.next_pos = np.zeros((0, 1), np.int64)

    def take(self, keep: list[int]) -> None:
        self.slots = [self.slots[i] for i in keep]
        self.mask, self.next_ids, self.next_pos = self.mask[keep], self.next_ids[keep], self.next_pos[keep]


class Generation:
    """One batch of requests run in shared forward passes; iterate it for per-row Deltas.

    Args:
        backend: any runtime.backends Backend (it is reset: the batch owns its KV cache while running).
        tokenizer: a tiktoken Encoding (runtime.tokenizer.load_tokenizer()); None only with id prompts and
            no stop strings (text stays empty).
        prompts: text, or token ids, per row.
        params: one SamplingParams for all rows, or one per row.

    `admit()` adds rows while it runs (continuous batching): they are prefilled beside the running rows
    between two steps (Backend.add_rows) and stream under new row numbers.
    """

    def __init__(self, backend, tokenizer, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]):
        if isinstance(prompts, str) or not len(prompts):
            raise GenerationError("prompts must be a non-empty list of texts or token-id lists")
        self.backend, self.tokenizer = backend, tokenizer
        self.real_vocab_size = backend.config.real_vocab_size
        self.prompt_ids: list[list[int]] = []
        self.params: list[SamplingParams] = []
        self.completions: list[Completion] = []
        self._texts: list[_TextStream] = []
        self._samplers: list[Sampler] = []
        self._cancelled: list[bool] = []
        self._start: list[float] = []  # per row: when its clock started (the run's start, or its admit())
        self._last: list[float | None] = []  # per row: when its previous token came
        ids, params = self._check(prompts, params)
        L, steps = max(len(p) for p in ids), max(sp.max_new_tokens for sp in params)
        if L + steps > backend.config.block_size:  # left padding puts every row's cache at the longest prompt's length
            raise GenerationError(f"batched, the longest prompt ({L} tokens) + the largest max_new_tokens "
                                  f"({steps}) exceeds block_size {backend.config.block_size}; batch these prompts separately")
        self._joining = self._register(ids, params)  # rows waiting for their prefill: all of them at the start
        self._batch = _Batch()
        self._started = self._done = False

    def _check(self, prompts: Sequence[Prompt], params) -> tuple[list[list[int]], list[SamplingParams]]:
        """Encode and validate rows before any is registered: (token ids, SamplingParams) per row."""
        n, first, config = len(prompts), len(self.prompt_ids), self.backend.config
        params = [params] * n if isinstance(params, SamplingParams) else list(params)
        if len(params) != n:
            raise GenerationError(f"{len(params)} SamplingParams for {n} prompts; give one, or one per prompt")
        ids = [self._encode(p, first + i) for i, p in enumerate(prompts)]
        for i, (p, sp) in enumerate(zip(ids, params), start=first):
            if not p:
                raise GenerationError(f"prompt {i} is empty; give at least one token")
            bad = [t for t in p if not 0 <= t < config.vocab_size]
            if bad:
                raise GenerationError(
                    f"prompt {i} has token id {bad[0]} but this model's vocabulary is 0..{config.vocab_size - 1} "
                    f"(tokenizer {config.tokenizer!r} makes ids up to 50256); use a model trained on that tokenizer, "
                    f"or --prompt-ids within the vocabulary")
            if len(p) + sp.max_new_tokens > config.block_size:
                raise GenerationError(f"prompt {i} ({len(p)} tokens) + max_new_tokens ({sp.max_new_tokens}) exceeds "
                                      f"block_size {config.block_size}; lower --max-new-tokens or shorten the prompt")
            if sp.stop and self.tokenizer is None:
                raise GenerationError("stop strings need a tokenizer to decode text")
        return ids, params

    def _register(self, ids: list[list[int]], params: list[SamplingParams]) -> list[int]:
        first = len(self.prompt_ids)
        for p, sp in zip(ids, params):
            self.prompt_ids.append(p)
            self.params.append(sp)
            self.completions.append(Completion(prompt_ids=list(p), token_ids=[], text=""))
            self._texts.append(_TextStream(self.tokenizer, sp.stop))
            self._samplers.append(Sampler(sp, self.real_vocab_size, p))
            self._cancelled.append(False)
            self._start.append(time.perf_counter())
            self._last.append(None)
        return list(range(first, len(self.prompt_ids)))

    def _encode(self, prompt: Prompt, i: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError(f"prompt {i} is text but no tokenizer was given; pass token ids or a tokenizer")
            return self.tokenizer.encode(prompt, allowed_special="all")
        return [int(t) for t in prompt]

    def release(self, row: int) -> None:
        """Forget a finished row: its Completion becomes a stub (finish_reason only) and its prompt, sampler and
        text state go. A server's batch can run for hours while rows join and leave; it calls this once it has
        handed a row's last Delta on, so memory follows the live rows, not every row the batch ever ran."""
        reason = self.completions[row].finish_reason
        if reason is None:
            raise GenerationError(f"row {row} is still running; release() takes finished rows")
        self.completions[row] = _RELEASED.setdefault(reason, Completion([], [], "", reason))
        self.prompt_ids[row] = self.params[row] = self._samplers[row] = self._texts[row] = None
        self._start[row] = self._last[row] = None

    def cancel(self, row: int) -> None:
        """Stop `row` at the next step (finish_reason "cancelled"); the other rows go on."""
        self._cancelled[row] = True

    def cancelling(self, row: int) -> bool:
        """Whether cancel(row) was called."""
        return self._cancelled[row]

    @property
    def rows(self) -> int:
        """Rows running or waiting to join (finished ones not counted)."""
        return sum(self.completions[b].finish_reason is None for b in self._batch.slots) + len(self._joining)

    def fits(self, prompt_lengths: Sequence[int], max_new_tokens: Sequence[int]) -> bool:
        """Whether rows of these prompt lengths and max_new_tokens can join now: the cache, as wide as its longest
        row (left padding), must hold every row's remaining tokens within block_size."""
        if not capabilities_of(self.backend).add_rows:
            return False
        live = [b for b in self._batch.slots if self.completions[b].finish_reason is None]
        width = max([self._width_at_join() if live else 0, *prompt_lengths,
                     *(len(self.prompt_ids[b]) for b in self._joining)])
        left = max([*max_new_tokens, *(self.params[b].max_new_tokens for b in self._joining),
                    *(self.params[b].max_new_tokens - len(self.completions[b].token_ids) for b in live)])
        return width + left <= self.backend.config.block_size

    def admit(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]) -> list[int]:
        """Add rows to this batch while it runs; returns their row numbers (Delta.row, completions[row]). They join
        before the next step: prefilled beside the running rows (Backend.add_rows), their first tokens streamed
        at once. Call it between Deltas, from the thread iterating. Raises GenerationError for an invalid prompt
        or when the rows do not fit (`fits`)."""
        if not len(prompts):
            raise GenerationError("admit() needs at least one prompt")
        if self._done:
            raise GenerationError("this batch has finished; start a new Generation for these prompts")
        ids, params = self._check(prompts, params)
        if not capabilities_of(self.backend).add_rows:
            raise GenerationError(f"the {self.backend.name} backend cannot add rows to a running batch (no add_rows); "
                                  f"run these prompts in the next batch")
        if not self.fits([len(p) for p in ids], [sp.max_new_tokens for sp in params]):
            raise GenerationError(f"these prompts do not fit the running batch: its cache, as wide as its longest "
                                  f"row, would exceed block_size {self.backend.config.block_size}; run them in the "
                                  f"next batch")
        rows = self._register(ids, params)
        self._joining += rows
        return rows

    def __iter__(self) -> Iterator[Delta]:
        if self._started:
            raise GenerationError("a Generation runs once; make a new one")
        self._started = True
        backend, st = self.backend, self._batch
        can_drop = capabilities_of(backend).keep_rows
        start = time.perf_counter()
        for b in self._joining:  # the clocks of the rows given at construction start now
            self._start[b] = start
        while True:
            keep = [i for i, b in enumerate(st.slots) if self.completions[b].finish_reason is None]
            drop = keep and can_drop and len(keep) < len(st.slots) and (self._joining or self._worth_dropping(st.slots, keep))
            if drop:
                backend.keep_rows(keep)  # finished rows leave the batch: later steps compute the live ones only
                st.take(keep)
            if drop or keep and self._joining:  # what only finished rows needed goes before anything joins
                self._trim()
            if self._joining:
                yield from self._join(bool(keep))
                continue
            if not keep:
                self._done = True
                return
            st.width += 1
            logits = backend.forward(st.next_ids, st.mask[:, :st.width], st.next_pos)[:, -1, :]  # (B, V)
            st.next_pos += 1
            yield from self._emit([self._advance(b, logits[i], len(self.completions[b].token_ids), self._start[b], 0.0)
                                   for i, b in enumerate(st.slots) if self.completions[b].finish_reason is None])

    def _lead(self, rows: list[int] | None = None) -> int:
        """Leading cache columns that none of these cache rows (default: all) needs, when drop_front would remove
        them (TRIM_AT_LEAST or more); else 0."""
        st = self._batch
        rows = list(range(len(st.slots))) if rows is None else rows
        if not st.width or not rows or not capabilities_of(self.backend).drop_front:
            return 0
        lead = int(np.argmax(st.mask[rows, :st.width].any(axis=0)))
        return lead if lead >= TRIM_AT_LEAST else 0

    def _trim(self) -> None:
        """Drop the leading cache columns no row needs (the left padding of rows that left): the cache of a batch
        that rows keep joining stays as wide as its rows need, not as long as it has run."""
        lead, st = self._lead(), self._batch
        if lead:
            self.backend.drop_front(lead)
            st.mask, st.width = st.mask[:, lead:], st.width - lead

    def _width_at_join(self) -> int:
        """The cache's width when rows join next: finished rows leave first (with keep_rows), then it is trimmed."""
        st = self._batch
        if not capabilities_of(self.backend).keep_rows:
            return st.width - self._lead()
        return st.width - self._lead([i for i, b in enumerate(st.slots) if self.completions[b].finish_reason is None])

    def _join(self, running: bool) -> Iterator[Delta]:
        """Prefill the joining rows (as the batch's first rows, or beside the running ones) and sample their first
        tokens; the mask is rebuilt for every step still to come."""
        st, rows, self._joining = self._batch, self._joining, []
        P, n, k = max(len(self.prompt_ids[b]) for b in rows), len(rows), len(st.slots)
        ids, mask = np.zeros((n, P), np.int64), np.zeros((n, P), np.int64)  # 0 fills the left padding: masked out
        for j, b in enumerate(rows):
            ids[j, P - len(self.prompt_ids[b]):] = self.prompt_ids[b]
            mask[j, P - len(self.prompt_ids[b]):] = 1
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        t = time.perf_counter()
        if running:
            logits = self.backend.add_rows(ids, mask, pos)[:, -1, :]
        else:
            st.clear()
            k = 0
            self.backend.reset(n)
            logits = self.backend.forward(ids, mask, pos)[:, -1, :]  # (n, V); a logits="last" graph returns only this
        prefill = time.perf_counter() - t
        width = max(st.width, P)
        left = max(self.params[b].max_new_tokens - len(self.completions[b].token_ids) for b in st.slots + rows
                   if self.completions[b].finish_reason is None)
        full = np.ones((k + n, width + left), np.int64)  # the steps to come: every row is real there
        full[:k, :width - st.width] = 0  # the running rows gain masked positions on the left (Backend.add_rows)
        full[:k, width - st.width:width] = st.mask[:, :st.width]
        full[k:, :width - P] = 0
        full[k:, width - P:width] = mask
        st.slots, st.width, st.mask = st.slots + rows, width, full
        st.next_ids = np.concatenate([st.next_ids, np.zeros((n, 1), np.int64)])
        st.next_pos = np.concatenate([st.next_pos, pos[:, -1:] + 1])
        yield from self._emit([self._advance(b, logits[j], 0, self._start[b], prefill) for j, b in enumerate(rows)])

    def _emit(self, deltas: list[Delta]) -> Iterator[Delta]:
        """Record each row's new token (next input, latency since its previous one) and hand the Deltas out."""
        now, st = time.perf_counter(), self._batch
        slot = {b: i for i, b in enumerate(st.slots)}
        for d in deltas:
            if d.token_ids:
                st.next_ids[slot[d.row], 0] = d.token_ids[-1]
                if self._last[d.row] is not None:  # forward + sampling (+ the consumer's time) since its previous token
                    self.completions[d.row].timing.decode_latencies_s.append(now - self._last[d.row])
                self._last[d.row] = now
        for d in deltas:
            if d.text or d.token_ids or d.finish_reason:
                yield d

    def _worth_dropping(self, slots: list[int], keep: list[int]) -> bool:
        """Whether to drop the finished rows now: when a quarter of the batch has finished and the live rows
        still have DROP_AFTER steps or more to go (a drop copies the kept rows' cache once)."""
        left = max(self.params[slots[i]].max_new_tokens - len(self.completions[slots[i]].token_ids) for i in keep)
        return 4 * (len(slots) - len(keep)) >= len(slots) and left >= DROP_AFTER

    def _advance(self, b: int, logits: np.ndarray, step: int, t0: float, prefill: float) -> Delta:
        """Sample row b's next token and turn it into a Delta (finishing the row when it should end)."""
        c, sp, text = self.completions[b], self.params[b], self._texts[b]
        if self._cancelled[b]:
            return self._finish(b, Delta(b, "", []), "cancelled", None, t0)
        token = self._samplers[b](logits)
        if step == 0:
            c.timing.prefill_s, c.timing.ttft_s = prefill, time.perf_counter() - t0
        if token in sp.stop_token_ids:
            return self._finish(b, Delta(b, "", []), "stop", token, t0)
        c.token_ids.append(token)
        delta = Delta(b, text.push(token), [token])
        if text.stopped is not None:
            return self._finish(b, delta, "stop", text.stopped, t0)
        if len(c.token_ids) >= sp.max_new_tokens:
            return self._finish(b, delta, "length", None, t0)
        return delta

    def _finish(self, b: int, delta: Delta, reason: str, stop, t0: float) -> Delta:
        c = self.completions[b]
        delta.text += self._texts[b].finish()
        delta.finish_reason = c.finish_reason = reason
        c.stop, c.text = stop, self._texts[b].text
        c.timing.total_s = time.perf_counter() - t0
        return delta


def make_generation(backend, tokenizer, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams],
                    draft=None, speculate: int | None = None) -> Generation:
    """A Generation, or with a `draft` backend a runtime.speculative.SpeculativeGeneration (same output)."""
    if draft is None:
        return Generation(backend, tokenizer, prompts, params)
    from .speculative import DEFAULT_SPECULATE, SpeculativeGeneration

    return SpeculativeGeneration(backend, tokenizer, prompts, params, draft,
                                 DEFAULT_SPECULATE if speculate is None else speculate)


def stream(backend, tokenizer, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams],
           draft=None, speculate: int | None = None) -> Iterator[Delta]:
    """Yield per-row Deltas as tokens are produced (see Generation for the arguments, make_generation for draft)."""
    return iter(make_generation(backend, tokenizer, prompts, params, draft, speculate))


def generate(backend, tokenizer, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams],
             draft=None, speculate: int | None = None) -> list[Completion]:
    """Run prompts to completion in one batch; one Completion per prompt, in order.

    Args:
        backend: a loaded Backend (runtime.backends.load_backend).
        tokenizer: a tiktoken Encoding, or None for token-id prompts.
        prompts: texts or token-id lists, of any lengths (left-padded into one batch).
        params: one SamplingParams for every row, or one per row.
        draft: a draft Backend for speculative decoding (the output stays the target's; several prompts need
            a pair that runtime.speculative.batches, not a kv_cache="shared" one).
        speculate: tokens the draft guesses per round at most (default runtime.speculative.DEFAULT_SPECULATE;
            each round guesses 0..speculate, whichever the measured acceptance and step costs make fastest).
    Returns:
        list of Completion(prompt_ids, token_ids, text, finish_reason, stop, timing).
    """
    g = make_generation(backend, tokenizer, prompts, params, draft, speculate)
    for _ in g:
        pass
    return g.completions


def summary_line(completions: Sequence[Completion], backend, seconds: float | None = None) -> str:
    """`128 tokens in 2.9 s, 44.1 tok/s [onnxruntime, CPUExecutionProvider, fp32]` (prefill included)."""
    n = sum(len(c.token_ids) for c in completions)
    s = seconds if seconds is not None else max((c.timing.total_s for c in completions), default=0.0)
    rate = n / s if s > 0 else 0.0
    return f"{n} tokens in {s:.{1 if s >= 10 else 2}f} s, {rate:.1f} tok/s [{backend.name}, {backend.provider}, {backend.precision}]"
