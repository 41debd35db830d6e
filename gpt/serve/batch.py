"""Continuous batching: one scheduler thread decodes every running generation together, step by step.

The server's worker threads (gpt/serve/engine.py) each run one request through the unchanged front door
(gpt.generate.stream_completion / stream_chat), but against `BatchScheduler.model`, a stand-in for the model whose
`stream()` hands the prompt to the scheduler and yields the tokens it samples for that sequence. The scheduler
owns the real model and a `BatchKVCache` (gpt/model/cache.py) with `max_batch` slots, and loops:

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
re-encoded into its slot. What stays per request in the worker thread (text decoding, stop strings, the n choices
drawn in turn from one seeded generator) is exactly the one-at-a-time path's, so a request's output does not depend
on the others: greedy tokens are the same (up to float rounding of a batched matmul, which can only matter at an
exact tie), and so are seeded samples.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from gpt.model.generation import sample_next_token

_END = object()  # the token queue's end mark


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
        ids = input_ids.reshape(-1).tolist()
        if input_ids.dim() == 2 and input_ids.shape[0] != 1:
            raise ValueError("the batching scheduler streams one sequence per call")
        if not ids:
            raise ValueError("generate() needs a prompt of at least one token (e.g. a BOS token)")
        stops = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) \
            else set(eos_token_id)
        seq = _Sequence(ids[-self.config.max_seq_len:], max_new_tokens, temperature, top_k, top_p, stops,
                        generator, vocab_limit)
        return self._tokens(seq) if max_new_tokens >= 1 else iter(())

    def _tokens(self, seq: _Sequence) -> Iterator[int]:
        self.scheduler.add(seq)
        try:
            while (item := seq.out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not seq.done:  # the caller stopped early (its client went away): free the slot now
                self.scheduler.drop(seq)


class BatchScheduler:
    """Owns the model and runs every decode step for up to `max_batch` sequences at once (see the module doc)."""

    def __init__(self, model: torch.nn.Module, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.real_model = model.eval()
        self.max_batch = max_batch
        self.max_len = int(model.config.max_seq_len)
        self.cache = model.new_batch_cache(max_batch)
        self.device = model.tok_embeddings.weight.device
        self.rows: list[_Sequence] = []  # live sequences; rows[i].slot == i
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add" | "drop" | "stop", sequence)
        self.steps = 0  # decode steps run (for tests and /health)
        self.model = BatchedModel(self)
        self.thread = threading.Thread(target=self._loop, name="gpt-batch-scheduler", daemon=True)
        self.thread.start()

    # ---- called from worker threads
    def add(self, seq: _Sequence) -> None:
        self.inbox.put(("add", seq))

    def drop(self, seq: _Sequence) -> None:
        self.inbox.put(("drop", seq))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the scheduler; sequences still running end with an error (their requests were cancelled)."""
        self.inbox.put(("stop", None))
        self.thread.join(timeout=timeout)

    @property
    def active(self) -> int:
        return len(self.rows)

    # ---- the scheduler thread
    def _loop(self) -> None:
        with torch.inference_mode():
            while self._read_inbox(block=not self.rows and not self.waiting):
                try:
                    while self.waiting and len(self.rows) < self.max_batch:
                        self._start(self.waiting.popleft())
                    if self.rows:
                        self._step()
                except Exception as err:  # a bug or out of memory: fail the requests, keep serving
                    for seq in self.rows:
                        self._finish(seq, err)
                    self.rows.clear()
        for seq in [*self.rows, *self.waiting]:
            self._finish(seq, RuntimeError("server shutting down"))
        self.rows.clear()
        self.waiting.clear()

    def _read_inbox(self, block: bool) -> bool:
        """Apply queued adds/drops; False once asked to stop. Blocks for the first message when idle."""
        while True:
            try:
                kind, seq = self.inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                self.waiting.append(seq)
            elif not seq.done:  # drop: its client went away
                seq.done = True
                if seq in self.waiting:
                    self.waiting.remove(seq)
                elif 0 <= seq.slot < len(self.rows) and self.rows[seq.slot] is seq:
                    self._remove(seq)

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
        hidden = self.real_model.hidden_states(torch.tensor([ids], device=self.device), cache=view)[:, -1]
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
        """Greedy rows in one argmax; every other row through `sample_next_token` with its own generator."""
        out = [0] * len(seqs)
        greedy = [i for i, seq in enumerate(seqs) if seq.temperature == 0]
        limits = {seqs[i].vocab_limit for i in greedy}
        if len(limits) == 1:  # (one server, one tokenizer: always)
            rows = logits if len(greedy) == len(seqs) else logits[greedy]
            for i, token in zip(greedy, rows[:, : limits.pop()].argmax(dim=-1).tolist()):
                out[i] = token
        else:
            for i in greedy:
                out[i] = int(logits[i, : seqs[i].vocab_limit].argmax())
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
