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
    for d in g: ...; g.cancel(1)                                       # per-row deltas, cancellation
    g.completions                                                      # list[Completion] when done

A backend holds one KV cache, so one Generation runs on it at a time: a server batches the requests
that arrive together into one Generation and queues the next batch behind it.
"""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from .sampling import Sampler, SamplingParams

__all__ = ["SamplingParams", "Timing", "Completion", "Delta", "Generation", "generate", "stream", "make_generation",
           "GenerationError", "summary_line"]

Prompt = str | Sequence[int]
DROP_AFTER = 8  # finished rows leave a batch when the live ones have this many steps or more to go


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


class Generation:
    """One batch of requests run in shared forward passes; iterate it for per-row Deltas.

    Args:
        backend: any runtime.backends Backend (it is reset: the batch owns its KV cache while running).
        tokenizer: a tiktoken Encoding (runtime.tokenizer.load_tokenizer()); None only with id prompts and
            no stop strings (text stays empty).
        prompts: text, or token ids, per row.
        params: one SamplingParams for all rows, or one per row.
    """

    def __init__(self, backend, tokenizer, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]):
        if isinstance(prompts, str) or not len(prompts):
            raise GenerationError("prompts must be a non-empty list of texts or token-id lists")
        B = len(prompts)
        params = [params] * B if isinstance(params, SamplingParams) else list(params)
        if len(params) != B:
            raise GenerationError(f"{len(params)} SamplingParams for {B} prompts; give one, or one per prompt")
        self.backend, self.tokenizer, self.params = backend, tokenizer, params
        config = backend.config
        self.real_vocab_size = config.real_vocab_size
        self.prompt_ids = [self._encode(p, i) for i, p in enumerate(prompts)]
        for i, (ids, sp) in enumerate(zip(self.prompt_ids, params)):
            if not ids:
                raise GenerationError(f"prompt {i} is empty; give at least one token")
            bad = [t for t in ids if not 0 <= t < config.vocab_size]
            if bad:
                raise GenerationError(
                    f"prompt {i} has token id {bad[0]} but this model's vocabulary is 0..{config.vocab_size - 1} "
                    f"(tokenizer {config.tokenizer!r} makes ids up to 50256); use a model trained on that tokenizer, "
                    f"or --prompt-ids within the vocabulary")
            if len(ids) + sp.max_new_tokens > config.block_size:
                raise GenerationError(f"prompt {i} ({len(ids)} tokens) + max_new_tokens ({sp.max_new_tokens}) exceeds "
                                      f"block_size {config.block_size}; lower --max-new-tokens or shorten the prompt")
            if sp.stop and tokenizer is None:
                raise GenerationError("stop strings need a tokenizer to decode text")
        L = max(len(ids) for ids in self.prompt_ids)
        self.max_steps = max(sp.max_new_tokens for sp in params)
        if L + self.max_steps > config.block_size:  # left padding puts every row's cache at the longest prompt's length
            raise GenerationError(f"batched, the longest prompt ({L} tokens) + the largest max_new_tokens "
                                  f"({self.max_steps}) exceeds block_size {config.block_size}; batch these prompts separately")
        self.completions = [Completion(prompt_ids=list(ids), token_ids=[], text="") for ids in self.prompt_ids]
        self._texts = [_TextStream(tokenizer, sp.stop) for sp in params]
        self._samplers = [Sampler(sp, self.real_vocab_size, ids) for sp, ids in zip(params, self.prompt_ids)]
        self._cancelled = [False] * B
        self._started = False

    def _encode(self, prompt: Prompt, i: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError(f"prompt {i} is text but no tokenizer was given; pass token ids or a tokenizer")
            return self.tokenizer.encode(prompt, allowed_special="all")
        return [int(t) for t in prompt]

    def cancel(self, row: int) -> None:
        """Stop `row` at the next step (finish_reason "cancelled"); the other rows go on."""
        self._cancelled[row] = True

    def __iter__(self) -> Iterator[Delta]:
        if self._started:
            raise GenerationError("a Generation runs once; make a new one")
        self._started = True
        backend, B = self.backend, len(self.prompt_ids)
        L = max(len(ids) for ids in self.prompt_ids)
        total = L + self.max_steps

        # everything the loop touches, allocated once: (B, L) prefill ids, the (B, L + steps) mask
        ids = np.zeros((B, L), dtype=np.int64)  # 0 fills the left padding: any valid id, masked out
        mask = np.ones((B, total), dtype=np.int64)
        for b, p in enumerate(self.prompt_ids):
            ids[b, L - len(p):] = p
            mask[b, : L - len(p)] = 0
        pos = np.maximum(np.cumsum(mask[:, :L], axis=1) - 1, 0)  # (B, L)
        next_ids = np.zeros((B, 1), dtype=np.int64)
        next_pos = pos[:, -1:].copy() + 1  # (B, 1)
        live = [True] * B
        slots = list(range(B))  # the rows in the cache, in its order (finished rows leave it: keep_rows)
        can_drop = callable(getattr(backend, "keep_rows", None))

        t0 = time.perf_counter()
        backend.reset(B)
        logits = backend.forward(ids, mask[:, :L], pos)[:, -1, :]  # (B, V); a logits="last" graph returns only this
        prefill = t_prev = time.perf_counter() - t0
        for step in range(self.max_steps):
            deltas = []
            for i, b in enumerate(slots):
                if live[b]:
                    deltas.append(self._advance(b, logits[i], step, t0, prefill))
                    if self.completions[b].token_ids:
                        next_ids[i, 0] = self.completions[b].token_ids[-1]
            now = time.perf_counter() - t0
            for d in deltas:
                if step and d.token_ids:  # the gap since this row's previous token: forward + sampling (+ the consumer's time)
                    self.completions[d.row].timing.decode_latencies_s.append(now - t_prev)
                if d.finish_reason:
                    live[d.row] = False
                if d.text or d.token_ids or d.finish_reason:
                    yield d
            t_prev = now
            if not any(live):
                return
            keep = [i for i, b in enumerate(slots) if live[b]]
            if can_drop and len(keep) < len(slots) and self._worth_dropping(slots, keep):
                backend.keep_rows(keep)  # finished rows leave the batch: later steps compute the live ones only
                slots, next_ids, next_pos, mask = [slots[i] for i in keep], next_ids[keep], next_pos[keep], mask[keep]
            n = L + step + 1
            logits = backend.forward(next_ids, mask[:, :n], next_pos)[:, -1, :]
            next_pos += 1
        raise AssertionError("every row ends by max_new_tokens")  # pragma: no cover

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
