"""One backend's KV cache as generation keeps it: which rows it holds, their mask and their positions.

Both decoding strategies (plain.py, speculative.py) drive a backend through this one class. Rows are
left-padded: a prefill of prompts of different lengths, rows joining a running batch (`Backend.add_rows`),
and a step whose rows bring unequal numbers of tokens all put masked columns on the left of the shorter
rows. A row that takes back tokens another row keeps (speculative decoding) leaves holes, also masked.
Position ids count a row's real tokens only (`cumsum(mask) - 1`), so padding and holes never shift a row.
The mask is allocated block_size wide and sliced per step.

Optional backend abilities (keep_rows, drop_front, add_rows, rewind) are probed in one place, `can`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..backends import capabilities_of

DROP_AFTER = 8  # finished rows leave a batch when the live ones have this many steps or more to go
TRIM_AT_LEAST = 8  # leading cache columns no row needs (left padding of rows that left) go in runs this long


def can(backend, ability: str) -> bool:
    """Whether `backend` declares the ability ("keep_rows", "drop_front", "add_rows", "rewind"): its Capabilities."""
    return getattr(capabilities_of(backend), ability)


def worth_dropping(batch: int, live: int, left: int) -> bool:
    """Whether finished rows should leave a cache of `batch` rows with `live` still running, `left` steps to go at
    most: once a quarter of the batch has finished and DROP_AFTER steps or more remain (a drop copies the kept
    rows' cache once)."""
    return 4 * (batch - live) >= batch and left >= DROP_AFTER


def left_pad(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token lists -> (n, P) ids, mask and positions, each row aligned to the right (0 fills the padding)."""
    P = max(len(r) for r in rows)
    ids, mask = np.zeros((len(rows), P), np.int64), np.zeros((len(rows), P), np.int64)
    for j, r in enumerate(rows):
        ids[j, P - len(r):] = r
        mask[j, P - len(r):] = 1
    return ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0)


class Cache:
    """The rows of one backend's KV cache: mask (B, block_size) with `length` columns in use, and each row's
    next position id (`real`: its real tokens so far)."""

    def __init__(self, backend):
        self.backend = backend
        self.block_size = backend.config.block_size
        self.mask = np.zeros((0, self.block_size), np.int64)
        self.length = 0  # columns in the cache, padding and holes included
        self.real = np.zeros(0, np.int64)

    @property
    def batch(self) -> int:
        return len(self.real)

    def reset(self, batch: int) -> None:
        """Empty the cache, for `batch` rows."""
        self.backend.reset(batch)
        self.mask = np.zeros((batch, self.block_size), np.int64)
        self.length, self.real = 0, np.zeros(batch, np.int64)

    def start(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Reset the backend to len(prompts) rows and prefill them; the backend's logits."""
        self.reset(len(prompts))
        return self.step(prompts)

    def step(self, rows: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Append each row's tokens (a shorter row padded on the left by masked columns); the backend's logits."""
        P = self.length
        if isinstance(rows, np.ndarray):  # (B, W): every row brings W tokens
            ids, (B, W) = rows.astype(np.int64, copy=False), rows.shape
            pos = self.real[:, None] + np.arange(W)
            self.mask[:, P:P + W] = 1
            real = self.real + W
        else:
            B, W = len(rows), max(len(r) for r in rows)
            ids, pos = np.zeros((B, W), np.int64), np.zeros((B, W), np.int64)
            for b, r in enumerate(rows):
                n = len(r)
                ids[b, W - n:] = r
                pos[b, W - n:] = np.arange(self.real[b], self.real[b] + n)
                self.mask[b, P:P + W - n] = 0
                self.mask[b, P + W - n:P + W] = 1
            real = self.real + [len(r) for r in rows]
        # the columns past `length` are scratch until the forward succeeds: a failed step (bad ids, an out-of-memory)
        # leaves the cache as it was, so the caller can drop the request and go on with the others
        logits = self.backend.forward(ids, self.mask[:, :P + W], pos)
        self.length, self.real = P + W, real
        return logits

    def add(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Prefill rows beside the cached ones (Backend.add_rows); their logits. The cache becomes as wide as its
        longest row: the running rows gain masked columns on the left, the new ones left padding."""
        ids, mask, pos = left_pad(prompts)
        logits = self.backend.add_rows(ids, mask, pos)
        B, (n, P), L = self.batch, ids.shape, self.length
        W = max(L, P)
        full = np.zeros((B + n, self.block_size), np.int64)
        full[:B, W - L:W] = self.mask[:, :L]
        full[B:, W - P:W] = mask
        self.mask, self.length, self.real = full, W, np.concatenate([self.real, mask.sum(axis=1)])
        return logits

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows (Backend.keep_rows), with their masks and positions."""
        self.backend.keep_rows(rows)
        self.mask, self.real = self.mask[rows], self.real[rows]

    def lead(self, rows: list[int] | None = None) -> int:
        """Leading columns that none of these rows (default: all) needs, when drop_front would remove them
        (TRIM_AT_LEAST or more); else 0."""
        rows = list(range(self.batch)) if rows is None else rows
        if not self.length or not rows or not can(self.backend, "drop_front"):
            return 0
        lead = int(np.argmax(self.mask[rows, :self.length].any(axis=0)))
        return lead if lead >= TRIM_AT_LEAST else 0

    def trim(self) -> None:
        """Drop the leading columns no row needs (the left padding of rows that left): a cache that rows keep
        joining stays as wide as its rows need, not as long as it has run."""
        lead, L = self.lead(), self.length
        if lead:
            self.backend.drop_front(lead)
            self.mask[:, :L - lead] = self.mask[:, lead:L]
            self.mask[:, L - lead:L] = 0
            self.length -= lead

    def take_back(self, n: np.ndarray, live: np.ndarray) -> None:
        """Live row b takes back its newest n[b] positions (tokens it did not keep): holes where another live row
        keeps more; what no live row keeps leaves the cache (Backend.rewind). Finished rows follow the live ones."""
        drop = int(n[live].min())
        end = self.length - drop
        for b in np.flatnonzero(live & (n > drop)):
            self.mask[b, self.length - n[b]:end] = 0
        self.real -= np.where(live, n, drop)
        if drop:
            self.backend.rewind(end)
        self.length = end
