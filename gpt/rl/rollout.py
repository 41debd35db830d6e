"""Rollouts: groups of sampled completions with the log-probs the sampling policy gave them, and their rewards.

Layout of a `Rollout` of B rows (B = prompts × group size, each prompt repeated group_size times in a row):

    input_ids  (B, P + N)   left-padded prompt (P = longest prompt) then the N sampled completion tokens
    attention_mask          1 on real tokens, 0 on the prompt's left padding
    completion_mask (B, N)  1 on completion tokens up to and including the stop token, 0 after it
    logprobs   (B, N)       log π_old(token | prefix) at sampling time (temperature applied)

The logits that score completion token i sit at position P - 1 + i of the full sequence; `policy_forward`
recomputes them in one pass (the training forward) and must agree with what the KV-cached decoding recorded.
Sampling is temperature-only (no top-k/top-p): the ratio π/π_old is then over the true sampling distribution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from gpt.chat import split_reply, think_ids
from gpt.sft.tasks import Problem, check_answer


@dataclasses.dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + N)
    attention_mask: torch.Tensor  # (B, P + N)
    completion_mask: torch.Tensor  # (B, N) float
    logprobs: torch.Tensor  # (B, N) float32
    prompt_len: int  # P
    group_size: int
    stopped: torch.Tensor  # (B,) bool: the completion ended with a stop token (not cut at max_new_tokens)

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len:]  # (B, N)

    def completions(self) -> list[list[int]]:
        """Each row's completion tokens without the stop token and what follows it."""
        rows = []
        for ids, mask, stopped in zip(self.completion_ids.tolist(), self.completion_mask.tolist(),
                                      self.stopped.tolist()):
            n = int(sum(mask))
            rows.append(ids[: n - 1] if stopped else ids[:n])
        return rows


def _left_pad(prompts: Sequence[Sequence[int]], repeat: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts) * repeat, P), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        rows = slice(i * repeat, (i + 1) * repeat)
        ids[rows, P - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        mask[rows, P - len(prompt):] = 1
    return ids, mask


def _scaled_logits(model, hidden: torch.Tensor, temperature: float, vocab_limit: int | None) -> torch.Tensor:
    logits = model.lm_head(hidden).float()
    if vocab_limit is not None:
        logits = logits[..., :vocab_limit]
    return logits / temperature


@torch.no_grad()
def sample_rollouts(model, prompts: Sequence[Sequence[int]], group_size: int, max_new_tokens: int,
                    stop_ids: Sequence[int], temperature: float = 1.0, generator: torch.Generator | None = None,
                    vocab_limit: int | None = None) -> Rollout:
    """Sample `group_size` completions per prompt in one batch, decoding through the model's KV cache."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = (t.to(device) for t in _left_pad(prompts, group_size, pad_id=stop_ids[0]))
    B, P = prompt_ids.shape
    if P + max_new_tokens > model.config.max_seq_len:
        raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_seq_len={model.config.max_seq_len}; RL rollouts do not slide the window")
    stop = torch.tensor(list(stop_ids), device=device)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, capacity=P + max_new_tokens)
        hidden = model.hidden_states(prompt_ids, attention_mask=prompt_mask, cache=cache)[:, -1]  # (B, C)
        tokens, logprobs, masks = [], [], []
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logp = _scaled_logits(model, hidden, temperature, vocab_limit).log_softmax(dim=-1)  # (B, V)
            token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)  # (B,)
            token = torch.where(finished, stop[0], token)  # finished rows are padded with the stop id
            tokens.append(token)
            logprobs.append(logp.gather(1, token[:, None]).squeeze(1))
            masks.append(~finished)
            finished = finished | torch.isin(token, stop)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            hidden = model.hidden_states(token[:, None], cache=cache)[:, -1]
    finally:
        model.train(was_training)
    completion = torch.stack(tokens, dim=1)  # (B, N)
    return Rollout(
        input_ids=torch.cat([prompt_ids, completion], dim=1),
        attention_mask=torch.cat([prompt_mask, torch.ones_like(completion)], dim=1),
        completion_mask=torch.stack(masks, dim=1).float(),
        logprobs=torch.stack(logprobs, dim=1).float(),
        prompt_len=P, group_size=group_size, stopped=finished)


def policy_forward(model, rollout: Rollout, temperature: float = 1.0, vocab_limit: int | None = None,
                   value_head=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The training forward over a rollout → (log-probs (B, N), entropy (B, N), values (B, N) or None).

    Values (PPO) come from `value_head` on the same hidden states that score the token: the value of the state
    just before the token is emitted."""
    P, N = rollout.prompt_len, rollout.completion_ids.shape[1]
    hidden = model.hidden_states(rollout.input_ids, attention_mask=rollout.attention_mask)  # (B, P + N, C)
    hidden = hidden[:, P - 1: P - 1 + N]  # (B, N, C): position P-1+i predicts completion token i
    logp = _scaled_logits(model, hidden, temperature, vocab_limit).log_softmax(dim=-1)  # (B, N, V)
    logprobs = logp.gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    values = value_head(hidden) if value_head is not None else None
    return logprobs, entropy, values


@dataclasses.dataclass
class RewardBreakdown:
    reward: torch.Tensor  # (B,) correctness + format_weight * formatted
    correct: torch.Tensor  # (B,) 0/1
    formatted: torch.Tensor  # (B,) 0/1
    answers: list[str] = dataclasses.field(default_factory=list)  # each row's decoded answer (after </think>)
    thinking: list[str] = dataclasses.field(default_factory=list)  # each row's decoded thinking ("" without)


def task_rewards(tokenizer, problems: Sequence[Problem], rollout: Rollout, format_weight: float = 0.0
                 ) -> RewardBreakdown:
    """Rewards of a rollout over SFT task problems (`problems[i]` is the prompt of rows i*G .. (i+1)*G - 1).

    A reply may think inside `<think>…</think>` (gpt.chat.split_reply) before its answer.
    Format (0/1): the thinking block, if any, is well formed and is followed by a non-empty answer closed by the
    stop token (not cut at max_new_tokens). Correctness (0/1): `check_answer` on the decoded answer alone."""
    G = rollout.group_size
    think = think_ids(tokenizer)
    parts = [split_reply(ids, think) for ids in rollout.completions()]
    answers = [tokenizer.decode(p.answer) for p in parts]
    correct = torch.tensor([float(check_answer(problems[i // G].task, text, problems[i // G].answer))
                            for i, text in enumerate(answers)])
    formatted = torch.tensor([float(bool(stopped) and p.well_formed and bool(text.strip()))
                              for p, text, stopped in zip(parts, answers, rollout.stopped.tolist())])
    return RewardBreakdown(correct + format_weight * formatted, correct, formatted, answers,
                           [tokenizer.decode(p.thinking) for p in parts])


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where mask is 1 (all completion tokens of the batch together)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def token_logprobs_reference(model, rollout: Rollout, temperature: float = 1.0,
                             vocab_limit: int | None = None) -> torch.Tensor:
    """Log-probs of the completion tokens under a frozen model (the KL reference), without gradients."""
    with torch.no_grad():
        return policy_forward(model, rollout, temperature, vocab_limit)[0]


__all__ = ["Rollout", "RewardBreakdown", "sample_rollouts", "policy_forward", "task_rewards", "masked_mean",
           "token_logprobs_reference"]
