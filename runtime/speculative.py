"""Speculative decoding: a cheap draft model guesses K tokens, the target scores all of them in one step.

Decoding one token at a time streams every weight of the target once per token; on a CPU that memory
traffic, not arithmetic, bounds fp32 decode (docs/benchmarks.md). Here a draft (typically the int8 or int4
export of the same checkpoint, 4-8x cheaper per step) proposes K tokens greedily, and the target runs the
pending token plus the K guesses as one (1, K+1) step: the same weight traffic as one decode step, and
K+1 positions of logits (a target exported with `--logits all` or `--logits last:N`, N >= K+1).

The target decides every token. Position by position, the target's own Sampler picks the token from the
target's logits, exactly as the plain Generation loop does: the same greedy argmax, the same repetition
penalty, the same seeded generator drawn once per emitted token. A guess only saves a step when it is
the token the target picked anyway (the draft guesses its argmax, under the request's repetition
penalty); at the first miss the target's pick is emitted and the rest of the guesses are taken back
(`Backend.rewind`: free for a shared KV cache). So the output is the target's output, for greedy and for
seeded sampling alike, whatever the draft is. (This is the "match" form of speculative sampling: exact
and seed-stable; it accepts a sampled token less often than the rejection-sampling form, which would
change which random draws make the output.)

A draft that rarely agrees (a poor draft, sampling at a high temperature) would make generation slower,
so each round guesses 0..K tokens, whichever the measured acceptance and step costs make fastest
(`Depth`); at 0 the round is a plain decode step.

    from runtime.speculative import SpeculativeGeneration
    g = SpeculativeGeneration(target, tokenizer, ["def main():"], SamplingParams(temperature=0), draft, speculate=4)
    for d in g: print(d.text, end="")
    g.stats  # {"rounds", "plain_rounds", "drafted", "accepted", "acceptance", "tokens_per_target_step"}

One prompt at a time (batch 1): rows of a batch would accept different numbers of guesses.
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np

from .generate import Delta, Generation, GenerationError, Prompt
from .sampling import SamplingParams, sample_next_token

DEFAULT_SPECULATE = 4  # guesses per round at most: with ~97% per-token agreement, ~4.7 tokens per target step


class Depth:
    """How many tokens the draft guesses next round: the k in 0..cap with the most expected tokens per second.

    A round of k guesses costs k draft steps + one target step and yields 1 + p1 + p1 p2 + ... + p1...pk
    tokens on average, where p_i is the chance that guess i is accepted once guesses 1..i-1 were. The p_i
    are counted per position, since agreement comes in runs (a predictable stretch accepts guess 4 more
    often than guess 1) and one rate for all positions would under-guess. Costs and p_i are measured as
    the generation runs (decayed averages), so a draft that rarely agrees (sampling at a high temperature,
    a poor draft) drops to k = 0, plain decoding, instead of making generation slower; every PROBE_EVERY
    plain rounds one guess is tried again, in case agreement came back.
    """
    DECAY = 0.9  # weight of the past in the running averages, per round (about the last 10 rounds count)
    PROBE_EVERY = 16

    def __init__(self, max_k: int, adaptive: bool = True):
        self.max_k, self.adaptive = max_k, adaptive
        self.hits = np.zeros(max(max_k, 1))  # decayed counts per guess position: accepted,
        self.tries = np.zeros(max(max_k, 1))  # and checked (every guess up to the first miss)
        self.t_draft: float | None = None  # seconds per draft step
        self.t_target: float | None = None  # seconds per target step (any k: the weights are read once)
        self.plain = 0  # consecutive rounds at k = 0

    def acceptance(self) -> np.ndarray:
        """p_i per guess position, each smoothed by one pseudo-check at the previous position's rate (1/2 before
        the first): with no evidence a position is as good as the one before it."""
        p, prior = np.empty_like(self.hits), 0.5
        for i in range(p.size):
            p[i] = prior = (self.hits[i] + prior) / (self.tries[i] + 1)
        return np.minimum(p, 0.999)

    def next(self, cap: int) -> int:
        cap = min(cap, self.max_k)
        if not self.adaptive or cap <= 0 or self.t_draft is None or self.t_target is None:
            return max(cap, 0)
        tokens = np.concatenate([[1.0], 1 + np.cumsum(np.cumprod(self.acceptance()))])  # expected, k = 0..max_k
        rate = [tokens[k] / (k * self.t_draft + self.t_target) for k in range(cap + 1)]
        k = int(np.argmax(rate))
        self.plain = self.plain + 1 if k == 0 else 0
        if self.plain >= self.PROBE_EVERY:
            self.plain, k = 0, 1
        return k

    def update(self, k: int, accepted: int, t_draft: float | None, t_target: float) -> None:
        """After a round of k guesses (not cut short by a stop): accepted of them, the seconds of one draft step
        (None when the round had no one-token draft call: its prefill, a catch-up after plain rounds), and of
        the target step."""
        d = self.DECAY
        self.t_target = t_target if self.t_target is None else d * self.t_target + (1 - d) * t_target
        if t_draft is not None:
            self.t_draft = t_draft if self.t_draft is None else d * self.t_draft + (1 - d) * t_draft
        if k:
            checked = min(accepted + 1, k)  # guesses 1..accepted, and the first miss
            self.hits *= d
            self.tries *= d
            self.tries[:checked] += 1
            self.hits[:accepted] += 1


def load_pair(backend: str, model: str, draft: str | None, speculate: int | None = None, **options):
    """(target, draft) as the CLIs load them; draft is None without `draft`. With one, both sessions stop
    their threads spinning between runs (they take turns on the same cores) and the pair is checked now,
    before any request."""
    from .backends import load_backend

    if speculate is not None and not draft:
        raise GenerationError("--speculate needs --draft DIR (the model that guesses the tokens)")
    if draft and backend == "onnxruntime":
        options["spinning"] = False
    target = load_backend(backend, model, **options)
    if not draft:
        return target, None
    guesser = load_backend(backend, draft, **options)
    check_pair(target, guesser, DEFAULT_SPECULATE if speculate is None else speculate)
    return target, guesser


def check_pair(target, draft, speculate: int) -> None:
    """Raise GenerationError, saying how to fix it, unless `draft` can guess `speculate` tokens for `target`."""
    if not isinstance(speculate, int) or speculate < 1:
        raise GenerationError(f"speculate must be an integer >= 1 (tokens the draft guesses per round), got {speculate!r}")
    for role, b in (("target", target), ("draft", draft)):
        if not callable(getattr(b, "rewind", None)):
            raise GenerationError(f"the {role} backend {getattr(b, 'name', type(b).__name__)!r} cannot rewind its KV "
                                  f"cache, which speculative decoding needs; use the onnxruntime or torch backend")
    t, d = target.config, draft.config
    if (t.vocab_size, t.real_vocab_size, t.tokenizer) != (d.vocab_size, d.real_vocab_size, d.tokenizer):
        raise GenerationError(f"the draft's vocabulary ({d.vocab_size} ids, {d.real_vocab_size} real, tokenizer "
                              f"{d.tokenizer!r}) differs from the target's ({t.vocab_size}, {t.real_vocab_size}, "
                              f"{t.tokenizer!r}); the draft must share the target's tokenizer, e.g. its int8 export")
    art = getattr(target, "artifact", None)
    if art is not None and art.logits_positions(speculate + 1) < speculate + 1:
        raise GenerationError(
            f"the target returns logits for {art.logits_positions(speculate + 1)} position(s) per step "
            f"(exported with --logits {art.logits}), but checking {speculate} guesses needs {speculate + 1}; "
            f"re-export it with --logits last:{speculate + 1} (or --logits all), or lower --speculate")


class SpeculativeGeneration(Generation):
    """Generation of one prompt on `backend` (the target), with `draft` proposing `speculate` tokens a round.

    Args:
        backend: the target Backend; its logits must cover speculate + 1 positions per step
            (exported with `--logits all` or `--logits last:N`, N >= speculate + 1).
        tokenizer, prompts, params: as Generation; exactly one prompt.
        draft: a Backend over the same vocabulary (its own KV cache; reset here).
        speculate: tokens the draft guesses per round at most (>= 1).
        adaptive: choose each round's number of guesses, 0..speculate, from the measured acceptance and
            step costs (Depth); False always guesses `speculate` (the output is the same either way).
    """

    def __init__(self, backend, tokenizer, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams],
                 draft, speculate: int = DEFAULT_SPECULATE, adaptive: bool = True):
        super().__init__(backend, tokenizer, prompts, params)
        if len(self.prompt_ids) != 1:
            raise GenerationError(f"speculative decoding runs one prompt at a time, got {len(self.prompt_ids)}; "
                                  f"run them one by one, or drop --draft to batch them")
        check_pair(backend, draft, speculate)
        self.draft, self.speculate = draft, speculate
        self.depth = Depth(speculate, adaptive)
        self.stats = {"rounds": 0, "plain_rounds": 0, "drafted": 0, "accepted": 0, "acceptance": 0.0,
                      "tokens_per_target_step": 0.0}

    def __iter__(self) -> Iterator[Delta]:
        if self._started:
            raise GenerationError("a Generation runs once; make a new one")
        self._started = True
        target, draft, K = self.backend, self.draft, self.speculate
        prompt, c, sampler = self.prompt_ids[0], self.completions[0], self._samplers[0]
        guess_params = SamplingParams(temperature=0, repetition_penalty=self.params[0].repetition_penalty)
        block = min(target.config.block_size, draft.config.block_size)
        V = self.real_vocab_size
        L = len(prompt)
        ones = np.ones((1, target.config.block_size), np.int64)  # every mask is a slice of it: no padding at batch 1

        def step(backend, tokens: list[int], past: int) -> np.ndarray:
            T = len(tokens)
            ids = np.asarray(tokens, np.int64)[None]
            return backend.forward(ids, ones[:, :past + T], np.arange(past, past + T, dtype=np.int64)[None])[0]

        t0 = time.perf_counter()
        target.reset(1)
        logits = step(target, prompt, 0)[-1]
        prefill = time.perf_counter() - t0
        d = self._advance(0, logits, 0, t0, prefill)
        t_prev = time.perf_counter() - t0
        yield d
        if d.finish_reason:
            return
        draft.reset(1)
        # target cache: prompt + output but the last token (`pending`); draft cache + draft_todo: prompt + output
        past, pending = L, c.token_ids[-1]
        draft_past, draft_todo = 0, list(prompt) + [pending]  # the draft's prefill rides with its first round
        while True:
            remaining = self.params[0].max_new_tokens - len(c.token_ids)
            k = self.depth.next(min(K, remaining - 1, block - past - 1, block - draft_past - len(draft_todo)))
            guesses: list[int] = []
            draft_steps = []  # seconds of each one-token draft call (a first call catching up on several is not one)
            for _ in range(k):  # greedy guesses (with the request's repetition penalty): the best guess of the pick
                seen = None
                if guess_params.repetition_penalty != 1.0:
                    seen = np.asarray(sampler.seen_ids + guesses, np.int64)
                t = time.perf_counter()
                guesses.append(sample_next_token(step(draft, draft_todo, draft_past)[-1, :V], guess_params, None, seen))
                if len(draft_todo) == 1:
                    draft_steps.append(time.perf_counter() - t)
                draft_past += len(draft_todo)
                draft_todo = guesses[-1:]
            t_target = time.perf_counter()
            scores = step(target, [pending] + guesses, past)  # (k + 1, V): one step scores every guess
            t_target = time.perf_counter() - t_target
            deltas, accepted = [], 0
            for i in range(k + 1):
                d = self._advance(0, scores[i], len(c.token_ids), t0, prefill)
                deltas.append(d)
                hit = i < k and d.token_ids == [guesses[i]]
                accepted += hit
                if d.finish_reason or not hit:
                    break
            now = time.perf_counter() - t0
            made = sum(len(d.token_ids) for d in deltas)
            if made:  # the round's time, shared by its tokens (a round may end on a stop token, producing none)
                c.timing.decode_latencies_s += [(now - t_prev) / made] * made
            t_prev = now
            self.stats["rounds"] += 1
            self.stats["plain_rounds"] += k == 0
            self.stats["drafted"] += k
            self.stats["accepted"] += accepted
            self._update_stats()
            yield from (d for d in deltas if d.text or d.token_ids or d.finish_reason)
            if deltas[-1].finish_reason:
                return
            self.depth.update(k, accepted, float(np.mean(draft_steps)) if draft_steps else None, t_target)
            # keep pending + the accepted guesses; the target's own pick (a correction or a bonus) is pending
            past += 1 + accepted
            target.rewind(past)
            pending = c.token_ids[-1]
            if k:  # the draft cached this round's todo + guesses[:k-1]: keep the accepted ones
                draft_past -= (k - 1) - min(accepted, k - 1)
                draft.rewind(draft_past)
                draft_todo = guesses[k - 1:] if accepted == k else []
            draft_todo = draft_todo + [pending]

    def _update_stats(self) -> None:
        s = self.stats
        s["acceptance"] = s["accepted"] / s["drafted"] if s["drafted"] else 0.0
        # decode tokens (all but the prefill's) per target decode step
        s["tokens_per_target_step"] = (len(self.completions[0].token_ids) - 1) / s["rounds"] if s["rounds"] else 0.0
