"""The generation engine: one batch of rows run in shared forward passes, by one decoding strategy.

`Generation` owns the rows (rows.py: validation, sampling, stops, streaming text, timings) and their
lifecycle: rows given at construction, rows admitted while it runs (continuous batching), cancel, release.
How the logits are computed is its strategy's: `PlainDecoding` (plain.py, one token per row per step) by
default, `SpeculativeDecoding` (speculative.py, a draft's guesses checked by the target) with a draft.
`step()` runs exactly one step and yields its Deltas; between steps a server cancels and admits rows.

    g = Generation(backend, tokenizer, prompts, [params_a, params_b])  # a server's shared batch
    while not g.done:
        for d in g.step(): ...                                         # Delta(row, text, token_ids, finish_reason)
        g.cancel(1); g.admit([prompt_c], params_c)                     # between steps
    g.completions                                                      # list[Completion]

A backend holds one KV cache, so one Generation runs on it at a time. Policy on length: prompt +
max_new_tokens beyond the model's block_size is an error before any work is done (no silent truncation).
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

from ..sampling import SamplingParams
from .plain import PlainDecoding
from .rows import Completion, Delta, GenerationError, Prompt, RowTable, check_context


class Generation:
    """One batch of requests run in shared forward passes; iterate it (or call step()) for per-row Deltas.

    Args:
        backend: any runtime.backends Backend (it is reset: the batch owns its KV cache while running).
        tokenizer: a tiktoken Encoding (runtime.tokenizer.load_tokenizer()); None only with id prompts and
            no stop strings (text stays empty).
        prompts: text, or token ids, per row.
        params: one SamplingParams for all rows, or one per row.
        decoding: the strategy that computes each step (default PlainDecoding(backend)).

    `admit()` adds rows while it runs (continuous batching), when the strategy admits rows: they are
    prefilled beside the running rows between two steps and stream under new row numbers.
    """

    def __init__(self, backend, tokenizer, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams],
                 decoding=None):
        if isinstance(prompts, str) or not len(prompts):
            raise GenerationError("prompts must be a non-empty list of texts or token-id lists")
        self.backend, self.tokenizer = backend, tokenizer
        self.decoding = PlainDecoding(backend) if decoding is None else decoding
        self.table = RowTable(backend.config, tokenizer)
        ids, params = self.table.check(prompts, params)
        # left padding puts every row's cache at the longest prompt's length
        check_context(max(len(p) for p in ids), max(sp.max_new_tokens for sp in params), backend.config.block_size,
                      "batched, the longest prompt", "batch these prompts separately", "the largest max_new_tokens")
        self._joining = self.table.register(ids, params)  # rows waiting for their prefill: all of them at the start
        self._releasing: list[int] | None = None  # during a step: rows released once it is over
        self._started = False

    # the rows, by row number (Delta.row)
    @property
    def completions(self) -> list[Completion]:
        return self.table.completions

    @property
    def prompt_ids(self) -> list[list[int]]:
        return self.table.prompt_ids

    @property
    def params(self) -> list[SamplingParams]:
        return self.table.params

    @property
    def stats(self) -> dict:
        """The strategy's counters (speculative decoding: rounds, drafted, accepted, ...; plain: none)."""
        return self.decoding.stats

    def counters(self) -> dict:
        """Numbers a server adds up over its batches ({} for plain decoding)."""
        return self.decoding.counters()

    @property
    def rows(self) -> int:
        """Rows running or waiting to join (finished ones not counted)."""
        return self.table.running

    @property
    def done(self) -> bool:
        """Whether the run is over: every row has finished and no step is under way (rows admitted during the step
        that finished the last row still run)."""
        return self._started and not self.table.running and self._releasing is None

    def cancel(self, row: int) -> None:
        """Stop `row` at its next token (finish_reason "cancelled"); the other rows go on."""
        self.table.cancelled[row] = True

    def cancelling(self, row: int) -> bool:
        """Whether cancel(row) was called."""
        return self.table.cancelled[row]

    def release(self, row: int) -> None:
        """Forget a finished row: its Completion becomes a stub (finish_reason only) and its prompt, sampler and
        text state go. A server's batch can run for hours while rows join and leave; it calls this once it has
        handed a row's last Delta on, so memory follows the live rows, not every row the batch ever ran. Called
        during a step, it takes effect when the step is over (a strategy may still read the row's timing)."""
        if self.completions[row].finish_reason is None:
            raise GenerationError(f"row {row} is still running; release() takes finished rows")
        if self._releasing is None:
            self.table.release(row)
        else:
            self._releasing.append(row)

    def fits(self, prompt_lengths: Sequence[int], max_new_tokens: Sequence[int]) -> bool:
        """Whether rows of these prompt lengths and max_new_tokens can join now (the strategy admits rows, and
        its cache holds every row's remaining tokens within block_size)."""
        return self.decoding.admits and self.decoding.fits(self.table, self._joining, prompt_lengths, max_new_tokens)

    def admit(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]) -> list[int]:
        """Add rows to this batch while it runs; returns their row numbers (Delta.row, completions[row]). They join
        at the next step, their first tokens streamed at once. Call it between steps, from the thread running
        them. Raises GenerationError for an invalid prompt or when the rows do not fit (`fits`)."""
        if not len(prompts):
            raise GenerationError("admit() needs at least one prompt")
        if self.done:
            raise GenerationError("this batch has finished; start a new Generation for these prompts")
        ids, params = self.table.check(prompts, params)
        if not self.decoding.admits:
            raise GenerationError(f"this batch ({type(self.decoding).__name__} on the {self.backend.name} backend) "
                                  f"cannot add rows while it runs; run these prompts in the next batch")
        if not self.fits([len(p) for p in ids], [sp.max_new_tokens for sp in params]):
            raise GenerationError(f"these prompts do not fit the running batch: its cache, as wide as its longest "
                                  f"row, would exceed block_size {self.backend.config.block_size}; run them in the "
                                  f"next batch")
        rows = self.table.register(ids, params)
        self._joining += rows
        return rows

    def step(self) -> Iterator[Delta]:
        """Run one step (the joining rows' prefill, or one decode step / speculative round) and yield its Deltas;
        the step is over when they are exhausted. Nothing to do once `done`."""
        if not self._started:
            self._started = True
            start = time.perf_counter()
            for b in self._joining:  # the clocks of the rows given at construction start now
                self.table.start[b] = start
        if not self.table.running:
            return
        joining, self._joining, self._releasing = self._joining, [], []
        try:
            yield from self.decoding.step(self.table, joining)
        finally:
            releasing, self._releasing = self._releasing, None
            for row in releasing:
                self.table.release(row)

    def __iter__(self) -> Iterator[Delta]:
        if self._started:
            raise GenerationError("a Generation runs once; make a new one")
        while not self.done:
            yield from self.step()
