"""Choosing the next token from numpy logits: greedy, temperature, top-k, top-p, repetition penalty, seed.

Pure numpy, one row at a time, so every request in a batch can carry its own parameters and its own
seeded generator (same seed, same backend -> same tokens, wherever the row sits in the batch). Rows
past `real_vocab_size` (nanoGPT pads 50257 to 50304) are cut off before anything else: never sampled.

    params = SamplingParams(temperature=0.8, top_k=200, seed=0)
    sampler = Sampler(params, real_vocab_size=50257, prompt_ids=ids)
    token = sampler(logits[b, -1])          # int; remembers it for the repetition penalty
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

EOT_TOKEN = 50256  # GPT-2's <|endoftext|>
MAX_LOGPROBS = 5  # top alternatives per token at most, as OpenAI's legacy completions allow


class SamplingError(ValueError):
    """A SamplingParams field out of range; `field` names it (a server maps it to its API's parameter)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded (the OpenAI API's fields, and the CLI's flags).

    temperature 0 means greedy (argmax). top_k 0 and top_p 1 switch those filters off. The repetition
    penalty is CTRL's / Hugging Face's: every token seen in the prompt or output has its logit divided by
    it when positive, multiplied when negative (1 = off). Generation stops at `max_new_tokens`, at any id
    in `stop_token_ids` (not part of the output), or after any string in `stop` (trimmed from the text).
    `logprobs` N (0..MAX_LOGPROBS) reports each generated token's log-probability and the N likeliest
    alternatives (None = off, no cost); `prompt_logprobs` does the same for every prompt token but the first
    (it needs the logits of every prompt position). max_new_tokens 0 runs the prefill only (a prompt scored).
    """
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = (EOT_TOKEN,)
    logprobs: int | None = None
    prompt_logprobs: bool = False

    def __post_init__(self):
        # lists (JSON, argparse) become tuples so params stay hashable and immutable
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name, ok, message in (
                ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
                 f"max_new_tokens must be an integer >= 0 (0: the prompt's prefill only), got {self.max_new_tokens!r}"),
                ("logprobs", self.logprobs is None or isinstance(self.logprobs, int) and
                 0 <= self.logprobs <= MAX_LOGPROBS,
                 f"logprobs must be an integer in 0..{MAX_LOGPROBS} (alternatives per token), got {self.logprobs!r}"),
                ("temperature", 0 <= self.temperature < math.inf,  # also catches NaN
                 f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}"),
                ("top_p", 0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p}"),
                ("top_k", isinstance(self.top_k, int) and self.top_k >= 0,
                 f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}"),
                ("repetition_penalty", 0 < self.repetition_penalty < math.inf,
                 f"repetition_penalty must be > 0 and finite (1 = off), got {self.repetition_penalty}"),
                ("stop", all(self.stop), "stop strings must not be empty")):
            if not ok:
                raise SamplingError(name, message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_next_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                      seen_ids: np.ndarray | None = None) -> int:
    """One token id from one row of logits (V,) already cut to the real vocabulary.

    Args:
        logits: (V,) float logits of the next position.
        params: the request's SamplingParams.
        rng: the request's generator (drawn from only when not greedy).
        seen_ids: unique ids seen so far, for the repetition penalty.
    Returns:
        the chosen id, in 0..V-1.
    """
    if params.greedy and (params.repetition_penalty == 1.0 or seen_ids is None or not len(seen_ids)):
        return int(np.argmax(logits))  # the common fast path: no copy
    x = logits.astype(np.float64)  # a copy: the caller's logits are never modified
    if params.repetition_penalty != 1.0 and seen_ids is not None and len(seen_ids):
        s = x[seen_ids]
        x[seen_ids] = np.where(s > 0, s / params.repetition_penalty, s * params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(x))
    # Subtract the max before dividing: (x - max) / T is <= 0 and never NaN for any finite T > 0, where x / T
    # overflows to inf below T ~ 1e-300 and inf - inf is NaN. A gap too large for T becomes -inf, probability 0,
    # so a temperature below the logits' resolution is greedy (ties at the max share the mass).
    with np.errstate(over="ignore"):
        x = (x - x.max()) / params.temperature
    # Candidates stay in token-id order: the draw maps to a token through the cumulative sum, so an order
    # that followed the values (argpartition's, a sort's) would let a 1e-6 difference between backends, or
    # between a 1-token and a 5-token step, reorder near-equal candidates and change the token.
    ids = None  # candidate ids, ascending; None = the whole vocabulary
    if 0 < params.top_k < x.size:
        ids = np.sort(np.argpartition(x, -params.top_k)[-params.top_k:])
        x = x[ids]
    p = np.exp(x - x.max())
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        # keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p
        keep = np.sort(order[: int(np.searchsorted(cum, params.top_p)) + 1])
        ids = keep if ids is None else ids[keep]
        p = p[keep] / p[keep].sum()
    choice = int(np.searchsorted(np.cumsum(p), rng.random() * 1.0, side="right"))
    choice = min(choice, p.size - 1)  # rounding: cumsum may end a hair below 1
    return int(choice if ids is None else ids[choice])


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model and the likeliest alternatives, (id, logprob), best first."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, top: int = 0) -> TokenLogprob:
    """log_softmax of one row of logits (V,) (already cut to the real vocabulary) at `token`, with the `top` likeliest
    ids. In float64 from the backend's float32. These are the model's own probabilities, before the repetition
    penalty, temperature, top-k and top-p (what OpenAI reports, and what an evaluation harness scores), so they do
    not depend on how the token was sampled."""
    x = logits.astype(np.float64)
    m = x.max()
    lsm_at = x - m - np.log(np.exp(x - m).sum())  # (V,) log-softmax
    best = ()
    if top:
        ids = np.argpartition(-lsm_at, min(top, x.size) - 1)[:top]
        ids = ids[np.lexsort((ids, -lsm_at[ids]))]  # best first, ties by id
        best = tuple((int(i), float(lsm_at[i])) for i in ids)
    return TokenLogprob(int(token), float(lsm_at[token]), best)


@dataclass
class Sampler:
    """The sampling state of one row: its params, its seeded generator, the ids it has seen."""
    params: SamplingParams
    real_vocab_size: int
    prompt_ids: list[int] | np.ndarray = ()
    rng: np.random.Generator = field(init=False)
    _seen: np.ndarray = field(init=False, repr=False)
    _seen_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.params.seed)
        self._seen = np.zeros(self.real_vocab_size, dtype=bool)
        self._seen_ids = []
        for t in self.prompt_ids:
            self._remember(int(t))

    def _remember(self, token: int) -> None:
        if 0 <= token < self.real_vocab_size and not self._seen[token]:
            self._seen[token] = True
            self._seen_ids.append(token)

    @property
    def seen_ids(self) -> list[int]:
        """Ids seen so far (prompt and output), each once, in order of first appearance."""
        return list(self._seen_ids)

    def __call__(self, logits: np.ndarray) -> int:
        """logits (V_padded,) of one row -> the next id (< real_vocab_size), remembered for the penalty."""
        seen = np.asarray(self._seen_ids, dtype=np.int64) if self.params.repetition_penalty != 1.0 else None
        token = sample_next_token(logits[: self.real_vocab_size], self.params, self.rng, seen)
        self._remember(token)
        return token
