"""Dynamic batching: concurrent calls for the same model gathered into one forward pass.

A :class:`Batcher` owns the model worker threads (one per configured worker). Calls are submitted as
:class:`Job` objects; a free worker takes the oldest queued job and, when its ``key`` is not ``None``,
every later queued job with the same key, up to ``max_rows`` rows in all, waiting at most ``max_delay_s``
after the oldest job arrived for more to come (``max_delay_s = 0``: only what is already queued, which
under load is plenty: jobs pile up while the workers are busy). It then calls the batch function once
with the gathered jobs and hands each caller its own result or its own exception.

The pattern is the dynamic batcher of Triton and TorchServe (a queue that gathers concurrent requests up
to a size or a delay). No library does it for a threaded gRPC servicer with per-call deadlines, so it is
written here, on a condition variable, in one small class.

Invariants:

* a job whose caller has gone (its future cancelled) before a worker took it is never run;
* a job whose deadline has passed when its batch forms gets ``TimeoutError`` and is not run;
* jobs with different keys never share a batch, and a job with key ``None`` always runs alone;
* one job's failure is its own: the batch function returns one result or exception per job;
* :meth:`close` fails every job still queued (``NotReadyError``) and lets the running batches finish.

Example::

    batcher = Batcher(run, workers=2, max_rows=32, max_delay_s=0.002)
    future = batcher.submit(Job(payload, rows=3, key="embed", deadline=None))
    result = future.result()
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from enclave_app.status import NotReadyError

P = TypeVar("P")
R = TypeVar("R")

#: the batch function: one result (or the exception to raise in that caller) per job, in order
BatchFn = Callable[[Sequence[P]], Sequence[R | BaseException]]


@dataclass
class Job(Generic[P, R]):
    """One call's model work: ``payload`` for the batch function, ``rows`` it counts against
    ``max_rows``, ``key`` (jobs with equal keys may share a forward pass; ``None``: alone) and the
    ``deadline`` on ``Batcher.monotonic``'s clock (``None``: no deadline)."""

    payload: P
    rows: int = 1
    key: Hashable | None = None
    deadline: float | None = None
    future: Future[R] = field(default_factory=Future)
    arrived: float = 0.0


@dataclass(frozen=True)
class BatchStats:
    """What the batcher has done so far (for metrics and tests): batches run and the jobs they held."""

    batches: int
    jobs: int
    rows: int
    expired: int
    largest_rows: int


class Batcher(Generic[P, R]):
    """Worker threads that run queued jobs in batches (module docstring)."""

    def __init__(self, run: BatchFn[P, R], *, workers: int, max_rows: int, max_delay_s: float = 0.0,
                 monotonic: Callable[[], float] = time.monotonic, name: str = "model",
                 on_start: Callable[[], None] | None = None,
                 on_batch: Callable[[int, list[float]], None] | None = None) -> None:
        if workers < 1 or max_rows < 1 or max_delay_s < 0:
            raise ValueError("workers and max_rows must be positive, max_delay_s not negative")
        self._run = run
        #: told each batch's rows and its jobs' queue waits (seconds), from the worker thread (metrics)
        self.on_batch = on_batch
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self.monotonic = monotonic
        self._queue: deque[Job[P, R]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._batches = self._jobs = self._rows = self._expired = self._largest = 0
        self._threads = [threading.Thread(target=self._work, args=(on_start,), name=f"{name}-{i}",
                                          daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def stats(self) -> BatchStats:
        with self._cond:
            return BatchStats(self._batches, self._jobs, self._rows, self._expired, self._largest)

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job[P, R]) -> Future[R]:
        """Queue ``job``; its future settles with the job's result or exception."""
        if job.rows < 1:
            raise ValueError("a job has at least one row")
        with self._cond:
            if self._closed:
                raise NotReadyError("the model workers are stopped")
            job.arrived = self.monotonic()
            self._queue.append(job)
            self._cond.notify()
        return job.future

    def close(self) -> None:
        """Refuse new jobs, fail the queued ones, let running batches finish (no join: never blocks)."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(NotReadyError("the model workers are stopped"))

    # -- the worker loop -------------------------------------------------------------------------------

    def _work(self, on_start: Callable[[], None] | None) -> None:
        if on_start is not None:
            on_start()
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _next_batch(self) -> list[Job[P, R]] | None:
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                first = self._queue[0]
                if first.key is not None and self.max_delay_s > 0:
                    # wait for company, but never past the oldest job's delay
                    while not self._closed and self._rows_like(first) < self.max_rows:
                        remaining = first.arrived + self.max_delay_s - self.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    if self._closed:
                        return None
                    if not self._queue or self._queue[0] is not first:  # another worker took it
                        continue
                return self._take()

    def _rows_like(self, first: Job[P, R]) -> int:
        return sum(job.rows for job in self._queue if job.key == first.key)

    def _take(self) -> list[Job[P, R]]:
        """The oldest job and, if it has a key, later jobs with the same key up to ``max_rows`` rows."""
        first = self._queue.popleft()
        batch = [first]
        if first.key is None:
            return batch
        rows = first.rows
        kept: deque[Job[P, R]] = deque()
        while self._queue:
            job = self._queue.popleft()
            if job.key == first.key and rows + job.rows <= self.max_rows:
                batch.append(job)
                rows += job.rows
            else:
                kept.append(job)
                if rows >= self.max_rows:
                    break
        kept.extend(self._queue)
        self._queue = kept
        return batch

    def _execute(self, batch: list[Job[P, R]]) -> None:
        now = self.monotonic()
        live: list[Job[P, R]] = []
        expired = 0
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # the caller gave up before its work started
            if job.deadline is not None and job.deadline <= now:
                job.future.set_exception(TimeoutError())
                expired += 1
                continue
            live.append(job)
        with self._cond:
            self._expired += expired
            if live:
                rows = sum(job.rows for job in live)
                self._batches += 1
                self._jobs += len(live)
                self._rows += rows
                self._largest = max(self._largest, rows)
        if not live:
            return
        if self.on_batch is not None:
            self.on_batch(sum(job.rows for job in live), [now - job.arrived for job in live])
        try:
            results: Sequence[Any] = self._run([job.payload for job in live])
            if len(results) != len(live):
                raise RuntimeError("the batch function returned another number of results than jobs")
        except Exception as err:  # every caller of the batch gets the failure
            results = [err] * len(live)
        for job, result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
