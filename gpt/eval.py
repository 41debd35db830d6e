"""Evaluation of a trained model on the validation shards: loss, perplexity, bits-per-byte, accuracy, samples.

Bits-per-byte is the tokenizer-independent number: total nats over the scored tokens divided by ln 2 times the
UTF-8 bytes those tokens encode. The manifest gives the split's bytes and tokens; the bytes of the scored part are
`num_bytes * scored_tokens / num_tokens` (exact up to the split's first token and the tail that doesn't fill a
window, when the whole split is scored; a proportional estimate when `evaluate.max_windows` caps it).
EOS separators are scored like any token, so they are paid for in the nats while adding no bytes — as they should.

The unigram baseline predicts every token with its (add-one smoothed) frequency in the train split, scored on the
same targets: a model below its bits-per-byte has learned more than token frequencies.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from gpt.config import ConfigError
from gpt.generate import GenerationInputError, SamplingSpec, generate_text, make_generator
from gpt.model import next_token_loss


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`evaluate:` params section."""

    max_windows: int | None = None  # null = the full validation split
    seq_len: int | None = None  # null = the length the model was trained on (its lineage), else its max_seq_len
    batch_size: int = 16
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    device: str = "auto"
    prompts: list[str] = dataclasses.field(
        default_factory=lambda: ["The", "Return the", "This module provides", "def", "If the"])
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = 40
    top_p: float | None = None
    seed: int = 1234

    def __post_init__(self) -> None:
        for key in ("max_windows", "seq_len"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"evaluate.{key}: must be >= 1 or null, got {value}")
        if self.batch_size < 1:
            raise ConfigError(f"evaluate.batch_size: must be >= 1, got {self.batch_size}")
        self.sampling_spec()  # the sampling values are checked by the generation front door, like everywhere

    def sampling_spec(self) -> SamplingSpec:
        """The samples' sampling settings (no samples at all: `prompts: []`)."""
        try:
            return SamplingSpec(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                top_p=self.top_p, seed=self.seed)
        except GenerationInputError as err:
            raise ConfigError(f"evaluate.{err.field}: {err.reason}") from None


@dataclasses.dataclass
class LossStats:
    """Sums over all scored targets."""

    nats: float = 0.0
    tokens: int = 0
    correct: int = 0
    windows: int = 0
    target_counts: np.ndarray | None = None  # histogram of the scored target ids (for the unigram baseline)

    @property
    def mean_loss(self) -> float:
        return self.nats / self.tokens if self.tokens else math.nan


def bits_per_byte(nats: float, scored_tokens: int, split_tokens: int, split_bytes: int) -> float:
    """Total nats / (ln 2 · UTF-8 bytes of the scored tokens), the bytes pro-rated from the split's manifest."""
    scored_bytes = split_bytes * scored_tokens / split_tokens
    return nats / (math.log(2) * scored_bytes)


@torch.no_grad()
def score_windows(model: nn.Module, windows, vocab_size: int, batch_size: int, device: torch.device,
                  autocast_dtype: torch.dtype | None = None, progress: bool = True) -> LossStats:
    """Sum next-token nats and correct argmax predictions over windows [T+1] (an iterable of LongTensors)."""
    model.eval()
    stats = LossStats(target_counts=np.zeros(vocab_size, dtype=np.int64))
    batch: list[torch.Tensor] = []

    def flush() -> None:
        rows = torch.stack(batch).to(device)
        inputs, targets = rows[:, :-1], rows[:, 1:]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits, _ = model(inputs)
        logits = logits.float()
        nats = next_token_loss(logits, rows, reduction="sum")  # every position scored: rows are T + 1 long
        stats.nats += float(nats)
        stats.tokens += targets.numel()
        stats.correct += int((logits.argmax(-1) == targets).sum())
        stats.windows += len(batch)
        stats.target_counts += np.bincount(targets.flatten().cpu().numpy(), minlength=vocab_size)[:vocab_size]
        batch.clear()

    for window in tqdm(windows, desc="evaluate", unit="win", disable=None if progress else True):
        batch.append(window)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return stats


def unigram_log_probs(shards, vocab_size: int, chunk: int = 1 << 20) -> np.ndarray:
    """log p(token) from the token frequencies of a split (add-one smoothing, so unseen tokens stay finite)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, shards.num_tokens, chunk):
        ids = shards.read(start, min(chunk, shards.num_tokens - start))
        counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
    smoothed = counts.astype(np.float64) + 1.0
    return np.log(smoothed / smoothed.sum())


def unigram_nats(log_probs: np.ndarray, target_counts: np.ndarray) -> float:
    """Nats of predicting the scored targets with a unigram model."""
    return float(-(target_counts * log_probs[: len(target_counts)]).sum())


def generate_samples(model: nn.Module, tokenizer, prompts: list[str], cfg: EvalConfig,
                     device: torch.device) -> tuple[list[tuple[str, str]], float]:
    """Continue each prompt through the generation front door (gpt.generate: the same prompt encoding, start token
    and sampling as `gpt generate` and the server), drawing from one generator seeded with `evaluate.seed`.
    Returns [(prompt, prompt + continuation)] and the batch-1 decode rate in tokens/s."""
    model.eval()
    spec = cfg.sampling_spec()
    if prompts:  # warm-up (first-call allocations), so the timing below is the steady decode rate
        generate_text(model, tokenizer, prompts[0], dataclasses.replace(spec, max_new_tokens=4, temperature=0.0))
    generator = make_generator(spec.seed, device)
    samples, new_tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        start = time.perf_counter()
        completion = generate_text(model, tokenizer, prompt, spec, generator)
        seconds += time.perf_counter() - start
        new_tokens += completion.completion_tokens
        samples.append((prompt, prompt + completion.text))
    return samples, (new_tokens / seconds if seconds > 0 else 0.0)


def samples_markdown(samples: list[tuple[str, str]], cfg: EvalConfig, header: str) -> str:
    """Samples as Markdown (in git, so `git diff` shows how generations change between experiments)."""
    lines = [f"# Samples — {header}", "",
             f"temperature {cfg.temperature}, top_k {cfg.top_k}, top_p {cfg.top_p}, seed {cfg.seed}, "
             f"max_new_tokens {cfg.max_new_tokens}", ""]
    for i, (prompt, text) in enumerate(samples, 1):
        lines += [f"## {i}. `{prompt}`", "", "```text", text.replace("```", "'''"), "```", ""]
    return "\n".join(lines)
