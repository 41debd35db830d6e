"""Request fields shared by `/v1/completions` (app.py) and `/v1/chat/completions` (chat.py): the sampling knobs
OpenAI's two endpoints have in common, declared once. Values are checked by gpt.generate.SamplingSpec, not here."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class SamplingRequest(BaseModel):
    """Sampling fields of an OpenAI request; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
