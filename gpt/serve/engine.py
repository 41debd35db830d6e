"""Text generation for the CLI and the server: sampling parameters, streamed text deltas, stop strings, and
one background worker that runs generations one at a time from a bounded FIFO queue.

Why one worker and a queue (not a lock per request, not batching): on a CPU a single batch-1 decode already uses
every core, so two generations at once only thrash each other; a FIFO queue keeps arrival order, a bounded
queue turns overload into an immediate "busy" answer instead of an unbounded pile-up, and a cancelled request
(client went away) is dropped from the queue or stopped between two tokens.

Text is produced from token ids incrementally: the whole completion is decoded after each token and only the
new, *stable* suffix is emitted. Held back are an incomplete UTF-8 sequence (byte-fallback pieces decode to
U+FFFD until the last byte arrives) and a tail that could still become a stop string.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

REPLACEMENT_CHAR = "\ufffd"


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. temperature 0 means greedy decoding."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop: stop strings must be non-empty")


@dataclasses.dataclass
class Delta:
    """A piece of streamed output. `finish_reason` is set ("stop" | "length" | "cancelled") on the last one."""

    text: str
    num_tokens: int  # completion tokens produced so far
    finish_reason: str | None = None


def _model_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Map our params onto the model's generate/stream arguments (greedy = top-1 at temperature 1)."""
    if params.temperature == 0:
        return {"temperature": 1.0, "top_k": 1, "top_p": None}
    return {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p}


def _token_ids(step: Any) -> list[int]:
    """The model's stream yields the new token(s) of one step (tensor [1, k], [k] or an int); flatten them."""
    if isinstance(step, torch.Tensor):
        return [int(t) for t in step.reshape(-1).tolist()]
    if isinstance(step, int):
        return [step]
    return [int(t) for t in step]


class TextStream:
    """Turns completion token ids into stable text deltas, honouring stop strings."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        # Decoding a few prompt tokens in front keeps the completion's leading space (sentencepiece drops the
        # "▁" of the first piece of a decoded sequence).
        self.anchor = list(prompt_ids[-4:])
        self.anchor_text = tokenizer.decode(self.anchor) if self.anchor else ""
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _decode(self) -> str:
        full = self.tokenizer.decode(self.anchor + self.ids)
        if self.anchor and full.startswith(self.anchor_text):
            return full[len(self.anchor_text) :]
        return self.tokenizer.decode(self.ids)

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the newly stable text (sets `stopped` when a stop string appeared)."""
        self.ids.extend(token_ids)
        self.text = self._decode()
        cut = self._stop_index()
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self._emit(len(self.text))
        safe = len(self.text)
        # an incomplete UTF-8 character is at most 3 bytes, each decoded as U+FFFD until the last one arrives
        while safe > max(self.emitted, len(self.text) - 3) and self.text[safe - 1] == REPLACEMENT_CHAR:
            safe -= 1
        if self.stop:  # keep back a tail that may be the beginning of a stop string
            longest = max(len(s) for s in self.stop)
            for k in range(min(longest - 1, safe - self.emitted), 0, -1):
                tail = self.text[safe - k : safe]
                if any(s.startswith(tail) for s in self.stop):
                    safe -= k
                    break
        return self._emit(safe)

    def _stop_index(self) -> int | None:
        # search from a little before what was emitted: a stop string can straddle the boundary
        start = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out

    def flush(self) -> str:
        return self._emit(len(self.text))


def stream_completion(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    generator: torch.Generator | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> Iterator[Delta]:
    """Generate one completion of `prompt_ids`, yielding text deltas; the last delta carries finish_reason."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    eos = getattr(tokenizer, "eos_id", None)
    eos = eos if isinstance(eos, int) and eos >= 0 else None
    text = TextStream(tokenizer, prompt_ids, params.stop)
    finish, pending = "length", ""
    steps = model.stream(
        input_ids,
        max_new_tokens=params.max_tokens,
        eos_token_id=eos,
        generator=generator,
        **_model_sampling_kwargs(params),
    )
    try:
        with torch.inference_mode():
            for step in steps:
                if cancelled():
                    finish = "cancelled"
                    break
                ids = _token_ids(step)
                if eos is not None and eos in ids:
                    ids = ids[: ids.index(eos)]
                    finish = "stop"
                delta = text.push(ids) if ids else ""
                if text.stopped:
                    finish = "stop"
                if finish == "stop" or len(text.ids) >= params.max_tokens:
                    pending = delta
                    break
                if delta:
                    yield Delta(delta, len(text.ids))
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()
    tail = "" if finish == "cancelled" else pending + text.flush()
    yield Delta(tail, len(text.ids), finish)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded from `seed` (or from the clock when None)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else time.time_ns() % (2**63))
    return gen


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
        self.thread.start()

    def submit(self, job: Job) -> Job:
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
            try:
                job.run(lambda job=job: job.cancelled)
            except Exception:  # the job reports its own errors; the worker must survive anything
                pass
            finally:
                self.busy.clear()

    def queued(self) -> int:
        return self.jobs.qsize()

    def shutdown(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=5)
