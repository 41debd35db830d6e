"""The whole `params.yaml` as one typed, frozen `Params` object, validated at every stage start.

Each section is the dataclass its own module owns (`TrainConfig` in gpt/train/config.py, `EvalConfig` in
gpt/eval.py, ...); this module only gathers them, so it imports the section modules and none of them imports it.
`load_params()` reads the file once and fails with a `ConfigError` naming the key for a misspelled or missing
section, an unknown key or a bad value anywhere in the file, so a slip in `evaluate:` stops `prepare`, not the
evaluation after an hour of training. A stage then hands each function only its own section (`params.train`).

The dataclass defaults equal params.yaml's values (tests/test_params.py proves it), so code that builds a
section by hand gets what the pipeline runs. A new section (e.g. `sft:`) is one field of `Params` and one line
in params.yaml.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from gpt.augment import AugmentConfig
from gpt.config import PARAMS_FILE, ConfigError, PathsConfig, coerce, from_dict
from gpt.data.prepare import PrepareConfig
from gpt.data.tokenize import TokenizeConfig
from gpt.eval import EvalConfig
from gpt.model.config import PRESETS, ModelConfig, model_config_from_params
from gpt.rl.config import RLConfig
from gpt.sft.config import SftDataConfig
from gpt.sft.train import SftConfig
from gpt.tokenizer import TokenizerConfig
from gpt.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class ModelParams:
    """params.yaml `model:`: a named preset plus any `ModelConfig` field as an override, written flat:

        model:
          preset: tiny
          vocab_size: null    # null = the tokenizer's
          n_layers: 6         # any other ModelConfig field lands in `overrides`
    """

    preset: str = "tiny"
    vocab_size: int | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Build the config now (the preset's vocabulary stands in for the tokenizer's), so an unknown preset, an
        # unknown field or a bad value fails at load time, naming `model.<key>`.
        self.resolve(None)

    @classmethod
    def from_section(cls, data: dict[str, Any] | None, section: str = "model") -> ModelParams:
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{section}: expected a mapping, got {type(data).__name__}")
        preset = data.get("preset", cls.preset)
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(f"{section}.preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        vocab_size = coerce(data.get("vocab_size"), int | None, f"{section}.vocab_size")
        overrides = {k: v for k, v in data.items() if k not in ("preset", "vocab_size")}
        # the values as ModelConfig types them (3 → 3.0 for a float field); unknown keys fail here, naming them
        typed = from_dict(ModelConfig, {**PRESETS[preset], **overrides}, section)
        return cls(preset, vocab_size, {k: getattr(typed, k) for k in overrides})

    def resolve(self, tokenizer_vocab_size: int | None) -> ModelConfig:
        """The model's config; vocab_size null = the tokenizer's (a smaller explicit value is an error)."""
        return model_config_from_params(self.to_section(), tokenizer_vocab_size)

    def to_section(self) -> dict[str, Any]:
        """Back to params.yaml's flat form."""
        return {"preset": self.preset, "vocab_size": self.vocab_size, **self.overrides}


@dataclasses.dataclass(frozen=True)
class Params:
    """Every section of params.yaml, typed. Field names are the section names."""

    paths: PathsConfig = dataclasses.field(default_factory=PathsConfig)
    prepare: PrepareConfig = dataclasses.field(default_factory=PrepareConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = dataclasses.field(default_factory=TokenizeConfig)
    model: ModelParams = dataclasses.field(default_factory=ModelParams)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    sft_data: SftDataConfig = dataclasses.field(default_factory=SftDataConfig)
    sft: SftConfig = dataclasses.field(default_factory=SftConfig)
    rl: RLConfig = dataclasses.field(default_factory=RLConfig)

    def __post_init__(self) -> None:
        # checks that need two sections
        max_seq_len = self.model.resolve(None).max_seq_len
        if self.train.seq_len > max_seq_len:
            raise ConfigError(f"train.seq_len: {self.train.seq_len} exceeds the model's max_seq_len {max_seq_len} "
                              f"(preset {self.model.preset!r}); lower it or set model.max_seq_len")


SECTIONS = tuple(f.name for f in dataclasses.fields(Params))


def _parse_section(cls: type, data: Any, name: str) -> Any:
    if hasattr(cls, "from_section"):
        return cls.from_section(data, name)
    return from_dict(cls, data, name)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate the whole params file; any slip raises ConfigError naming the section or key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (run from the project root)")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections {list(SECTIONS)}")
    unknown = [name for name in data if name not in SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {unknown}; allowed: {list(SECTIONS)}")
    missing = [name for name in SECTIONS if name not in data]
    if missing:
        raise ConfigError(f"{path}: missing section(s) {missing}; every section of {list(SECTIONS)} must be present")
    types = typing.get_type_hints(Params)
    return Params(**{name: _parse_section(types[name], data[name], name) for name in SECTIONS})
