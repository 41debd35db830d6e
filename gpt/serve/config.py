"""Server settings: where to listen, who may call, and the per-request and per-connection limits (`gpt serve` flags
map onto these fields)."""

from __future__ import annotations

import dataclasses

from gpt.config import ConfigError

API_KEY_ENV = "GPT_API_KEY"  # `gpt serve` reads the API key from here when --api-key is not given


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """Bind address, access control and limits. Prompts are also limited by the model's max_seq_len."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 64  # used when a request gives none
    max_n: int = 4
    max_stop: int = 4
    max_body_bytes: int = 65536
    # Requests waiting for the generation worker; more get 503 + Retry-After. 64 lets 50 clients of the default
    # model all wait their turn; the price is latency: the last of them waits for every generation ahead of it.
    max_queue: int = 64
    # Generations decoded together (continuous batching, gpt/serve/batch.py): one KV-cache slot of max_seq_len
    # positions each, allocated at start. 1 = one generation at a time, the plain batch-1 path.
    max_batch: int = 8
    # access control: a Bearer key for /v1/* (None = open), Host names accepted besides IP literals and
    # localhost (DNS-rebinding guard; "*" accepts any)
    api_key: str | None = dataclasses.field(default=None, repr=False)
    allowed_hosts: tuple[str, ...] = ()
    # slow or idle clients: seconds to send a request's headers, then its body; open connections at most
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 256
    drain_timeout: float = 10.0  # on SIGTERM: seconds running requests may finish before they are cancelled

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"serve.port: {self.port} is not a TCP port (0..65535)")
        for name in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "max_n", "max_stop",
                     "max_body_bytes", "max_queue", "max_batch", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("header_timeout", "body_timeout", "drain_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"serve.{name}: must be > 0 seconds, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens:
            raise ConfigError(
                f"serve.default_max_tokens: {self.default_max_tokens} exceeds serve.max_tokens {self.max_tokens}"
            )
        if self.api_key is not None and (not self.api_key or any(c.isspace() for c in self.api_key)):
            raise ConfigError("serve.api_key: must be non-empty and contain no whitespace")
        object.__setattr__(self, "allowed_hosts", tuple(h.lower() for h in self.allowed_hosts))

    def limits(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "max_n",
                                              "max_stop", "max_body_bytes", "max_queue", "max_batch")}
