"""One RL step: sample a batch of rollouts, reward them, update the policy with GRPO or PPO (`RLConfig.algorithm`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gpt.rl.config import RLConfig
from gpt.rl.grpo import grpo_update
from gpt.rl.ppo import ValueHead, ppo_update
from gpt.rl.rollout import Rollout, sample_rollouts

RewardFn = Callable[[Rollout], torch.Tensor]  # rollout → rewards (B,)


def rl_step(model, optimizer: torch.optim.Optimizer, prompts: Sequence[Sequence[int]], reward_fn: RewardFn,
            cfg: RLConfig, stop_ids: Sequence[int], *, value_head: ValueHead | None = None, ref_model=None,
            generator: torch.Generator | None = None, vocab_limit: int | None = None) -> dict[str, float]:
    """Sample cfg.group_size completions per prompt, reward them and update; returns the step's statistics.

    The updates run with dropout off (eval mode, gradients on): a fresh dropout mask would make π/π_old ≠ 1
    on samples that were just drawn, which the clipping would then treat as policy change."""
    rollout = sample_rollouts(model, prompts, cfg.group_size, cfg.max_new_tokens, stop_ids, cfg.temperature,
                              generator, vocab_limit)
    rewards = reward_fn(rollout).float()
    was_training = model.training
    model.eval()
    try:
        if cfg.algorithm == "grpo":
            stats = grpo_update(model, optimizer, rollout, rewards, cfg, ref_model, vocab_limit)
        else:
            if value_head is None:
                raise ValueError("algorithm 'ppo' needs a value head (gpt.rl.ppo.ValueHead) in the optimizer")
            stats = ppo_update(model, value_head, optimizer, rollout, rewards, cfg, ref_model, vocab_limit)
    finally:
        model.train(was_training)
    lengths = rollout.completion_mask.sum(dim=1)
    stats.update(reward=float(rewards.mean()), completion_length=float(lengths.mean()),
                 stop_rate=float(rollout.stopped.float().mean()))
    return stats
