"""Plain decoding: one token per row per step, rows joining and leaving a running batch.

A step is either a prefill of the rows waiting to join (as the batch's first rows, or beside the running
ones with `Backend.add_rows`) or a decode step feeding each row its last token. Before a step, once a
quarter of the batch has finished, the finished rows leave the cache (`Backend.keep_rows`; a backend
without it keeps them riding along with a filler token), and the leading columns no row needs are
trimmed (`Backend.drop_front`), so a batch that rows keep joining stays as wide as its rows need.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np

from .cache import Cache, can, worth_dropping
from .rows import Delta, RowTable, fits_context


class PlainDecoding:
    """The decoding strategy of an ordinary Generation (see the module docstring)."""

    def __init__(self, backend):
        self.backend = backend
        self.cache = Cache(backend)
        self.slots: list[int] = []  # the row held by each cache row, in the cache's order
        self.next_ids = np.zeros((0, 1), np.int64)  # each cache row's next input
        self.stats: dict = {}  # nothing to count beyond the rows' own timings

    def counters(self) -> dict:
        return {}

    @property
    def admits(self) -> bool:
        """Whether rows can join while the batch runs."""
        return can(self.backend, "add_rows")

    def fits(self, table: RowTable, joining: list[int], prompt_lengths: Sequence[int],
             max_new_tokens: Sequence[int]) -> bool:
        """Whether rows of these prompt lengths and max_new_tokens can join now: the cache, as wide as its longest
        row (left padding), must hold every row's remaining tokens within block_size."""
        live = self._live(table)
        if live:  # finished rows leave first (with keep_rows), then the cache is trimmed
            width = self.cache.length - self.cache.lead(live if can(self.backend, "keep_rows") else None)
        return fits_context([width if live else 0, *prompt_lengths, *(len(table.prompt_ids[b]) for b in joining)],
                            [*max_new_tokens, *(table.params[b].max_new_tokens for b in joining),
                             *(table.left(self.slots[i]) for i in live)], self.backend.config.block_size)

    def _live(self, table: RowTable) -> list[int]:
        return [i for i, b in enumerate(self.slots) if table.completions[b].finish_reason is None]

    def step(self, table: RowTable, joining: list[int]) -> Iterator[Delta]:
        """One step: the joining rows' prefill if any, else one decode step of the live rows."""
        cache, keep = self.cache, self._live(table)
        drop = keep and can(self.backend, "keep_rows") and len(keep) < len(self.slots) and (
            joining or worth_dropping(len(self.slots), len(keep), max(table.left(self.slots[i]) for i in keep)))
        if drop:  # finished rows leave the batch: later steps compute the live ones only
            cache.keep_rows(keep)
            self.slots, self.next_ids = [self.slots[i] for i in keep], self.next_ids[keep]
        if drop or keep and joining:  # what only finished rows needed goes before anything joins
            cache.trim()
        if joining:
            yield from self._join(table, joining, bool(keep))
        elif keep:
            logits = cache.step(self.next_ids)[:, -1, :]  # (B, V)
            yield from self._emit(table, [table.advance(b, logits[i]) for i, b in enumerate(self.slots)
                                          if table.completions[b].finish_reason is None])

    def _join(self, table: RowTable, rows: list[int], running: bool) -> Iterator[Delta]:
        """Prefill the joining rows and sample their first tokens."""
        prompts = [table.prompt_ids[b] for b in rows]
        t = time.perf_counter()
        if running:
            full = self.cache.add(prompts)
        else:
            self.slots, self.next_ids = [], np.zeros((0, 1), np.int64)
            full = self.cache.start(prompts)  # (n, P, V); a logits="last" graph returns (n, 1, V)
        prefill = time.perf_counter() - t
        for j, b in enumerate(rows):
            if table.wants_prompt_logits(b):
                table.score_prompt(b, full[j])
        logits = full[:, -1, :]  # (n, V)
        self.slots = self.slots + rows
        self.next_ids = np.concatenate([self.next_ids, np.zeros((len(rows), 1), np.int64)])
        yield from self._emit(table, [table.advance(b, logits[j], prefill) for j, b in enumerate(rows)])

    def _emit(self, table: RowTable, deltas: list[Delta]) -> Iterator[Delta]:
        """Record each row's new token (next input, latency since its previous one) and hand the Deltas out."""
        now = time.perf_counter()
        slot = {b: i for i, b in enumerate(self.slots)}
        for d in deltas:
            if d.token_ids:
                self.next_ids[slot[d.row], 0] = d.token_ids[-1]
                if table.last[d.row] is not None:  # forward + sampling (+ the consumer's time) since its previous token
                    table.completions[d.row].timing.decode_latencies_s.append(now - table.last[d.row])
                table.last[d.row] = now
        for d in deltas:
            if d.text or d.token_ids or d.finish_reason:
                yield d
