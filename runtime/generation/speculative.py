"""Speculative decoding: a cheap draft model guesses K tokens, the target scores all of them in one step.

Decoding one token at a time streams every weight of the target once per token; on a CPU that memory
traffic, not arithmetic, bounds fp32 decode (docs/benchmarks.md). Here a draft (typically the int8 or int4
export of the same checkpoint, 4-8x cheaper per step) proposes K tokens greedily, and the target runs the
pending token plus the K guesses as one (1, K+1) step: the same weight traffic as one decode step, and
K+1 positions of logits (a target exported with `--logits all` or `--logits last:N`, N >= K+1).

The target decides every token. Position by position, the target's own Sampler picks the token from the
target's logits, exactly as plain decoding does: the same greedy argmax, the same repetition
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

    from runtime.generation import SpeculativeGeneration
    g = SpeculativeGeneration(target, tokenizer, ["def main():"], SamplingParams(temperature=0), draft, speculate=4)
    for d in g: print(d.text, end="")
    g.stats  # {"rounds", "plain_rounds", "drafted", "accepted", "acceptance", "tokens_per_target_step"}

A batch decodes speculatively too: every row gets the round's guesses and keeps its own accepted ones. The
KV cache of a backend is one (batch, n_head, length, head_dim) block, so a row that accepted fewer guesses
than another leaves holes there, masked out (cache.py); the concat graph, torch and TensorRT attend
through any mask. A `--kv-cache shared` graph (onnxruntime's GroupQueryAttention) keeps rows left-aligned
and takes no multi-token step after a past at batch > 1 on the CPU: it speculates one prompt at a time
(`batches`).
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from ..backends import capabilities_of
from ..sampling import SamplingParams, sample_next_token
from .cache import Cache, can, worth_dropping
from .depth import Depth
from .engine import Generation
from .rows import Delta, GenerationError, Prompt, RowTable

DEFAULT_SPECULATE = 4  # guesses per round at most: with ~97% per-token agreement, ~4.7 tokens per target step


def check_pair(target, draft, speculate: int) -> None:
    """Raise GenerationError, saying how to fix it, unless `draft` can guess `speculate` tokens for `target`."""
    if not isinstance(speculate, int) or speculate < 1:
        raise GenerationError("speculate must be an integer >= 1 (tokens the draft guesses per round), "
                              f"got {speculate!r}")
    for role, b in (("target", target), ("draft", draft)):
        if not can(b, "rewind"):
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


class SpeculativeDecoding:
    """The decoding strategy of a speculative Generation: `target` checks what `draft` guesses (module docstring).

    A step is the prefill (the first one), then one round: the draft guesses k tokens per row, the target scores
    them in one step, and each row's Deltas are handed out as its tokens are picked (so a cancel() made
    meanwhile ends the row at its next token, as in plain decoding). Rows join only at the start.
    """

    admits = False  # a speculative batch runs the rows it started with

    def __init__(self, target, draft, speculate: int = DEFAULT_SPECULATE, adaptive: bool = True):
        check_pair(target, draft, speculate)
        self.target, self.draft, self.speculate = target, draft, speculate
        self.depth = Depth(speculate, adaptive)
        self.stats = {"rounds": 0, "plain_rounds": 0, "drafted": 0, "accepted": 0, "acceptance": 0.0,
                      "tokens_per_target_step": 0.0}
        self._row_steps = 0  # target steps times the rows live in them
        self._decoded = 0  # tokens the rounds produced (all but each row's first)
        self.tc, self.dc = Cache(target), Cache(draft)
        self.slots: list[int] = []  # the caches' rows, in their order (finished rows leave them: keep_rows)

    def check_batch(self, rows: int) -> None:
        """Raise GenerationError unless the pair can speculate on `rows` prompts together."""
        if rows > 1:
            for role, b in (("target", self.target), ("draft", self.draft)):
                if not batches(b):
                    raise GenerationError(
                        f"the {role} {getattr(b, 'path', '')} has a kv_cache='shared' graph, whose attention "
                        f"(GroupQueryAttention) keeps no holes for the guesses one row rejects and another keeps: "
                        f"it speculates one prompt at a time; run the {rows} prompts one by one, or "
                        f"export the pair with --kv-cache concat to speculate on a batch")

    def fits(self, table: RowTable, joining: list[int], prompt_lengths: Sequence[int],
             max_new_tokens: Sequence[int]) -> bool:
        return False

    def counters(self) -> dict:
        """What a server adds up over its batches."""
        return {"speculative_batches": 1, "guesses_drafted": self.stats["drafted"],
                "guesses_accepted": self.stats["accepted"]}

    def step(self, table: RowTable, joining: list[int]) -> Iterator[Delta]:
        if joining:
            assert not self.slots, "rows join a speculative batch only at its start"
            yield from self._prefill(table, joining)
        else:
            yield from self._round(table)

    def _prefill(self, table: RowTable, rows: list[int]) -> Iterator[Delta]:
        self.slots = list(rows)
        # the draft guesses greedily under each row's repetition penalty: the best guess of the target's pick
        self.guess_params = {b: SamplingParams(temperature=0, repetition_penalty=table.params[b].repetition_penalty)
                             for b in rows}
        t = time.perf_counter()
        full = self.tc.start([table.prompt_ids[b] for b in rows])  # (n, P or fewer, V)
        prefill = time.perf_counter() - t
        for i, b in enumerate(rows):
            if table.wants_prompt_logits(b):
                table.score_prompt(b, full[i])
        logits = full[:, -1]
        deltas = [table.advance(b, logits[i], prefill) for i, b in enumerate(rows)]
        self.t_prev = time.perf_counter()
        self.live = np.array([not d.finish_reason for d in deltas])
        yield from (d for d in deltas if d.text or d.token_ids or d.finish_reason)
        if not self.live.any():
            return
        self.dc.reset(len(rows))
        # the target caches prompt + output but its last token (`pending`); the draft caches + todo: prompt + output
        cs = table.completions
        self.pending = np.array([cs[b].token_ids[-1] if cs[b].token_ids else 0 for b in rows], np.int64)
        # the draft's prefill rides with its first round; a finished row feeds the draft a filler token
        self.todo = [list(table.prompt_ids[b]) + [self.pending[i]] if self.live[i] else [0] for i, b in enumerate(rows)]

    def _round(self, table: RowTable) -> Iterator[Delta]:
        tc, dc, slots, live, todo, pending = self.tc, self.dc, self.slots, self.live, self.todo, self.pending
        cs = table.completions
        n, rows = len(slots), [int(i) for i in np.flatnonzero(live)]  # rows: the live ones, as cache rows
        left = max(table.left(slots[i]) for i in rows)
        # room in the target's block: a round grows it by the most guesses one row keeps, while the slowest
        # row may advance by one token; plain rounds must still fit every row's remaining tokens
        room = tc.block_size - tc.length - (1 if len(rows) == 1 else left)
        width = max(len(t) for t in todo)
        k = self.depth.next(min(self.speculate, left - 1, room, dc.block_size - dc.length - width), width, left)
        started, prefill_draft = time.perf_counter(), k and not dc.length
        guesses = self._guess(table, todo, rows, k)
        scores = tc.step(np.concatenate([pending[:, None], guesses], 1))  # (n, k + 1, V): every guess, one step
        accepted, made, drafted = np.zeros(n, np.int64), np.zeros(n, np.int64), 0
        for i in rows:  # the target's sampler picks each token; a guess counts while it equals the pick
            c, left_i = cs[slots[i]], table.left(slots[i])
            for j in range(k + 1):
                # handed out at once: a cancel() made meanwhile ends the row at its next token, as in plain decoding
                d = table.advance(slots[i], scores[i, j])
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
        now = time.perf_counter()
        for i in rows:  # the round's time, shared by a row's tokens (a stop token produces none)
            if made[i]:
                cs[slots[i]].timing.decode_latencies_s += [(now - self.t_prev) / made[i]] * int(made[i])
        self.t_prev = now
        s = self.stats
        s["rounds"] += 1
        s["plain_rounds"] += k == 0
        s["drafted"] += drafted
        s["accepted"] += int(accepted[rows].sum())
        self._row_steps += len(rows)
        self._decoded += int(made.sum())
        s["acceptance"] = s["accepted"] / s["drafted"] if s["drafted"] else 0.0
        s["tokens_per_target_step"] = self._decoded / self._row_steps
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
        if len(keep) < n and can(self.target, "keep_rows") and can(self.draft, "keep_rows") and \
                worth_dropping(n, len(keep), max(table.left(slots[i]) for i in keep)):  # they leave both caches
            tc.keep_rows(keep)
            dc.keep_rows(keep)
            slots, live, pending, todo = [slots[i] for i in keep], live[keep], pending[keep], [todo[i] for i in keep]
        self.slots, self.live, self.pending, self.todo = slots, live, pending, todo

    def _guess(self, table: RowTable, todo: list[list[int]], rows: list[int], k: int) -> np.ndarray:
        """(n, k) draft guesses for the live cache `rows`: the draft's greedy picks under each row's repetition
        penalty, the best guess of the target's pick. Its first step catches up on each row's `todo`."""
        guesses = np.zeros((len(todo), k), np.int64)
        for j in range(k):
            out = self.dc.step(todo if j == 0 else guesses[:, j - 1:j])[:, -1, :self.target.config.real_vocab_size]
            for i in rows:
                b, seen = self.slots[i], None
                if self.guess_params[b].repetition_penalty != 1.0:
                    seen = np.asarray(table.samplers[b].seen_ids + guesses[i, :j].tolist(), np.int64)
                guesses[i, j] = sample_next_token(out[i], self.guess_params[b], None, seen)
        return guesses


class SpeculativeGeneration(Generation):
    """A Generation on `backend` (the target) decoded by SpeculativeDecoding, `draft` proposing up to `speculate`
    tokens a round; its output is the plain Generation's.

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
        decoding = SpeculativeDecoding(backend, draft, speculate, adaptive)
        super().__init__(backend, tokenizer, prompts, params, decoding)
        decoding.check_batch(len(self.prompt_ids))
