"""The model directory (gpt.model_dir): save → load is bit-exact, mismatches and damage give ModelDirError,
writes are atomic; the whole directory, its lineage (old files too) and loading for inference."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from gpt.model_dir import (
    LINEAGE_FILE,
    Lineage,
    ModelDirError,
    load,
    load_config,
    load_metadata,
    load_model,
    read_lineage,
    save_model,
    save_quantized,
    write_model_dir,
)
from gpt.quantize import Int8Linear
from gpt.tokenizer import Tokenizer, TokenizerError
from tests.test_model import build, small


@pytest.mark.parametrize("preset, overrides", [("tiny", {}), ("tiny", {"tie_embeddings": False}), ("hybrid", {})])
def test_save_load_round_trip_is_bit_exact(tmp_path, preset, overrides):
    model = build(small(preset, **overrides))
    save_model(model, tmp_path / "m", metadata={"step": 7})
    loaded = load_model(tmp_path / "m")
    assert loaded.config == model.config
    assert not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 97, (2, 9))
    assert torch.equal(model(ids)[0], loaded(ids)[0])
    assert load_metadata(tmp_path / "m") == {"step": 7}
    assert load_config(tmp_path / "m") == model.config
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.tok_embeddings.weight


def test_files_are_safetensors_and_json_and_nothing_else_is_touched(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"keep me")
    save_model(build(small()), tmp_path)
    save_model(build(small(), seed=1), tmp_path)  # overwrite in place
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.model"]  # no temp files left
    assert (tmp_path / "tokenizer.model").read_bytes() == b"keep me"
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # tied weight stored once
    assert json.loads((tmp_path / "config.json").read_text())["config"]["d_model"] == 32


def test_saving_the_same_weights_twice_gives_identical_bytes(tmp_path):
    model = build(small())
    save_model(model, tmp_path / "a", metadata={"step": 1, "loss": 2.5})
    save_model(model, tmp_path / "b", metadata={"loss": 2.5, "step": 1})
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_load_with_dtype(tmp_path):
    save_model(build(small()), tmp_path)
    assert load_model(tmp_path, dtype=torch.bfloat16).tok_embeddings.weight.dtype == torch.bfloat16
    save_model(load_model(tmp_path, dtype=torch.bfloat16), tmp_path / "bf16")
    assert load_model(tmp_path / "bf16").tok_embeddings.weight.dtype == torch.bfloat16  # default: as saved


def test_config_that_does_not_match_the_weights_is_rejected(tmp_path):
    save_model(build(small()), tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["config"]["d_model"] = 64
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ModelDirError, match="does not match its config.json.*shape"):
        load_model(tmp_path)
    doc["config"]["d_model"], doc["config"]["n_layers"] = 32, 3
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ModelDirError, match="missing tensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").unlink(), "not found"),
    (lambda d: (d / "model.safetensors").unlink(), "not found"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "config.json").write_text('{"d_model": 3}'), "not a gpt-pipeline-model config"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "cannot read"),
    (lambda d: (d / "config.json").write_text(
        '{"format": "gpt-pipeline-model", "version": 1, "config": {"d_model": 30, "n_heads": 4}}'),
     "invalid model config.*not divisible"),
])
def test_damaged_model_dirs_raise_model_dir_error(tmp_path, damage, message):
    save_model(build(small()), tmp_path)
    damage(tmp_path)
    with pytest.raises(ModelDirError, match=message):
        load_model(tmp_path)


# ---------------------------------------------------------------- the whole directory and its lineage
def test_write_model_dir_writes_the_whole_directory_and_replaces_it_whole(tiny_model_dir, tmp_path):
    tok = Tokenizer.load(tiny_model_dir)
    model = load_model(tiny_model_dir)
    lineage = Lineage(tokenizer_sha256=tok.sha256, step=5, val_loss=2.5, seq_len=32, params={"train": {"lr": 1.0}})
    out = write_model_dir(model, tmp_path / "model", tok.path, lineage)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "lineage.json", "model.safetensors",
                                                    "tokenizer.model"]
    assert read_lineage(out) == lineage
    assert load_metadata(out) == {"step": 5, "val_loss": 2.5}
    loaded = load(out, name="m")
    assert loaded.lineage == lineage and loaded.tokenizer.sha256 == tok.sha256 and loaded.name == "m"
    (out / "stale.txt").write_text("from the previous run")
    write_model_dir(model, out, tok.path, Lineage(step=6))
    assert not (out / "stale.txt").exists() and read_lineage(out).step == 6  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp directories left


def test_lineage_keeps_unknown_keys_and_reads_old_files(tmp_path):
    old = {"tokenizer_sha256": "ab" * 32, "step": 3, "val_loss": None, "imported_from": "/x",
           "params": {"train": {"seq_len": 48}}, "future_field": [1, 2]}
    (tmp_path / LINEAGE_FILE).write_text(json.dumps(old))
    lineage = read_lineage(tmp_path)
    assert (lineage.step, lineage.val_loss, lineage.seq_len) == (3, None, 48)  # seq_len from params.train
    assert lineage.extra == {"imported_from": "/x", "future_field": [1, 2]}
    assert {**lineage.to_dict(), "val_loss": None, "seq_len": 48} == {**old, "seq_len": 48}
    assert read_lineage(tmp_path / "nowhere") is None
    (tmp_path / LINEAGE_FILE).write_text("[1]")
    with pytest.raises(ModelDirError, match="JSON object"):
        read_lineage(tmp_path)


def test_load_model_loads_every_variant(tiny_model_dir, tmp_path):
    int8 = load_model(save_quantized(tiny_model_dir, tmp_path / "int8", "int8"))
    assert any(isinstance(m, Int8Linear) for m in int8.modules())
    half = load_model(save_quantized(tiny_model_dir, tmp_path / "fp16", "fp16"))
    assert half.tok_embeddings.weight.dtype == torch.float16
    assert read_lineage(tmp_path / "int8") == read_lineage(tiny_model_dir)  # the copies keep the lineage


def test_load_names_what_is_missing(tiny_model_dir, tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        load(tmp_path / "nowhere")
    save_model(load_model(tiny_model_dir), tmp_path / "no-tokenizer")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load(tmp_path / "no-tokenizer")
