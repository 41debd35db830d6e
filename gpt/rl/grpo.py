"""GRPO (DeepSeekMath, Shao et al. 2024): advantages relative to the group of completions of the same prompt.

No value model: each completion's advantage is its reward minus the mean reward of its group (optionally divided
by the group's std), given to every token of the completion. The loss is PPO's clipped surrogate per token,
averaged over all completion tokens of the batch (the token-level mean of DAPO, Yu et al. 2025, so long
completions are not down-weighted), plus an optional KL penalty to a frozen reference with the k3 estimator
(Schulman, "Approximating KL divergence", 2020): exp(ref - logp) - (ref - logp) - 1, unbiased and ≥ 0.
"""

from __future__ import annotations

import torch

from gpt.rl.config import RLConfig
from gpt.rl.rollout import Rollout, masked_mean, policy_forward


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """rewards (B,), rows grouped by prompt in consecutive blocks of group_size → advantages (B,)."""
    grouped = rewards.float().view(-1, group_size)  # (n_prompts, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float) -> torch.Tensor:
    """Per-token PPO objective min(r A, clip(r, 1-eps, 1+eps) A), r = π/π_old (to be maximised)."""
    ratio = torch.exp(logprobs - old_logprobs)
    return torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(π ‖ π_ref) from the sampled tokens' log-probs."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(logprobs: torch.Tensor, rollout: Rollout, advantages: torch.Tensor, cfg: RLConfig,
              ref_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss (to minimise) from the current log-probs (B, N) and per-completion advantages (B,)."""
    mask = rollout.completion_mask
    objective = clipped_surrogate(logprobs, rollout.logprobs, advantages[:, None], cfg.clip_eps)  # (B, N)
    per_token = -objective
    stats = {}
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs the reference model's log-probs")
        kl = kl_k3(logprobs, ref_logprobs)
        per_token = per_token + cfg.kl_coef * kl
        stats["kl"] = float(masked_mean(kl.detach(), mask))
    ratio = torch.exp(logprobs.detach() - rollout.logprobs)
    clipped = ((ratio - 1).abs() > cfg.clip_eps).float()
    stats["clip_fraction"] = float(masked_mean(clipped, mask))
    return masked_mean(per_token, mask), stats


def grpo_update(model, optimizer: torch.optim.Optimizer, rollout: Rollout, rewards: torch.Tensor, cfg: RLConfig,
                ref_model=None, vocab_limit: int | None = None) -> dict[str, float]:
    """cfg.updates_per_batch optimizer steps on one rollout batch; returns the last step's statistics."""
    advantages = group_advantages(rewards.to(rollout.logprobs.device), rollout.group_size, cfg.normalize_std)
    ref_logprobs = None
    if cfg.kl_coef > 0 and ref_model is not None:
        with torch.no_grad():
            ref_logprobs = policy_forward(ref_model, rollout, cfg.temperature, vocab_limit)[0]
    stats: dict[str, float] = {}
    for _ in range(cfg.updates_per_batch):
        logprobs, entropy, _ = policy_forward(model, rollout, cfg.temperature, vocab_limit)
        loss, stats = grpo_loss(logprobs, rollout, advantages, cfg, ref_logprobs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        stats.update(loss=float(loss.detach()), entropy=float(masked_mean(entropy.detach(), rollout.completion_mask)))
    return stats
