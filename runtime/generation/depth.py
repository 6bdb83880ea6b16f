"""How many tokens a speculative round guesses: the k with the most expected tokens per second (`Depth`).

Used by runtime/generation/speculative.py; it sees only acceptance counts and round times, no backend.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Depth:
    """How many tokens the draft guesses next round: the k in 0..cap with the most expected tokens per second.

    A round of k guesses yields 1 + p1 + p1 p2 + ... + p1...pk tokens per row on average, where p_i is the
    chance that guess i is accepted once guesses 1..i-1 were. The p_i are counted per position, since
    agreement comes in runs (a predictable stretch accepts guess 4 more often than guess 1) and one rate
    for all positions would under-guess. A round's cost is measured whole, per k: the draft's steps with
    their catch-up on the previous round's tokens, the target step (one weight read at batch 1 whatever k
    is; at batch 8 on a CPU each guess checked costs arithmetic), and the sampling; a k not measured yet
    is interpolated. Costs and p_i are decayed averages over the generation so far; the first round is a
    plain step (the cost to beat), the next one guesses the most. So a draft that rarely agrees (sampling
    at a high temperature, a poor draft) or costs too much drops to k = 0, plain decoding, instead of
    making generation slower. After PROBE_EVERY plain rounds one guess is tried again, in case agreement
    came back; each probe that changes nothing doubles the wait for the next (a probe costs a round plus
    the draft's catch-up on every token it skipped).
    """
    DECAY = 0.9  # weight of the past in the running averages, per round (about the last 10 rounds count)
    PROBE_EVERY = 16
    # guessing must beat plain rounds by this factor: the estimate is per row, but a batch's rows drift apart
    # when they accept different numbers of guesses and the batch runs until its slowest row is done (124M,
    # batch 8, an int4 draft that the estimate put level with plain rounds: 195 tok/s against 256 plain)
    HURDLE = 1.1
    # a probe's catch-up (the draft prefilling every token of the plain rounds before it) must be won back over
    # the tokens left: it costs about as much as the target's own prefill of them (124M at batch 8, an int4
    # draft: 304 ms for 64 tokens a row, ten target steps), so a probe needs twice its catch-up still to go
    PROBE_PAYBACK = 2

    def __init__(self, max_k: int, adaptive: bool = True):
        self.max_k, self.adaptive = max_k, adaptive
        self.hits = np.zeros(max(max_k, 1))  # decayed counts per guess position: accepted,
        self.tries = np.zeros(max(max_k, 1))  # and checked (every guess up to the first miss)
        self.t_round = np.full(max_k + 1, np.nan)  # seconds per round, per k (NaN: not measured)
        self.plain = 0  # consecutive rounds at k = 0
        self.probe_every = self.PROBE_EVERY

    def acceptance(self) -> np.ndarray:
        """p_i per guess position, each smoothed by one pseudo-check at the previous position's rate (1/2 before
        the first): with no evidence a position is as good as the one before it."""
        p, prior = np.empty_like(self.hits), 0.5
        for i in range(p.size):
            p[i] = prior = (self.hits[i] + prior) / (self.tries[i] + 1)
        return np.minimum(p, 0.999)

    def next(self, cap: int, catch_up: int = 0, left: int | None = None) -> int:
        """The next round's number of guesses, at most `cap`. catch_up: tokens the draft must take in before it
        guesses again (each row's plain-round tokens); left: tokens the longest row still needs. A probe
        is skipped when fewer than PROBE_PAYBACK * catch_up tokens are left to win its catch-up back."""
        cap = min(cap, self.max_k)
        if not self.adaptive or cap <= 0:
            return max(cap, 0)
        measured = np.flatnonzero(~np.isnan(self.t_round))
        if not measured.size:  # first a plain round: the cost to beat
            return 0
        tokens = np.concatenate([[1.0], 1 + np.cumsum(np.cumprod(self.acceptance()))])  # expected, k = 0..max_k
        if measured.max() == 0:  # then the deepest, to measure it, unless guessing cannot pay even if free
            if self.tries.sum() == 0 or tokens[1:cap + 1].max() > self.HURDLE:
                return cap
            rate = np.zeros(cap + 1)  # a round of guesses costs at least a plain round: stay plain
        else:
            # a k not measured yet: interpolated between the measured ones, flat beyond them
            t_round = np.interp(np.arange(self.max_k + 1), measured, self.t_round[measured])
            rate = tokens[:cap + 1] / t_round[:cap + 1]
            rate[1:] /= self.HURDLE
        k = int(np.argmax(rate))
        if k:
            self.plain, self.probe_every = 0, self.PROBE_EVERY
        else:
            self.plain += 1
            if self.plain >= self.probe_every and (left is None or left >= self.PROBE_PAYBACK * catch_up):
                self.plain, self.probe_every, k = 0, 2 * self.probe_every, 1
        return k

    def update(self, k: int, accepted: Sequence[int], seconds: float | None) -> None:
        """After a round of k guesses: how many each row accepted (rows a stop cut short left out), and the
        round's seconds (None for a round that is no sample of its k's cost: the one the draft prefills in)."""
        d = self.DECAY
        if seconds is not None:
            last = self.t_round[k]
            self.t_round[k] = seconds if np.isnan(last) else d * last + (1 - d) * seconds
        if k and len(accepted):
            self.hits *= d
            self.tries *= d
            for a in accepted:  # each row's guesses 1..a, and its first miss
                self.tries[:min(a + 1, k)] += 1
                self.hits[:a] += 1
