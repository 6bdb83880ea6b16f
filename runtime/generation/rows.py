"""The rows of a Generation, one per request: prompt, params, sampler, streamed text, completion, clocks.

What a row produces is decided here whichever way it was decoded: `RowTable.advance` samples the row's next
token from the logits a strategy computed, detokenizes it incrementally (a UTF-8 character split over tokens
is never split across streamed pieces) and ends the row at max_new_tokens, a stop token id, a stop string
(even one spanning tokens) or a cancel. Requests are validated once, before any row is registered; the
context-length rule is `check_context`.
"""
from __future__ import annotations

import codecs
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..sampling import Sampler, SamplingParams, TokenLogprob, token_logprob

Prompt = str | Sequence[int]


class GenerationError(ValueError):
    """A request generation cannot serve as given (empty prompt, too long, ids outside the vocabulary)."""


def fits_context(prompt_lengths: Sequence[int], max_new_tokens: Sequence[int], block_size: int) -> bool:
    """Whether rows of these prompt lengths and max_new_tokens fit one cache: left padding puts every row at the
    longest prompt's length, and it must still hold the most tokens any row generates."""
    return max(prompt_lengths) + max(max_new_tokens) <= block_size


def check_context(prompt_tokens: int, max_new_tokens: int, block_size: int, what: str = "prompt",
                  fix: str = "lower --max-new-tokens or shorten the prompt", new: str = "max_new_tokens") -> None:
    """Raise GenerationError when `what` (prompt_tokens long) + max_new_tokens exceeds block_size."""
    if not fits_context([prompt_tokens], [max_new_tokens], block_size):
        raise GenerationError(f"{what} ({prompt_tokens} tokens) + {new} ({max_new_tokens}) exceeds "
                              f"block_size {block_size}; {fix}")


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
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, with SamplingParams.logprobs
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt id (None for the first): prompt_logprobs

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "text": self.text,
                "finish_reason": self.finish_reason, "stop": self.stop, "timing": self.timing.to_dict()}


# RowTable.release's stubs, one per finish_reason (never mutated: released rows are finished)
_RELEASED: dict[str, Completion] = {}


@dataclass
class Delta:
    """What one row produced in one step: new text (never a partial UTF-8 character) and new ids."""
    row: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # set on the row's last delta
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when the row asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the row's first delta, when it asked


class TextStream:
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


class RowTable:
    """Every row a Generation ever ran, by row number (Delta.row): lists indexed by row."""

    def __init__(self, config, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.prompt_ids: list[list[int]] = []
        self.params: list[SamplingParams] = []
        self.completions: list[Completion] = []
        self.texts: list[TextStream] = []
        self.samplers: list[Sampler] = []
        self.cancelled: list[bool] = []
        self.start: list[float] = []  # when the row's clock started (the run's start, or its admit())
        self.last: list[float | None] = []  # when its previous token came
        self.running = 0  # rows registered and not finished

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def left(self, b: int) -> int:
        """Tokens row b may still generate."""
        return self.params[b].max_new_tokens - len(self.completions[b].token_ids)

    def check(self, prompts: Sequence[Prompt], params) -> tuple[list[list[int]], list[SamplingParams]]:
        """Encode and validate rows before any is registered: (token ids, SamplingParams) per row."""
        n, first, config = len(prompts), len(self), self.config
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
            check_context(len(p), sp.max_new_tokens, config.block_size, f"prompt {i}")
            if sp.stop and self.tokenizer is None:
                raise GenerationError("stop strings need a tokenizer to decode text")
        return ids, params

    def _encode(self, prompt: Prompt, i: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError(f"prompt {i} is text but no tokenizer was given; pass token ids or a tokenizer")
            return self.tokenizer.encode(prompt, allowed_special="all")
        return [int(t) for t in prompt]

    def register(self, ids: list[list[int]], params: list[SamplingParams]) -> list[int]:
        """Add checked rows; their row numbers."""
        first = len(self)
        for p, sp in zip(ids, params):
            self.prompt_ids.append(p)
            self.params.append(sp)
            self.completions.append(Completion(prompt_ids=list(p), token_ids=[], text="",
                                               logprobs=[] if sp.logprobs is not None else None))
            self.texts.append(TextStream(self.tokenizer, sp.stop))
            self.samplers.append(Sampler(sp, self.config.real_vocab_size, p))
            self.cancelled.append(False)
            self.start.append(time.perf_counter())
            self.last.append(None)
        self.running += len(ids)
        return list(range(first, len(self)))

    def release(self, b: int) -> None:
        """Forget finished row b: its Completion becomes a stub (finish_reason only), its state goes."""
        reason = self.completions[b].finish_reason
        if reason is None:
            raise GenerationError(f"row {b} is still running; release() takes finished rows")
        self.completions[b] = _RELEASED.setdefault(reason, Completion([], [], "", reason))
        self.prompt_ids[b] = self.params[b] = self.samplers[b] = self.texts[b] = None
        self.start[b] = self.last[b] = None

    def wants_prompt_logits(self, b: int) -> bool:
        """Whether row b needs the logits of every prompt position at its prefill (prompt_logprobs)."""
        return self.params[b].prompt_logprobs

    def score_prompt(self, b: int, logits: np.ndarray) -> None:
        """Row b's prompt log-probabilities from its prefill's logits (T, V), the row's positions at the end (left
        padding before them); kept for its first Delta. Position t's logits predict prompt token t + 1."""
        ids, sp, V = self.prompt_ids[b], self.params[b], self.config.real_vocab_size
        if logits.shape[0] < len(ids):
            raise GenerationError(f"prompt log-probabilities need logits for all {len(ids)} prompt positions, but the "
                                  f"model returned {logits.shape[0]} (an export with --logits last or last:N); "
                                  f"re-export it with --logits all")
        at = logits[logits.shape[0] - len(ids):]
        self.completions[b].prompt_logprobs = [None] + [token_logprob(at[t, :V], ids[t + 1], sp.logprobs or 0)
                                                        for t in range(len(ids) - 1)]

    def advance(self, b: int, logits: np.ndarray, prefill: float | None = None) -> Delta:
        """Sample row b's next token and turn it into a Delta (finishing the row when it should end). prefill:
        the seconds of the forward pass that gave the row its first logits (recorded with its first token)."""
        delta = self._advance(b, logits, prefill)
        if prefill is not None:  # the row's first Delta carries its prompt's log-probabilities
            delta.prompt_logprobs = self.completions[b].prompt_logprobs
        return delta

    def _advance(self, b: int, logits: np.ndarray, prefill: float | None) -> Delta:
        c, sp, text = self.completions[b], self.params[b], self.texts[b]
        if self.cancelled[b]:
            return self._finish(b, Delta(b, "", []), "cancelled", None)
        if prefill is not None:
            c.timing.prefill_s, c.timing.ttft_s = prefill, time.perf_counter() - self.start[b]
        if sp.max_new_tokens == 0:  # a prompt scored only (prompt_logprobs)
            return self._finish(b, Delta(b, "", []), "length", None)
        token = self.samplers[b](logits)
        if token in sp.stop_token_ids:
            return self._finish(b, Delta(b, "", []), "stop", token)
        c.token_ids.append(token)
        delta = Delta(b, text.push(token), [token])
        if sp.logprobs is not None:  # only rows that asked pay for the full-vocabulary log-softmax
            lp = token_logprob(logits[:self.config.real_vocab_size], token, sp.logprobs)
            c.logprobs.append(lp)
            delta.logprobs = [lp]
        if text.stopped is not None:
            return self._finish(b, delta, "stop", text.stopped)
        if len(c.token_ids) >= sp.max_new_tokens:
            return self._finish(b, delta, "length", None)
        return delta

    def _finish(self, b: int, delta: Delta, reason: str, stop) -> Delta:
        c = self.completions[b]
        delta.text += self.texts[b].finish()
        delta.finish_reason = c.finish_reason = reason
        c.stop, c.text = stop, self.texts[b].text
        c.timing.total_s = time.perf_counter() - self.start[b]
        self.running -= 1
        return delta
