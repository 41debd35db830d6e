"""PPO with a value head on the policy's trunk (the seed's "dual heads"; Schulman et al. 2017, InstructGPT-style).

The value head is a small module applied from outside to `model.hidden_states` (the model stays plain). The
sequence-level reward is given on the last completion token; per-token advantages come from GAE(γ, λ)
(Schulman et al. 2016), the value target is advantage + old value, and both the policy ratio and the value
update are clipped.
"""

from __future__ import annotations

import torch
from torch import nn

from gpt.rl.config import RLConfig
from gpt.rl.grpo import clipped_surrogate, kl_k3
from gpt.rl.rollout import Rollout, masked_mean, policy_forward


class ValueHead(nn.Module):
    """hidden states (..., d_model) → scalar values (...). Zero-initialised: every state starts at value 0."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


def terminal_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sequence rewards (B,) placed on each row's last completion token → per-token rewards (B, N)."""
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)  # (B,)
    per_token = torch.zeros_like(mask)
    per_token[torch.arange(mask.shape[0]), last] = rewards.to(mask)
    return per_token * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, N) per-token rewards and values → (advantages, returns).

    δ_t = r_t + γ V_{t+1} - V_t, A_t = δ_t + γλ A_{t+1}; the state after the last real token is terminal."""
    B, N = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(N)):
        nonterminal = mask[:, t + 1] if t + 1 < N else torch.zeros_like(running)
        next_value = values[:, t + 1] * nonterminal if t + 1 < N else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * nonterminal * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_eps: float) -> torch.Tensor:
    """Per-token 0.5 max((V - R)², (V_clipped - R)²), V_clipped kept within clip_eps of the old value."""
    clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) / (var.sqrt() + eps) * mask


def ppo_update(model, value_head: ValueHead, optimizer: torch.optim.Optimizer, rollout: Rollout,
               rewards: torch.Tensor, cfg: RLConfig, ref_model=None, vocab_limit: int | None = None
               ) -> dict[str, float]:
    """cfg.updates_per_batch optimizer steps (policy + value head in `optimizer`) on one rollout batch."""
    mask = rollout.completion_mask
    with torch.no_grad():
        _, _, old_values = policy_forward(model, rollout, cfg.temperature, vocab_limit, value_head)
        per_token = terminal_rewards(rewards, mask)
        if cfg.kl_coef > 0 and ref_model is not None:  # KL as a per-token reward penalty (InstructGPT)
            ref_logprobs = policy_forward(ref_model, rollout, cfg.temperature, vocab_limit)[0]
            per_token = per_token - cfg.kl_coef * kl_k3(rollout.logprobs, ref_logprobs) * mask
        advantages, returns = gae(per_token, old_values, mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, mask)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stats: dict[str, float] = {}
    for _ in range(cfg.updates_per_batch):
        logprobs, entropy, values = policy_forward(model, rollout, cfg.temperature, vocab_limit, value_head)
        policy_loss = masked_mean(-clipped_surrogate(logprobs, rollout.logprobs, advantages, cfg.clip_eps), mask)
        value_loss = masked_mean(clipped_value_loss(values, old_values, returns, cfg.value_clip_eps), mask)
        loss = policy_loss + cfg.value_coef * value_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        stats = {"loss": float(loss.detach()), "policy_loss": float(policy_loss.detach()),
                 "value_loss": float(value_loss.detach()),
                 "entropy": float(masked_mean(entropy.detach(), mask))}
    return stats
