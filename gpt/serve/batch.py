"""Continuous batching: every running generation is decoded together, one shared forward per step.

The server's worker threads (gpt/serve/engine.py) each run one request through the unchanged front door
(gpt.generate.stream_completion / stream_chat), but against `BatchScheduler.model`, a stand-in for the model whose
`stream()` hands the prompt to the scheduler and yields the tokens sampled for that sequence. The scheduler owns
the real model and a `BatchKVCache` (gpt/model/cache.py) with `max_batch` slots; the requests' own threads take
turns starting its scheduling rounds (see `BatchScheduler`), which all run on the scheduler's one model thread:
torch's OpenMP runtime slows every thread down once several threads own thread pools (why, and what it cost:
`gpt.serve.engine.no_openmp_pool`). A round:

  1. at a step boundary, newcomers get a free slot and are prefilled alone (the ordinary batch-1 forward, written
     straight into their slot), and their first token is sampled;
  2. one decode step runs for all live sequences at once: each feeds its last token at its own position
     (rotary or learned), attending only to its own slot (the cache builds the mask), so rows of different
     lengths share one forward; a lone sequence decodes through the batch-1 path, as `model.stream` does;
  3. each row samples with its own settings and its own torch.Generator (`sample_next_token`, the very function
     the one-at-a-time path calls, on that row's logits, so a seed draws the same numbers either way);
  4. a sequence that hit a stop id or its max_new_tokens, or whose client went away (the front door closes the
     stream), leaves at once: the last row's slot is copied into the hole, so live rows stay 0..B-1 and every
     step attends to views of the cache, never gathered copies.

A sequence whose context fills up slides its window as `model.stream` does: the last max_seq_len // 2 tokens are
re-encoded into its slot (the last of them joins the next step). What stays per request in the worker thread
(text decoding, stop strings, the n choices drawn in turn from one seeded generator) is exactly the one-at-a-time
path's, so a request's output does not depend on the others: greedy tokens are the same (up to float rounding of
a batched matmul, which can only matter at a near tie), and so are seeded samples (tests/test_serve_batching.py).
Prefill is not chunked: a long newcomer's prompt delays the running sequences' next token by its prefill time.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gpt.model.generation import greedy, hidden_states, sample_next_token

_END = object()  # the token queue's end mark
RUN_AHEAD = 4  # a round keeps stepping while every live sequence has fewer unread tokens than this


class _Sequence:
    """One generation inside the scheduler: its tokens, sampling settings, slot and the queue its tokens go to."""

    def __init__(self, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
                 top_p: float | None, stop_ids: set[int], generator: torch.Generator | None,
                 vocab_limit: int | None):
        self.tokens = list(ids)
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = max_new_tokens, temperature, top_k, top_p
        self.stop_ids, self.generator, self.vocab_limit = stop_ids, generator, vocab_limit
        self.generated = 0
        self.slot = -1  # row in the cache while live
        self.out: queue.SimpleQueue = queue.SimpleQueue()  # sampled token ids, then _END or an exception
        self.done = False


class BatchedModel:
    """What the front door needs of a model (`config`, `parameters()`, `stream()`), decoded by the scheduler."""

    def __init__(self, scheduler: BatchScheduler):
        self.scheduler = scheduler
        self.config = scheduler.real_model.config

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.scheduler.real_model.parameters()

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None,
               eos_token_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
               vocab_limit: int | None = None, **unused: Any) -> Iterator[int]:
        """One sequence's tokens, as `model.stream` yields them for a batch of one (ints instead of tensors)."""
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError("the batching scheduler streams one sequence per call")
        ids = input_ids.reshape(-1).tolist()
        if not ids:
            raise ValueError("generate() needs a prompt of at least one token (e.g. a BOS token)")
        stops = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) \
            else set(eos_token_id)
        seq = _Sequence(ids[-self.config.max_seq_len:], max_new_tokens, temperature, top_k, top_p, stops,
                        generator, vocab_limit)
        return self.scheduler.tokens(seq) if max_new_tokens >= 1 else iter(())


class BatchScheduler:
    """Owns the model and runs every decode step for up to `max_batch` sequences at once (see the module doc).

    A sequence's thread that wants its next token and finds none starts the next scheduling round (one at a
    time, `stepping`), which makes a token for every running sequence; the others wait until that round ends.
    The round itself runs on `model_thread`, the one thread that does the model's work (see the module doc), and
    the starting thread waits for it. A round keeps stepping while nothing new arrived and every live sequence has
    fewer than RUN_AHEAD unread tokens, waking the readers after each step, so decoding overlaps the requests'
    text handling instead of handing every step back and forth (one client of the tiny model: 0.83–0.87x of the
    one-at-a-time server without it, 1.06–1.08x with it; bench/README.md).
    """

    def __init__(self, model: torch.nn.Module, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.real_model = model.eval()
        self.max_batch = max_batch
        self.max_len = int(model.config.max_seq_len)
        self.cache = model.new_batch_cache(max_batch)
        self.device = model.tok_embeddings.weight.device
        self.rows: list[_Sequence] = []  # live sequences; rows[i].slot == i (touched only while stepping)
        self.waiting: collections.deque[_Sequence] = collections.deque()  # (only while stepping)
        self.turn = threading.Condition()  # guards inbox, stepping, closed; notified after every round
        self.inbox: list[tuple[str, _Sequence]] = []  # ("add" | "drop", sequence), applied by the next round
        self.stepping = False
        self.closed = False
        self.steps = 0  # decode steps run (tests, the benchmark)
        self.model = BatchedModel(self)
        self.model_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt-model")

    @property
    def active(self) -> int:
        return len(self.rows)

    def shutdown(self) -> None:
        """Refuse new sequences; running ones end with an error at the next round (their requests were cancelled
        by the server's drain deadline already)."""
        with self.turn:
            self.closed = True

    def tokens(self, seq: _Sequence) -> Iterator[int]:
        """Add `seq` and yield its tokens, running scheduling rounds whenever it has none to read."""
        with self.turn:
            if self.closed:
                raise RuntimeError("server shutting down")
            self.inbox.append(("add", seq))
        try:
            while True:
                try:
                    item = seq.out.get_nowait()
                except queue.Empty:
                    self._take_turn()
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not seq.done:  # the caller stopped early (its client went away): free the slot now
                with self.turn:
                    self.inbox.append(("drop", seq))
                self._take_turn(decode=False)  # (after the round in progress, if any)

    def _take_turn(self, decode: bool = True) -> None:
        """Run one round, or wait for the round in progress to end. decode=False: wait for the round in progress
        to end, then only apply the adds and drops."""
        with self.turn:
            while self.stepping:
                self.turn.wait(timeout=1.0)
                if decode:
                    return
            self.stepping = True
        try:
            self.model_thread.submit(self._round, decode).result()
        finally:
            with self.turn:
                self.stepping = False
                self.turn.notify_all()

    def _take_inbox(self) -> list[tuple[str, _Sequence]]:
        messages, self.inbox = self.inbox, []
        return messages

    def _apply(self, messages: list[tuple[str, _Sequence]]) -> None:
        for kind, seq in messages:
            if kind == "add":
                self.waiting.append(seq)
            elif not seq.done:  # drop: its client went away
                seq.done = True
                if seq in self.waiting:
                    self.waiting.remove(seq)
                elif 0 <= seq.slot < len(self.rows) and self.rows[seq.slot] is seq:
                    self._remove(seq)

    def _round(self, decode: bool = True) -> None:
        """One scheduling round: apply adds/drops, admit newcomers into free slots, run one decode step."""
        with self.turn:
            messages, closed = self._take_inbox(), self.closed
        self._apply(messages)
        if not decode:
            return
        try:
            if closed:
                raise RuntimeError("server shutting down")
            with torch.inference_mode():
                while self.waiting and len(self.rows) < self.max_batch:
                    self._start(self.waiting.popleft())
                if self.rows:
                    self._step()
                while self.rows and self._run_ahead():
                    self._step()
        except Exception as err:  # a bug, out of memory, shutdown: fail these requests, keep serving
            for seq in [*self.rows, *self.waiting]:
                self._finish(seq, err)
            self.rows.clear()
            self.waiting.clear()

    def _run_ahead(self) -> bool:
        """After a step: run another in this round? Yes while no request has news (a newcomer, a drop, shutdown)
        and every live sequence has fewer than RUN_AHEAD unread tokens. The model thread then keeps decoding
        while the requests' threads read and detokenize (each is woken per step) instead of handing every step
        back and forth: one client of the tiny model lost 13–17% to that hand-off."""
        with self.turn:
            if self.inbox or self.closed:
                return False
            self.turn.notify_all()  # tokens are ready: let their readers take them while the next step runs
        return all(seq.out.qsize() < RUN_AHEAD for seq in self.rows)

    def _start(self, seq: _Sequence) -> None:
        """Give a newcomer the next free slot, prefill it alone, sample its first token."""
        seq.slot = len(self.rows)
        self.rows.append(seq)
        self.cache.set_length(seq.slot, 0)
        logits = self._forward_one(seq, seq.tokens)
        self._emit([seq], logits)

    def _forward_one(self, seq: _Sequence, ids: list[int]) -> torch.Tensor:
        """Batch-1 forward of `ids` after what seq's slot holds → last logits (1, V)."""
        view = self.cache.row(seq.slot)
        hidden = hidden_states(self.real_model, torch.tensor([ids], device=self.device), view)[:, -1]
        self.cache.set_length(seq.slot, view.length)
        return self._logits(hidden, [seq])

    def _logits(self, hidden: torch.Tensor, seqs: list[_Sequence]) -> torch.Tensor:
        return self.real_model.lm_head(hidden)  # (B, V); each row is cut to its vocab_limit when sampled

    def _step(self) -> None:
        """Feed every live sequence its last token (one forward for all of them) and sample the next."""
        for seq in self.rows:
            if self.cache.lengths[seq.slot] >= self.max_len:  # context full: re-encode the recent half
                window = seq.tokens[-(self.max_len // 2):]
                self.cache.set_length(seq.slot, 0)
                if len(window) > 1:
                    self._forward_one(seq, window[:-1])
        rows = list(self.rows)
        if len(rows) == 1:  # a lone sequence: the batch-1 path, as model.stream decodes
            logits = self._forward_one(rows[0], rows[0].tokens[-1:])
        else:
            last = torch.tensor([[seq.tokens[-1]] for seq in rows], device=self.device)  # (B, 1)
            hidden = self.real_model.hidden_states(last, cache=self.cache)[:, -1]  # (B, C)
            logits = self._logits(hidden, rows)
        self.steps += 1
        self._emit(rows, logits)

    def _emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """Sample each row with its own settings, hand the token over, retire finished sequences."""
        tokens = self._sample(seqs, logits)
        for seq, token in zip(seqs, tokens):
            seq.tokens.append(token)
            seq.generated += 1
            seq.out.put(token)
            if token in seq.stop_ids or seq.generated >= seq.max_new_tokens:
                self._finish(seq)
                self._remove(seq)

    @staticmethod
    def _sample(seqs: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """Greedy rows in one `greedy` call; every other row through `sample_next_token` with its own generator."""
        out = [0] * len(seqs)
        greedy_rows = [i for i, seq in enumerate(seqs) if seq.temperature == 0]
        limits = {seqs[i].vocab_limit for i in greedy_rows}
        if len(limits) == 1:  # (one server, one tokenizer: always)
            rows = logits if len(greedy_rows) == len(seqs) else logits[greedy_rows]
            for i, token in zip(greedy_rows, greedy(rows[:, : limits.pop()]).tolist()):
                out[i] = token
        else:
            for i in greedy_rows:
                out[i] = int(greedy(logits[i, : seqs[i].vocab_limit]))
        for i, seq in enumerate(seqs):
            if seq.temperature != 0:
                row = logits[i:i + 1, : seq.vocab_limit]  # (1, V): the shape the one-at-a-time path samples from
                out[i] = int(sample_next_token(row, seq.temperature, seq.top_k, seq.top_p, seq.generator)[0])
        return out

    def _finish(self, seq: _Sequence, error: BaseException | None = None) -> None:
        if not seq.done:
            seq.done = True
            seq.out.put(_END if error is None else error)

    def _remove(self, seq: _Sequence) -> None:
        """Free seq's slot now: the last row moves into it, so live rows stay 0..B-1."""
        i, last = seq.slot, self.rows[-1]
        if last is not seq:
            self.cache.move(last.slot, i)
            last.slot = i
            self.rows[i] = last
        self.rows.pop()
        seq.slot = -1
