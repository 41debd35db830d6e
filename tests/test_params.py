"""The root `Params` object: one source of defaults, and any slip in params.yaml fails at load naming the key."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from gpt.config import ConfigError
from gpt.params import SECTIONS, ModelParams, Params, load_params
from tests.project_params import PROJECT_PARAMS, project_params, write_params


def _key_mismatches(data, obj, key: str) -> list[str]:
    """Keys of params.yaml that are not fields of `obj`, and fields of `obj` that params.yaml leaves out."""
    if isinstance(obj, ModelParams):  # written flat: preset, vocab_size and the overrides side by side
        return _key_mismatches(data, obj.to_section(), key)
    if dataclasses.is_dataclass(obj):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return _mapping_mismatches(data, fields, key)
    if isinstance(obj, dict):
        return _mapping_mismatches(data, obj, key)
    if isinstance(obj, list) and isinstance(data, list):
        # list items (prepare.sources) name only what they set; each key must still be a field
        return [f"{key}[{i}].{k}: not a field" for i, (item, value) in enumerate(zip(data, obj, strict=True))
                if dataclasses.is_dataclass(value) for k in item if k not in {f.name for f in dataclasses.fields(value)}]
    return []


def _mapping_mismatches(data, fields: dict, key: str) -> list[str]:
    if not isinstance(data, dict):
        return [f"{key}: params.yaml has {data!r} where the code has a section"]
    problems = [f"{key}.{k}: in params.yaml, not a field" for k in data if k not in fields]
    problems += [f"{key}.{k}: a field missing from params.yaml" for k in fields if k not in data]
    for name in fields.keys() & data.keys():
        problems += _key_mismatches(data[name], fields[name], f"{key}.{name}" if key else name)
    return problems


def test_params_yaml_and_the_dataclass_defaults_are_one_source():
    """Every key of params.yaml is a field of Params and every field is in params.yaml, with equal values."""
    data = yaml.safe_load(PROJECT_PARAMS.read_text(encoding="utf-8"))
    assert _key_mismatches(data, Params(), "") == []
    loaded, defaults = load_params(PROJECT_PARAMS), Params()
    for name in SECTIONS:
        assert getattr(loaded, name) == getattr(defaults, name), f"{name}: params.yaml differs from the code defaults"
    assert loaded == defaults


def test_the_project_params_load_typed():
    params = load_params(PROJECT_PARAMS)
    assert params.train.lr == pytest.approx(6.0e-3) and isinstance(params.train.lr, float)
    assert params.model.resolve(4096).vocab_size == 4096  # vocab_size null = the tokenizer's
    assert isinstance(params.evaluate.prompts, list) and params.evaluate.prompts


def test_a_misspelled_section_fails_naming_it_and_the_allowed_ones(tmp_path):
    data = project_params()
    data["trian"] = data.pop("train")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['trian'\]; allowed: \[.*'train'"):
        load_params(params_file)


def test_a_missing_section_fails_naming_it(tmp_path):
    data = project_params()
    del data["evaluate"], data["tokenize"]
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match=re.escape("missing section(s) ['tokenize', 'evaluate']")):
        load_params(params_file)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"evaluate": {"prompts": "The"}}, "evaluate.prompts: expected a list"),
        ({"evaluate": {"prompts": ["The", 3]}}, "evaluate.prompts[1]"),
        ({"evaluate": {"top_k": "forty"}}, "evaluate.top_k"),
        ({"train": {"lr": "3e-4"}}, "train.lr: expected a number, got '3e-4' (write floats like 3.0e-4"),
        ({"augment": {"apertium": {"timeout_s": "5m"}}}, "augment.apertium.timeout_s"),
        ({"prepare": {"sources": [{"kind": "files", "glob": 3}]}}, "prepare.sources[0].glob"),
        ({"paths": {"modle": "x"}}, "paths: unknown key(s) ['modle']"),
        ({"model": {"preset": "tinyy"}}, "model.preset: unknown preset 'tinyy'"),
        ({"model": {"d_modle": 64}}, "model: unknown key(s) ['d_modle']"),
        ({"model": {"n_heads": 3}}, "model.d_model"),  # 128 not divisible by 3
        ({"model": {"vocab_size": "big"}}, "model.vocab_size"),
        ({"train": {"seq_len": 512}}, "train.seq_len: 512 exceeds the model's max_seq_len 256"),
    ],
)
def test_a_bad_value_anywhere_fails_at_load_naming_the_key(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_params(write_params(tmp_path, overrides))


def test_model_overrides_are_typed_and_resolve_on_the_preset(tmp_path):
    params = load_params(write_params(tmp_path, {"model": {"preset": "qwen3-style", "n_layers": 2,
                                                           "rope_theta": 10000}}))
    assert params.model.overrides == {"n_layers": 2, "rope_theta": 10000.0}
    assert isinstance(params.model.overrides["rope_theta"], float)
    config = params.model.resolve(500)
    assert (config.n_layers, config.position, config.vocab_size) == (2, "rope", 500)
    assert params.model.to_section() == {"preset": "qwen3-style", "vocab_size": None, "n_layers": 2,
                                         "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="model.vocab_size"):
        load_params(write_params(tmp_path, {"model": {"vocab_size": 100}})).model.resolve(500)


def test_a_missing_file_or_a_non_mapping_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "params.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
