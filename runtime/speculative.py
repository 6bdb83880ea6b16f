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

A batch decodes speculatively too: every row gets the round's guesses and keeps its own accepted ones. The
KV cache of a backend is one (batch, n_head, length, head_dim) block, so a row that accepted fewer guesses
than another leaves holes there, masked out (`_Cache`); the concat graph, torch and TensorRT attend
through any mask. A `--kv-cache shared` graph (onnxruntime's GroupQueryAttention) keeps rows left-aligned
and takes no multi-token step after a past at batch > 1 on the CPU: it speculates one prompt at a time
(`batches`).
"""
from __future__ import annotations

import time
from typing import Iterator, Sequence

import numpy as np

from .backends import capabilities_of
from .generate import Delta, Generation, GenerationError, Prompt
from .sampling import SamplingParams, sample_next_token

DEFAULT_SPECULATE = 4  # guesses per round at most: with ~97% per-token agreement, ~4.7 tokens per target step


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
        if not capabilities_of(b).rewind:
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


def batches(backend) -> bool:
    """Whether `backend` can be a target or draft for a batch of prompts: its attention takes a mask with holes
    (a kv_cache="shared" graph's GroupQueryAttention does not)."""
    return not capabilities_of(backend).ragged_cache


def draft_for(target, draft, rows: int):
    """`draft` when it and `target` can speculate on `rows` prompts together, else None (plain generation, the
    same output): a server's or benchmark's batch on a kv_cache="shared" pair runs on the target alone."""
    return draft if draft is not None and (rows == 1 or (batches(target) and batches(draft))) else None


class _Cache:
    """One backend's KV cache as the speculative loop keeps it, for any number of rows.

    Rows advance by different numbers of tokens (each keeps its own accepted guesses), but the cache is one
    (B, n_head, length, head_dim) block: a row's positions that it took back while a longer row kept its own
    become holes, zeros of the mask. So do the left padding of a step whose rows bring unequal numbers of
    tokens. Position ids count a row's real tokens only, so holes never shift a row. At batch 1 there are
    no holes: taking back is `Backend.rewind`.
    """

    def __init__(self, backend, batch: int):
        self.backend = backend
        self.mask = np.ones((batch, backend.config.block_size), np.int64)
        self.length = 0  # positions in the block, holes included
        self.real = np.zeros(batch, np.int64)  # real tokens per row: its next position id
        backend.reset(batch)

    def step(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Append each row's tokens (a shorter row padded on the left by holes); the backend's logits."""
        B, W, P = len(rows), max(len(r) for r in rows), self.length
        ids, pos = np.zeros((B, W), np.int64), np.zeros((B, W), np.int64)
        for b, r in enumerate(rows):
            n = len(r)
            ids[b, W - n:] = r
            pos[b, W - n:] = np.arange(self.real[b], self.real[b] + n)
            self.mask[b, P:P + W - n] = 0
            self.mask[b, P + W - n:P + W] = 1
        self.real += [len(r) for r in rows]
        logits = self.backend.forward(ids, self.mask[:, :P + W], pos)
        self.length += W
        return logits

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (Backend.keep_rows), with their masks and lengths."""
        self.backend.keep_rows(rows)
        self.mask, self.real = self.mask[rows], self.real[rows]

    def take_back(self, n: np.ndarray, live: np.ndarray) -> None:
        """Live row b takes back its newest n[b] positions (guesses it did not keep): holes where another live
        row keeps more; what no live row keeps leaves the cache. Finished rows follow the live ones."""
        drop = int(n[live].min())
        end = self.length - drop
        for b in np.flatnonzero(live & (n > drop)):
            self.mask[b, self.length - n[b]:end] = 0
        self.real -= np.where(live, n, drop)
        if drop:
            self.backend.rewind(end)
        self.length = end


class SpeculativeGeneration(Generation):
    """Generation on `backend` (the target), with `draft` proposing up to `speculate` tokens a round.

    Args:
        backend: the target Backend; its logits must cover speculate + 1 positions per step
            (exported with `--logits all` or `--logits last:N`, N >= speculate + 1).
        tokenizer, prompts, params: as Generation. Several prompts need backends that `batches` (not a
            `--kv-cache shared` graph).
        draft: a Backend over the same vocabulary (its own KV cache; reset here).
        speculate: tokens the draft guesses per round at most (>= 1).
        adaptive: choose each round's number of guesses, 0..speculate, from the measured acceptance and
            step costs (Depth); False always guesses `speculate` (the output is the same either way).
    """

    def __init__(self, backend, tokenizer, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams],
                 draft, speculate: int = DEFAULT_SPECULATE, adaptive: bool = True):
        super().__init__(backend, tokenizer, prompts, params)
        check_pair(backend, draft, speculate)
        if len(self.prompt_ids) > 1:
            for role, b in (("target", backend), ("draft", draft)):
                if not batches(b):
                    raise GenerationError(
                        f"the {role} {getattr(b, 'path', '')} has a kv_cache='shared' graph, whose attention "
                        f"(GroupQueryAttention) keeps no holes for the guesses one row rejects and another keeps: "
                        f"it speculates one prompt at a time; run the {len(self.prompt_ids)} prompts one by one, or "
                        f"export the pair with --kv-cache concat to speculate on a batch")
        self.draft, self.speculate = draft, speculate
        self.depth = Depth(speculate, adaptive)
        self.stats = {"rounds": 0, "plain_rounds": 0, "drafted": 0, "accepted": 0, "acceptance": 0.0,
                      "tokens_per_target_step": 0.0}
        self._row_steps = 0  # target steps times the rows live in them
        # the draft guesses greedily under each row's repetition penalty: the best guess of the target's pick
        self._guess_params = [SamplingParams(temperature=0, repetition_penalty=sp.repetition_penalty)
                              for sp in self.params]

    def fits(self, prompt_lengths: Sequence[int], max_new_tokens: Sequence[int]) -> bool:
        return False  # a speculative batch runs the rows it started with

    def admit(self, prompts: Sequence[Prompt], params) -> list[int]:
        raise GenerationError("a speculative batch takes no rows while it runs; run these prompts in the next batch")

    def __iter__(self) -> Iterator[Delta]:
        if self._started:
            raise GenerationError("a Generation runs once; make a new one")
        self._started = True
        target, draft, K, B = self.backend, self.draft, self.speculate, len(self.prompt_ids)
        cs = self.completions
        # the caches' rows, in their order (finished rows leave them: keep_rows); the arrays below follow it
        slots = list(range(B))
        can_drop = all(capabilities_of(b).keep_rows for b in (target, draft))

        t0 = time.perf_counter()
        tc = _Cache(target, B)
        logits = tc.step(self.prompt_ids)[:, -1]
        prefill = time.perf_counter() - t0
        deltas = [self._advance(b, logits[b], 0, t0, prefill) for b in range(B)]
        t_prev = time.perf_counter() - t0
        live = np.array([not d.finish_reason for d in deltas])
        yield from (d for d in deltas if d.text or d.token_ids or d.finish_reason)
        if not live.any():
            return
        dc = _Cache(draft, B)
        # the target caches prompt + output but its last token (`pending`); the draft caches + todo: prompt + output
        pending = np.array([c.token_ids[-1] if c.token_ids else 0 for c in cs], np.int64)
        # the draft's prefill rides with its first round; a finished row feeds the draft a filler token
        todo = [list(p) + [pending[b]] if live[b] else [0] for b, p in enumerate(self.prompt_ids)]
        while True:
            n, rows = len(slots), [int(i) for i in np.flatnonzero(live)]  # rows: the live ones, as cache rows
            left = max(self.params[slots[i]].max_new_tokens - len(cs[slots[i]].token_ids) for i in rows)
            # room in the target's block: a round grows it by the most guesses one row keeps, while the slowest
            # row may advance by one token; plain rounds must still fit every row's remaining tokens
            room = target.config.block_size - tc.length - (1 if len(rows) == 1 else left)
            width = max(len(t) for t in todo)
            k = self.depth.next(min(K, left - 1, room, draft.config.block_size - dc.length - width), width, left)
            started, prefill_draft = time.perf_counter(), k and not dc.length
            guesses = self._guess(dc, todo, slots, rows, k)
            scores = tc.step(np.concatenate([pending[:, None], guesses], 1))  # (n, k + 1, V): every guess, one step
            accepted, made, drafted = np.zeros(n, np.int64), np.zeros(n, np.int64), 0
            for i in rows:  # the target's sampler picks each token; a guess counts while it equals the pick
                c = cs[slots[i]]
                left_i = self.params[slots[i]].max_new_tokens - len(c.token_ids)
                for j in range(k + 1):
                    # handed out at once: a cancel() made meanwhile ends the row at its next token, as in plain decoding
                    d = self._advance(slots[i], scores[i, j], len(c.token_ids), t0, prefill)
                    if d.text or d.token_ids or d.finish_reason:
                        yield d
                    made[i] += len(d.token_ids)
                    # a stop token id ends the row unemitted (c.stop holds it): guessing it was a hit too
                    picked = d.token_ids or ([c.stop] if d.finish_reason == "stop" and isinstance(c.stop, int) else [])
                    hit = j < k and picked == [guesses[i, j]]
                    accepted[i] += hit
                    if d.finish_reason:
                        live[i] = False
                    if d.finish_reason or not hit:
                        break
                # drafted: the row's guesses, but none past its end (its last token, a stop, a cancel), which
                # nothing checked (k follows the row with the most tokens left); guesses after a miss count
                drafted += min(k, j + 1) if not live[i] else min(k, left_i)
            seconds = None if prefill_draft else time.perf_counter() - started
            now = time.perf_counter() - t0
            for i in rows:  # the round's time, shared by a row's tokens (a stop token produces none)
                if made[i]:
                    cs[slots[i]].timing.decode_latencies_s += [(now - t_prev) / made[i]] * int(made[i])
            t_prev = now
            s = self.stats
            s["rounds"] += 1
            s["plain_rounds"] += k == 0
            s["drafted"] += drafted
            s["accepted"] += int(accepted[rows].sum())
            self._row_steps += len(rows)
            self._update_stats()
            if not live.any():
                return
            self.depth.update(k, accepted[live].tolist(), seconds)
            # a row keeps pending + its accepted guesses; the target's own pick (a correction or a bonus) is pending
            tc.take_back(k - accepted, live)
            pending = np.array([cs[b].token_ids[-1] if live[i] else 0 for i, b in enumerate(slots)], np.int64)
            if k:  # the draft cached todo + guesses[:k-1]: a row keeps its accepted ones
                dc.take_back(k - 1 - np.minimum(accepted, k - 1), live)
                todo = [[guesses[i, k - 1]] if accepted[i] == k else [] for i in range(n)]
            todo = [t + [pending[i]] if live[i] else [0] for i, t in enumerate(todo)]
            keep = [int(i) for i in np.flatnonzero(live)]
            if can_drop and len(keep) < n and self._worth_dropping(slots, keep):  # finished rows leave both caches
                tc.keep_rows(keep)
                dc.keep_rows(keep)
                slots, live, pending, todo = [slots[i] for i in keep], live[keep], pending[keep], [todo[i] for i in keep]

    def _guess(self, dc: _Cache, todo: list[list[int]], slots: list[int], rows: list[int], k: int) -> np.ndarray:
        """(n, k) draft guesses for the live cache `rows` (slots: each cache row's prompt row): the draft's greedy
        picks under each row's repetition penalty, the best guess of the target's pick. Its first step catches
        up on each row's `todo`."""
        guesses = np.zeros((len(todo), k), np.int64)
        for j in range(k):
            out = dc.step(todo if j == 0 else guesses[:, j - 1:j])[:, -1, :self.real_vocab_size]
            for i in rows:
                b, seen = slots[i], None
                if self._guess_params[b].repetition_penalty != 1.0:
                    seen = np.asarray(self._samplers[b].seen_ids + guesses[i, :j].tolist(), np.int64)
                guesses[i, j] = sample_next_token(out[i], self._guess_params[b], None, seen)
        return guesses

    def _update_stats(self) -> None:
        s = self.stats
        s["acceptance"] = s["accepted"] / s["drafted"] if s["drafted"] else 0.0
        # decode tokens (all but each row's first) per target step of a row
        decoded = sum(max(len(c.token_ids) - 1, 0) for c in self.completions)
        s["tokens_per_target_step"] = decoded / self._row_steps if self._row_steps else 0.0
