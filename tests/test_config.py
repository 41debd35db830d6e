"""The params loader: typed sections, unknown keys and wrong types fail naming the key."""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from gpt.config import ConfigError, PathsConfig, from_dict, load_paths, load_section, to_dict


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


def test_load_section_from_file(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("paths:\n  raw: somewhere/raw\ntrain:\n  lr: 3.0e-4\n")
    assert load_paths(params).raw == Path("somewhere/raw")
    assert load_paths(params).cleaned == PathsConfig().cleaned
    assert load_section("train", Section, params).lr == pytest.approx(3.0e-4)
    assert load_section("missing", Section, params) == Section()
    with pytest.raises(ConfigError, match="not found"):
        load_paths(tmp_path / "nope.yaml")


def test_repo_params_paths_are_valid():
    root = Path(__file__).resolve().parents[1]
    paths = load_paths(root / "params.yaml")
    assert all(not Path(p).is_absolute() for p in to_dict(paths).values())
