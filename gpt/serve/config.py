"""Server settings: where to listen and the per-request limits (`gpt serve` flags map onto these fields)."""

from __future__ import annotations

import dataclasses

from gpt.config import ConfigError


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Bind address and request limits. Prompts are also limited by the model's max_seq_len."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 64  # used when a request gives none
    max_n: int = 4
    max_stop: int = 4
    max_body_bytes: int = 65536
    max_queue: int = 16  # requests waiting for the generation worker; more get 503

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"serve.port: {self.port} is not a TCP port (0..65535)")
        for name in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "max_n", "max_stop",
                     "max_body_bytes", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name}: must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(
                f"serve.default_max_tokens: {self.default_max_tokens} exceeds serve.max_tokens {self.max_tokens}"
            )

    def limits(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "max_n",
                                              "max_stop", "max_body_bytes", "max_queue")}
