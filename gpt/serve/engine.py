"""The server's generation workers: threads running queued generations from one bounded FIFO queue. What a
generation *is* (sampling spec, prompt encoding, streamed text, stop strings) lives in the front door,
gpt/generate.py; this module only decides when each one starts.

One worker thread (`serve.max_batch` 1) runs generations one at a time: on a CPU a batch-1 decode already uses every
core, so two independent generations only thrash each other. With `max_batch` > 1 there are that many worker
threads, and their generations share the model through gpt/serve/batch.py: each decode step runs for all of them
at once (continuous batching), which costs little more per step than one sequence does.
Either way a FIFO queue keeps arrival order, a bounded queue turns overload into an immediate "busy" answer
instead of an unbounded pile-up, and a cancelled request (client went away) is dropped from the queue or stopped
between two tokens. `shutdown` cancels whatever is still queued or running (the server's drain deadline has passed
by then).
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def no_openmp_pool() -> Iterator[None]:
    """Run the block (loading the model, building the app) with one torch thread, then restore the thread count.

    The model's parallel work belongs on the thread that decodes (a worker, or the batch scheduler's model
    thread). libgomp gives each thread that runs a parallel region its own pool of threads and, once the process
    holds more of them than there are CPUs, stops spin-waiting between regions: a main thread that had loaded
    and warmed the model with 2 threads made a decoding thread a third slower (seed bf16, 2-core box: 85 vs 118
    tok/s). With one thread here the main thread never starts a pool. Threads created later use the restored
    count (torch initialises each thread's count from it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class QueueFull(RuntimeError):
    """Too many generations are waiting; the caller should retry later (HTTP 503)."""


@dataclasses.dataclass
class Job:
    """One queued request: `run()` executes in a worker thread; `cancel()` may be called from anywhere."""

    run: Callable[[Callable[[], bool]], None]
    cancel_event: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


class Worker:
    """`threads` daemon threads running jobs in FIFO order from one bounded queue (a job waits in the queue
    only while every thread is busy)."""

    def __init__(self, max_queue: int = 16, threads: int = 1):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.max_queue = max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()  # bounded by `submit` (stop marks must never block)
        self.busy = threading.Event()  # set while any job runs
        self._running_jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        self.closed = False
        self.threads = [threading.Thread(target=self._loop, name=f"gpt-generation-worker-{i}", daemon=True)
                        for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def submit(self, job: Job) -> Job:
        with self._lock:
            if self.closed:
                raise QueueFull("server shutting down")
            idle = len(self.threads) - len(self._running_jobs)  # threads about to take a job: it won't wait
            if self.jobs.qsize() >= self.max_queue + idle:
                raise QueueFull(f"server busy: {self.max_queue} requests are already waiting")
            self.jobs.put_nowait(job)
        return job

    def _started(self, job: Job) -> None:
        with self._lock:
            self._running_jobs[id(job)] = job
            self.busy.set()

    def _ended(self, job: Job) -> None:
        with self._lock:
            self._running_jobs.pop(id(job), None)
            if not self._running_jobs:
                self.busy.clear()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled:  # its client left while it waited
                continue
            self._started(job)
            try:
                job.run(lambda job=job: job.cancelled)
            except Exception:  # the job reports its own errors; the worker must survive anything
                pass
            finally:
                self._ended(job)

    def queued(self) -> int:
        return self.jobs.qsize()

    def num_running(self) -> int:
        with self._lock:
            return len(self._running_jobs)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel every queued job and the running ones (each stops before its next token), then stop the
        threads (waiting up to `timeout` seconds in all)."""
        with self._lock:
            self.closed = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        with self._lock:
            running = list(self._running_jobs.values())
        for job in running:
            job.cancel()
        for _ in self.threads:
            self.jobs.put(None)  # one stop mark per thread, taken as each thread ends its job
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
