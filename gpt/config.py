"""Typed configuration machinery: a `params.yaml` section → frozen dataclass, validated before any work.

The whole file is loaded by `gpt.params.load_params()` into one `Params` object whose fields are the sections;
each stage hands each function only its own section. Every path in the project is written once, in the `paths:`
section (`PathsConfig` below; dvc.yaml reads the same values through `${paths.*}`).

`from_dict` is the one loader every section uses: unknown keys, wrong types and missing required values raise
`ConfigError` naming the full key (`train.lr`), so a typo in params.yaml fails before a stage touches any data.
Dataclasses may add checks in `__post_init__`; raise `ConfigError` there with the same `section.key` naming.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from gpt.errors import GptError

T = TypeVar("T")

PARAMS_FILE = Path("params.yaml")


class ConfigError(GptError, ValueError):
    """A params value is missing, unknown or of the wrong type/range. The message names the key."""


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (recursing into lists, dicts, optionals, nested dataclasses)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:  # Optional[X]: report X's error, noting that null is allowed too
            raise ConfigError(f"{errors[0]} (or null)")
        raise ConfigError(f"{key}: {value!r} matches none of: " + "; ".join(errors))
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        k_tp, v_tp = get_args(tp) or (Any, Any)
        return {coerce(k, k_tp, key): coerce(v, v_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key)
    if tp is float:
        # YAML reads `3e-4` as a string; accept ints as floats, never bools.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (write floats like 3.0e-4: YAML reads 3e-4 as a string)" if isinstance(value, str) else ""
            raise ConfigError(f"{key}: expected a number, got {value!r}{hint}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, section: str) -> T:
    """Build dataclass `cls` from a params mapping; unknown keys and bad types raise ConfigError naming the key."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{section}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{section}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        key = f"{section}.{name}" if section else name
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required but missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{section}: {err}") from err


def to_dict(obj: Any) -> Any:
    """Dataclass → plain dict of YAML/JSON-safe values (paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclasses.dataclass(frozen=True)
class PathsConfig:
    """Every path the pipeline reads or writes, written once (`paths:` in params.yaml)."""

    raw: Path = Path("data/raw")
    cleaned: Path = Path("data/cleaned")
    augmented: Path = Path("data/augmented")
    translation_cache: Path = Path("data/cache/translations")
    tokenizer: Path = Path("data/tokenizer")
    shards: Path = Path("data/shards")
    checkpoints: Path = Path("data/checkpoints")
    model: Path = Path("data/model")
    conversations: Path = Path("data/conversations")  # your own SFT conversation files (sft_data.sources)
    sft_data: Path = Path("data/sft")
    chat_model: Path = Path("data/chat-model")  # the sft stage's output: the fine-tuned (chat) model directory
    rl_model: Path = Path("data/rl-model")  # the rl stage's output: the chat model after RL on checkable tasks
    metrics: Path = Path("metrics")

