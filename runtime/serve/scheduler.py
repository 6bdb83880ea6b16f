"""The server's scheduler: one worker thread owns the one model instance and runs batches of requests.

Backends are not thread-safe and hold one KV cache, so exactly one thread ever calls them. Requests
(`Job`s, one or more prompts each) wait in a bounded FIFO queue; the worker takes the oldest, then
keeps taking jobs for up to `batch_window_s` (or until `max_batch` rows) and runs them all as one
`Generation` (runtime/generation, which decodes speculatively when given a draft): shared forward passes,
each row with its own SamplingParams. Between two steps (`Generation.step()`) the worker cancels the rows
of cancelled jobs and admits queued jobs into the running batch (continuous batching, `Generation.admit`),
in FIFO order, while it has fewer than `max_batch` live rows and `Generation.fits` them; otherwise they
wait for the next one. A full queue refuses at once (`Overloaded`), so nothing hangs.
A job cancelled by its client (disconnect, timeout) is dropped from the queue or, when running, has its
rows cancelled at the next step; the other rows of the batch go on.

The event loop talks to the worker only through `submit()` and `Job.cancel()`; the worker answers by
posting events onto each job's asyncio queue with `loop.call_soon_threadsafe`:
`("delta", j, Delta)` for the job's j-th prompt, or `("error", message)` when the batch failed.

    scheduler = Scheduler(backend, tokenizer, max_batch=16, max_queue=64, batch_window_s=0.01).start()
    job = scheduler.submit([[1, 2, 3]], [SamplingParams(temperature=0)])   # inside the event loop
    kind, j, delta = await job.events.get()
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence

from ..generation import Generation, GenerationError, SamplingParams, fits_context, make_generation

log = logging.getLogger("nanogpt_deploy.scheduler")


class Overloaded(RuntimeError):
    """The queue is full (or the scheduler is closing): answer 429 now rather than wait."""


class WorkerDead(RuntimeError):
    """The worker thread has stopped (it never should): nothing would run a queued job, answer 503 now."""


class Job:
    """One request's prompts, their params, and the queue its events arrive on (created in the event loop)."""

    def __init__(self, prompt_ids: Sequence[list[int]], params: Sequence[SamplingParams]):
        assert len(prompt_ids) == len(params) > 0
        self.prompt_ids, self.params = list(prompt_ids), list(params)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled: str | None = None  # why: "disconnected" | "timeout" | ...; read by the worker
        self.finished = False  # every row's last delta was received (set by the consumer)
        self.record = None  # the server's logs.RequestRecord of this request (tokens, time to first token)

    @property
    def longest(self) -> int:
        return max(len(p) for p in self.prompt_ids)

    @property
    def steps(self) -> int:
        return max(sp.max_new_tokens for sp in self.params)

    def cancel(self, reason: str) -> None:
        """Stop this job's rows at the next step (or drop it from the queue); no-op once finished."""
        if not self.finished and self.cancelled is None:
            self.cancelled = reason

    def post(self, event: tuple) -> None:
        """Called by the worker thread: hand `event` to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass


class Scheduler:
    """A bounded queue of Jobs and the one thread that runs them in batches (see the module docstring)."""

    def __init__(self, backend, tokenizer, max_batch: int = 16, max_queue: int = 64, batch_window_s: float = 0.01,
                 draft=None, speculate: int | None = None, continuous: bool = True, on_step=None):
        if max_batch < 1 or max_queue < 1 or not 0 <= batch_window_s < math.inf:  # inf killed the worker
            raise ValueError(f"max_batch ({max_batch}) and max_queue ({max_queue}) must be >= 1 and "
                             f"batch_window_s ({batch_window_s}) finite and >= 0")
        self.backend, self.tokenizer = backend, tokenizer
        self.draft, self.speculate = draft, speculate  # handed to make_generation for every batch
        self.max_batch, self.max_queue, self.batch_window_s = max_batch, max_queue, batch_window_s
        self.continuous = continuous  # False: jobs never join a running batch (static batching)
        self.on_step = on_step  # called by the worker with each step's row count (the metrics' batch size)
        self.block_size = backend.config.block_size
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.running_rows = 0
        self._running: list[Job] = []
        # written under self._cond (submit) or by the worker thread only; read by /health
        self.stats = {"jobs_submitted": 0, "jobs_rejected": 0, "jobs_dropped_while_queued": 0, "batches": 0,
                      "rows": 0, "rows_admitted_running": 0, "largest_batch": 0, "rows_cancelled": 0,
                      "tokens_generated": 0, "batch_errors": 0,
                      "speculative_batches": 0, "guesses_drafted": 0, "guesses_accepted": 0}

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._work, name="nanogpt-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, cancel every queued and running one, and wait for the worker to stop."""
        with self._cond:
            self._closed = True
            for job in [*self._queue, *self._running]:
                job.cancel("shutdown")
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """The worker thread is running (False before start(), after close(), or if it died)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, prompt_ids: Sequence[list[int]], params: Sequence[SamplingParams]) -> Job:
        """Queue one request (call from the event loop); raises Overloaded when the queue is full."""
        if len(prompt_ids) > self.max_batch:
            raise ValueError(f"{len(prompt_ids)} prompts in one request, but a batch holds at most {self.max_batch}")
        job = Job(prompt_ids, params)
        with self._cond:
            if self._closed:
                raise Overloaded("the server is shutting down")
            if not self.alive:
                raise WorkerDead("the scheduler's worker thread has stopped, so no request can run; restart the "
                                 "server (its log holds the worker's traceback)")
            if len(self._queue) >= self.max_queue:  # make room first from jobs whose clients have gone
                self._queue = deque(j for j in self._queue if not j.cancelled)
            if len(self._queue) >= self.max_queue:
                self.stats["jobs_rejected"] += 1
                raise Overloaded(f"server busy: {self.running_rows} rows generating and {len(self._queue)} requests "
                                 f"queued (--max-queue {self.max_queue}); retry later, or start the server with a "
                                 f"larger --max-queue / --max-batch")
            self._queue.append(job)
            self.stats["jobs_submitted"] += 1
            self._cond.notify()
        return job

    # ---- the worker thread ----

    def _work(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._run(batch)
        except BaseException:  # noqa: BLE001 - _run keeps batch errors to their jobs: this is a bug; /health turns 503
            log.exception("the scheduler's worker thread died")

    def _pop_live(self) -> Job | None:
        """The oldest queued job whose client is still waiting (cancelled ones are dropped on the way)."""
        while self._queue and self._queue[0].cancelled:
            self._queue.popleft()
            self.stats["jobs_dropped_while_queued"] += 1
        return self._queue[0] if self._queue else None

    def _next_batch(self) -> list[Job] | None:
        """Block for the oldest job, then gather more for up to the batching window; None once closed."""
        with self._cond:
            while (first := self._pop_live()) is None:
                if self._closed:
                    return None
                self._cond.wait()
            self._queue.popleft()
            batch, rows = [first], len(first.prompt_ids)
            longest, steps = first.longest, first.steps
            deadline = time.monotonic() + self.batch_window_s
            while rows < self.max_batch and not self._closed:
                job = self._pop_live()
                if job is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    continue
                # left padding puts every row at the longest prompt: the batch must fit the context
                if rows + len(job.prompt_ids) > self.max_batch or \
                        not fits_context([longest, job.longest], [steps, job.steps], self.block_size):
                    break  # FIFO: it leads the next batch
                self._queue.popleft()
                batch.append(job)
                rows += len(job.prompt_ids)
                longest, steps = max(longest, job.longest), max(steps, job.steps)
            return batch

    def _run(self, batch: list[Job]) -> None:
        rows = [(job, j) for job in batch for j in range(len(job.prompt_ids))]
        owners = dict(enumerate(rows))  # live row -> (job, its prompt index); finished rows leave it
        self.running_rows, self._running = len(owners), batch
        self.stats["batches"] += 1
        self.stats["rows"] += len(owners)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(owners))
        gen = None
        try:
            # strict=False: a draft that cannot speculate on this batch (a kv_cache="shared" pair) is left out
            gen = make_generation(self.backend, self.tokenizer, [job.prompt_ids[j] for job, j in rows],
                                  [job.params[j] for job, j in rows], self.draft, self.speculate, strict=False)
            while not gen.done:
                if self.on_step is not None:
                    self.on_step(len(owners))
                for delta in gen.step():
                    job, j = owners[delta.row]
                    job.post(("delta", j, delta))
                    self.stats["tokens_generated"] += len(delta.token_ids)
                    if delta.finish_reason:  # a batch holds its live rows only
                        del owners[delta.row]
                        self.running_rows -= 1
                        gen.release(delta.row)
                        if all(o is not job for o, _ in owners.values()):
                            batch.remove(job)
                self._cancel_rows(gen, owners)
                if self._queue and self.continuous and not gen.done:
                    self._admit(gen, owners, batch)
        except Exception as e:  # noqa: BLE001 - a failed batch must not kill the worker; every job hears why
            log.exception("batch of %d rows failed", len(owners))
            self.stats["batch_errors"] += 1
            for job in batch:
                job.post(("error", f"generation failed: {type(e).__name__}: {e}"))
        finally:
            self.running_rows, self._running = 0, []
            for key, n in (gen.counters() if gen is not None else {}).items():  # e.g. speculative decoding's
                self.stats[key] += n

    def _admit(self, gen: Generation, owners: dict, batch: list[Job]) -> None:
        """Queued jobs join the running batch, oldest first, while it has rows free and its cache fits them."""
        with self._cond:
            while (job := self._pop_live()) is not None and not self._closed:
                if gen.rows + len(job.prompt_ids) > self.max_batch or not gen.fits(
                        [len(p) for p in job.prompt_ids], [sp.max_new_tokens for sp in job.params]):
                    return  # FIFO: it leads the next batch, or joins this one when rows free up
                self._queue.popleft()
                try:
                    rows = gen.admit(job.prompt_ids, job.params)
                except GenerationError as e:  # its own fault (the server validates first): the others go on
                    job.post(("error", f"generation failed: {e}"))
                    continue
                owners.update((r, (job, j)) for j, r in enumerate(rows))
                batch.append(job)
                self.running_rows += len(rows)
                self.stats["rows"] += len(rows)
                self.stats["rows_admitted_running"] += len(rows)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], gen.rows)

    def _cancel_rows(self, gen: Generation, owners: dict) -> None:
        for r, (job, _) in owners.items():
            if job.cancelled and not gen.cancelling(r):
                gen.cancel(r)  # takes effect at the next step: the row ends with finish_reason "cancelled"
                self.stats["rows_cancelled"] += 1
