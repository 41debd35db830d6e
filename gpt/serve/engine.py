"""The server's generation worker: one background thread running generations one at a time from a bounded FIFO
queue. What a generation *is* (sampling spec, prompt encoding, streamed text, stop strings) lives in the front door,
gpt/generate.py; this module only decides when each one runs.

Why one worker and a queue (not a lock per request, not batching): on a CPU a single batch-1 decode already uses
every core, so two generations at once only thrash each other; a FIFO queue keeps arrival order, a bounded
queue turns overload into an immediate "busy" answer instead of an unbounded pile-up, and a cancelled request
(client went away) is dropped from the queue or stopped between two tokens. `shutdown` cancels whatever is still
queued or running (the server's drain deadline has passed by then).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable


class QueueFull(RuntimeError):
    """Too many generations are waiting; the caller should retry later (HTTP 503)."""


@dataclasses.dataclass
class Job:
    """One queued request: `run()` executes in the worker thread; `cancel()` may be called from anywhere."""

    run: Callable[[Callable[[], bool]], None]
    cancel_event: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()


class Worker:
    """A single daemon thread running jobs in FIFO order from a bounded queue."""

    def __init__(self, max_queue: int = 16):
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.thread = threading.Thread(target=self._loop, name="gpt-generation-worker", daemon=True)
        self.busy = threading.Event()
        self.current: Job | None = None  # the job running now
        self.closed = False
        self.thread.start()

    def submit(self, job: Job) -> Job:
        if self.closed:
            raise QueueFull("server shutting down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"server busy: {self.jobs.maxsize} requests are already waiting") from None
        return job

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if job.cancelled:  # its client left while it waited
                continue
            self.busy.set()
            self.current = job
            try:
                job.run(lambda job=job: job.cancelled)
            except Exception:  # the job reports its own errors; the worker must survive anything
                pass
            finally:
                self.current = None
                self.busy.clear()

    def queued(self) -> int:
        return self.jobs.qsize()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancel every queued job and the running one (it stops before its next token), then stop the thread."""
        self.closed = True
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        running = self.current
        if running is not None:
            running.cancel()
        self.jobs.put(None)  # the queue is empty now: never blocks
        self.thread.join(timeout=timeout)
