"""params.yaml `sft_data:` — which conversations the `sft_data` stage writes to `paths.sft_data`."""

from __future__ import annotations

import dataclasses
from typing import Literal

from gpt.config import ConfigError
from gpt.sft.tasks import TASK_NAMES


@dataclasses.dataclass(frozen=True)
class ConversationSource:
    """A user's conversation files: a glob relative to `paths.conversations` (or an absolute one)."""

    glob: str
    format: Literal["auto", "messages", "alpaca"] = "auto"  # auto: decided per row by its keys


@dataclasses.dataclass(frozen=True)
class DocQAConfig:
    """Questions about documented functions/classes/modules of the cleaned corpus's train split."""

    enabled: bool = True
    max_items: int = 1500
    max_answer_chars: int = 300

    def __post_init__(self) -> None:
        if self.max_items < 0 or self.max_answer_chars < 20:
            raise ConfigError("sft_data.docqa: max_items must be >= 0 and max_answer_chars >= 20, got "
                              f"{self.max_items} and {self.max_answer_chars}")


@dataclasses.dataclass(frozen=True)
class TasksConfig:
    """Generated checkable tasks (gpt/sft/tasks.py); `heldout_fraction` of each task's problems never train."""

    names: list[str] = dataclasses.field(default_factory=lambda: list(TASK_NAMES))
    per_task: int = 200
    heldout_per_task: int = 20
    heldout_fraction: float = 0.2

    def __post_init__(self) -> None:
        unknown = [name for name in self.names if name not in TASK_NAMES]
        if unknown:
            raise ConfigError(f"sft_data.tasks.names: unknown task(s) {unknown}; known: {list(TASK_NAMES)}")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"sft_data.tasks.names: listed twice: {self.names}")
        if self.per_task < 0 or self.heldout_per_task < 0:
            raise ConfigError("sft_data.tasks: per_task and heldout_per_task must be >= 0")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"sft_data.tasks.heldout_fraction: must be in (0, 1), got {self.heldout_fraction}")


@dataclasses.dataclass(frozen=True)
class SftDataConfig:
    """params.yaml `sft_data:`."""

    sources: list[ConversationSource] = dataclasses.field(default_factory=list)
    docqa: DocQAConfig = dataclasses.field(default_factory=DocQAConfig)
    tasks: TasksConfig = dataclasses.field(default_factory=TasksConfig)
    val_fraction: float = 0.05
    salt: str = "v1"
    seed: int = 0
    # a conversation with more characters (all messages together) is skipped and counted as too_long
    max_chars: int = 4000
    # generated conversations only: this fraction gets a system message, this fraction gets a second exchange
    system_fraction: float = 0.1
    multi_turn_fraction: float = 0.1

    def __post_init__(self) -> None:
        for key in ("val_fraction", "system_fraction", "multi_turn_fraction"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"sft_data.{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.max_chars < 1:
            raise ConfigError(f"sft_data.max_chars: must be >= 1, got {self.max_chars}")
