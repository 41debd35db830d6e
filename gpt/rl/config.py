"""`RLConfig`: the knobs of one RL run (GRPO or PPO). Not yet a params.yaml section."""

from __future__ import annotations

import dataclasses
from typing import Literal

from gpt.config import ConfigError

Algorithm = Literal["grpo", "ppo"]


@dataclasses.dataclass
class RLConfig:
    algorithm: Algorithm = "grpo"
    group_size: int = 8  # completions sampled per prompt (GRPO's group; PPO uses it as plain batch size)
    max_new_tokens: int = 32
    temperature: float = 1.0  # sampling temperature; the training forward scores with the same one
    lr: float = 1.0e-4
    updates_per_batch: int = 1  # optimizer steps on one batch of rollouts (>1 makes the ratio clipping matter)
    clip_eps: float = 0.2  # PPO ratio clipping: ratio kept in [1 - eps, 1 + eps]
    normalize_std: bool = True  # GRPO: divide advantages by the group std (Dr. GRPO drops this)
    kl_coef: float = 0.0  # weight of the k3 KL estimate to the frozen reference model (0 = no reference)
    format_weight: float = 0.0  # reward for a well-formed answer (ends with the stop token), added to correctness
    max_grad_norm: float = 1.0
    # PPO only
    gamma: float = 1.0
    lam: float = 0.95
    value_coef: float = 0.5
    value_clip_eps: float = 0.2

    def __post_init__(self) -> None:
        if self.algorithm not in ("grpo", "ppo"):
            raise ConfigError(f"rl.algorithm: expected 'grpo' or 'ppo', got {self.algorithm!r}")
        for key in ("group_size", "max_new_tokens", "updates_per_batch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"rl.{key}: must be >= 1, got {getattr(self, key)}")
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ConfigError("rl.group_size: GRPO needs at least 2 completions per prompt to compare")
        if self.temperature <= 0:
            raise ConfigError(f"rl.temperature: must be > 0 (log-probs of greedy decoding are undefined), "
                              f"got {self.temperature}")
        for key in ("clip_eps", "value_clip_eps", "lr", "max_grad_norm"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"rl.{key}: must be > 0, got {getattr(self, key)}")
        for key in ("kl_coef", "format_weight", "value_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"rl.{key}: must be >= 0, got {getattr(self, key)}")
        for key in ("gamma", "lam"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"rl.{key}: must be in [0, 1], got {getattr(self, key)}")
