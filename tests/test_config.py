"""The generic section loader (`from_dict`): typed sections, unknown keys and wrong types fail naming the key.

The whole file (`load_params`, missing/misspelled sections, one source of defaults) is tests/test_params.py."""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from gpt.config import ConfigError, from_dict, to_dict
from gpt.params import load_params
from tests.project_params import PROJECT_PARAMS


@dataclass(frozen=True)
class Section:
    lr: float = 1.0e-3
    steps: int = 10
    mode: Literal["cosine", "wsd"] = "cosine"
    prompts: list[str] = field(default_factory=list)
    seed: int | None = None
    out: Path = Path("out")


def test_valid_section_is_typed():
    cfg = from_dict(Section, {"lr": 3, "prompts": ["a"], "seed": None, "out": "x/y"}, "train")
    assert cfg.lr == 3.0 and isinstance(cfg.lr, float)
    assert cfg.prompts == ["a"] and cfg.out == Path("x/y")
    assert to_dict(cfg)["out"] == "x/y"


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"lr": "3e-4"}, "train.lr"),  # YAML reads 3e-4 as a string
        ({"steps": 1.5}, "train.steps"),
        ({"steps": True}, "train.steps"),
        ({"mode": "linear"}, "train.mode"),
        ({"lrr": 1.0}, "unknown key(s) ['lrr']"),
        ({"prompts": "a"}, "train.prompts"),
        ({"prompts": [1]}, "train.prompts[0]"),
        ({"seed": "x"}, "train.seed"),
    ],
)
def test_bad_values_name_the_key(data, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        from_dict(Section, data, "train")


def test_missing_keys_take_the_defaults_and_none_is_an_empty_section():
    assert from_dict(Section, {"steps": 3}, "train") == Section(steps=3)
    assert from_dict(Section, None, "train") == Section()
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        from_dict(Section, ["lr"], "train")


def test_repo_params_paths_are_valid():
    paths = load_params(PROJECT_PARAMS).paths
    assert all(not Path(p).is_absolute() for p in to_dict(paths).values())
