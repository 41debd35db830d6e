"""Autoregressive decoding with a KV cache: prefill the prompt once, then one token per step.

Sampling: greedy when temperature == 0, otherwise temperature, then top-k, then nucleus (top-p) filtering
(Holtzman et al. 2019), then a draw from `generator` (seedable). Each sequence of a batch stops at its own EOS
and is padded with the (first) EOS id afterwards; decoding ends when every sequence has finished.

Context limit: a prompt longer than max_seq_len is left-truncated to its last max_seq_len tokens. When the
context fills during decoding the window slides: the most recent max_seq_len // 2 tokens are re-encoded into a
fresh cache and decoding continues (models with learned positions cannot see beyond max_seq_len anyway).
Batched prompts of different lengths are left-padded with `attention_mask` (1 = token, 0 = padding).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from gpt.model.cache import KVCache


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., V) → the index of the largest value along the last dim (the first one on ties, as argmax).

    `max(dim).indices` rather than `argmax`: on CPU, over a 65,536-token vocabulary, argmax took 84 us (fp32) and
    210 us (bf16) per row where max took 31 / 46 us (torch 2.13, the 2-core Xeon of bench/README.md)."""
    return logits.max(dim=-1).indices


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) → next token ids (B,)."""
    if temperature == 0:
        return greedy(logits)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays)
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def hidden_states(model, ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`model.hidden_states(ids, attention_mask, cache)`, through the model's `one_token_step` when it has one
    (`gpt.inference.prepare_for_inference` gives it) and this is one new token of one unpadded sequence."""
    step = getattr(model, "one_token_step", None)
    if (step is not None and ids.shape == (1, 1) and attention_mask is None and type(cache) is KVCache
            and cache.key_mask is None and not model.training):
        return step(ids, cache)
    return model.hidden_states(ids, attention_mask=attention_mask, cache=cache)


def _check_args(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device) if ids else None


class _Decoder:
    """Holds the token buffer and the KV cache of one generation; `next_logits` gives the logits to sample from."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int, use_cache: bool, vocab_limit: int | None = None) -> None:
        self.model, self.use_cache, self.vocab_limit = model, use_cache, vocab_limit
        self.max_len = model.config.max_seq_len
        input_ids = input_ids[:, -self.max_len:]
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("generate() needs a prompt of at least one token (e.g. a BOS token)")
        self.tokens = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=input_ids.device)
        self.tokens[:, :T] = input_ids
        self.mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            self.mask = torch.ones(B, T + max_new_tokens, dtype=torch.bool, device=input_ids.device)
            self.mask[:, :T] = attention_mask[:, -self.max_len:].bool()
        self.length = T
        self.cache = model.new_cache(B) if use_cache else None

    def _window(self, start: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = self.tokens[:, start:self.length]
        return ids, None if self.mask is None else self.mask[:, start:self.length]

    def prefill(self) -> torch.Tensor:
        return self._last_logits(*self._window(max(0, self.length - self.max_len)))

    def append(self, next_tokens: torch.Tensor) -> torch.Tensor:
        """Add the sampled tokens (B,) and return the logits for the following position."""
        self.tokens[:, self.length] = next_tokens
        self.length += 1
        if not self.use_cache:
            return self._last_logits(*self._window(max(0, self.length - self.max_len)))
        if self.cache.length >= self.max_len:  # context full: slide the window, re-encode the recent half
            self.cache = self.model.new_cache(self.tokens.shape[0])
            return self._last_logits(*self._window(self.length - self.max_len // 2))
        return self._last_logits(*self._window(self.length - 1))

    def _last_logits(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden_states(self.model, ids, self.cache, mask)[:, -1]  # (B, C)
        logits = self.model.lm_head(hidden)  # (B, V)
        return logits if self.vocab_limit is None else logits[:, : self.vocab_limit]


def stream(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
           generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
           use_cache: bool = True, vocab_limit: int | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence (B,) per step; stops early once every sequence has hit EOS.

    `vocab_limit`: sample only ids below it (a model whose embedding is padded beyond its tokenizer's vocabulary
    must never produce an id the tokenizer cannot decode)."""
    _check_args(max_new_tokens, temperature, top_k, top_p)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            decoder = _Decoder(model, input_ids, attention_mask, max_new_tokens, use_cache, vocab_limit)
            eos = _eos_tensor(eos_token_id, input_ids.device)
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            logits = decoder.prefill() if max_new_tokens else None
        # one sequence: its EOS check is a Python set lookup, not four tensor ops per token
        single_eos = set(eos.tolist()) if eos is not None and input_ids.shape[0] == 1 else None
        for step in range(max_new_tokens):
            with torch.inference_mode():
                next_tokens = sample_next_token(logits, temperature, top_k, top_p, generator)
                if single_eos is not None:
                    done = int(next_tokens[0]) in single_eos
                elif eos is not None:
                    next_tokens = torch.where(finished, eos[0], next_tokens)
                    finished |= torch.isin(next_tokens, eos)
                    done = bool(finished.all())
                else:
                    done = False
            yield next_tokens
            if step == max_new_tokens - 1 or done:
                return
            with torch.inference_mode():
                logits = decoder.append(next_tokens)
    finally:
        model.train(was_training)


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
             use_cache: bool = True, vocab_limit: int | None = None) -> torch.Tensor:
    """Prompt (B, T) → (B, T + n) with n ≤ max_new_tokens (fewer if every sequence stopped at EOS)."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    new = list(stream(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator,
                      attention_mask, use_cache, vocab_limit))
    if not new:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
