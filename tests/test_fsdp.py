"""FSDP2 through the real launcher (`torchrun --nproc_per_node=N -m stages.train`, gloo on CPU, fp32): two sharded
ranks train the same model as one process with the same global batch, with or without activation checkpointing,
with AdamW or Muon (Muon under DDP too); checkpoints are sharded (one DCP safetensors file per rank) and resume on
one process or on four ranks (reshard on load). Fast tests: the sharded checkpoint format round-trips exactly in one
process, and a damaged shard is detected and skipped like any damaged checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.train.checkpoints import CheckpointDamaged, CheckpointManager
from gpt.train.config import TrainConfig
from gpt.train.distributed import DistInfo
from gpt.train.optim import build_optimizer
from gpt.train.resume import choose_resume, fingerprint, run_identity
from tests.test_ddp import run_stage
from tests.test_train_stage import workspace, write_params  # noqa: F401  (workspace is a fixture)

# global batch 8 windows: 2 ranks x 4, or one process x 4 x 2 accumulation micro-steps
TRAIN = {"max_steps": 20, "seq_len": 32, "batch_size": 4, "tokens_per_step": 8 * 32, "eval_every": 5,
         "checkpoint_every": 5, "warmup_steps": 2, "lr": 3.0e-3, "keep_last": 10}
PRESETS = {"tiny": {"preset": "tiny"}, "qwen3-style": {"preset": "qwen3-style", "n_kv_heads": 1}}


def prepare(source: Path, target: Path, model: dict, **train) -> Path:
    shutil.copytree(source / "data/tokenizer", target / "data/tokenizer")
    shutil.copytree(source / "data/shards", target / "data/shards")
    write_params(target, train={**TRAIN, **train}, model={"vocab_size": None, "d_model": 32, "n_layers": 2,
                                                          "n_heads": 2, "max_seq_len": 64, **model})
    return target


def prepare_params(target: Path, model: dict, **train) -> None:
    write_params(target, train={**TRAIN, **train}, model={"vocab_size": None, "d_model": 32, "n_layers": 2,
                                                          "n_heads": 2, "max_seq_len": 64, **model})


def val_losses(root: Path) -> list[float]:
    states = sorted((root / "data/checkpoints").glob("step-*/state.json"))
    return [json.loads(p.read_text())["val_loss"] for p in states]


def assert_same_training(a: Path, b: Path) -> None:
    losses_a, losses_b = val_losses(a), val_losses(b)
    assert len(losses_a) == len(losses_b) >= 1
    for x, y in zip(losses_a, losses_b):
        assert abs(x - y) <= 1e-5 * abs(x), (losses_a, losses_b)
    one = safetensors.torch.load_file(a / "data/model/model.safetensors")
    two = safetensors.torch.load_file(b / "data/model/model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=2e-5, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_two_fsdp_ranks_equal_one_process(workspace, tmp_path, preset):  # noqa: F811
    single = prepare(workspace, tmp_path / "single", PRESETS[preset])
    fsdp = prepare(workspace, tmp_path / "fsdp", PRESETS[preset], parallel="fsdp")
    run_stage(single, 1)
    run_stage(fsdp, 2)
    assert_same_training(single, fsdp)
    state = json.loads((fsdp / "data/checkpoints/step-000020/state.json").read_text())
    assert state["data"]["world_size"] == 2


@pytest.mark.slow
def test_activation_checkpointing_changes_nothing(workspace, tmp_path):  # noqa: F811
    off = prepare(workspace, tmp_path / "off", PRESETS["qwen3-style"], parallel="fsdp", max_steps=10)
    on = prepare(workspace, tmp_path / "on", PRESETS["qwen3-style"], parallel="fsdp", max_steps=10,
                 activation_checkpointing=True)
    run_stage(off, 2)
    run_stage(on, 2)
    assert_same_training(off, on)


@pytest.mark.slow
def test_two_rank_fsdp_checkpoint_resumes_on_one_process(workspace, tmp_path):  # noqa: F811
    constant = {"schedule": "constant", "max_steps": 12, "checkpoint_every": 6}  # max_steps may grow on resume
    whole = prepare(workspace, tmp_path / "whole", PRESETS["tiny"], **constant)
    run_stage(whole, 1)
    split = prepare(workspace, tmp_path / "split", PRESETS["tiny"], **{**constant, "max_steps": 6},
                    parallel="fsdp")
    run_stage(split, 2)
    write_params(split, train={**TRAIN, **constant, "parallel": "fsdp"},
                 model={"vocab_size": None, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64,
                        "preset": "tiny"})
    run_stage(split, 1)
    assert json.loads((split / "data/checkpoints/step-000012/state.json").read_text())["data"]["world_size"] == 1
    assert_same_training(whole, split)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_muon_on_two_ranks_equals_one_process(workspace, tmp_path, parallel):  # noqa: F811
    muon = {"optimizer": "muon", "max_steps": 10}
    single = prepare(workspace, tmp_path / "single", PRESETS["qwen3-style"], **muon)
    split = prepare(workspace, tmp_path / parallel, PRESETS["qwen3-style"], parallel=parallel, **muon)
    run_stage(single, 1)
    run_stage(split, 2)
    assert_same_training(single, split)


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_four_ranks(workspace, tmp_path):  # noqa: F811
    # batch_size 2: the global batch of 8 windows is 4 micro-batches on one process, 2 per rank on 2, 1 on 4
    constant = {"schedule": "constant", "max_steps": 12, "checkpoint_every": 6, "batch_size": 2}
    whole = prepare(workspace, tmp_path / "whole", PRESETS["qwen3-style"], **constant)
    run_stage(whole, 1)
    split = prepare(workspace, tmp_path / "split", PRESETS["qwen3-style"], **{**constant, "max_steps": 6},
                    parallel="fsdp")
    run_stage(split, 2)
    shards = sorted(p.name for p in (split / "data/checkpoints/step-000006/shards").iterdir())
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards)
    prepare_params(split, PRESETS["qwen3-style"], **constant, parallel="fsdp")
    run_stage(split, 4)
    state = json.loads((split / "data/checkpoints/step-000012/state.json").read_text())
    assert state["data"]["world_size"] == 4 and len([f for f in state["files"] if f.startswith("shards/")]) == 4
    assert_same_training(whole, split)


def _toy(seed: int, optimizer: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = DecoderOnlyTransformer(ModelConfig.from_preset("qwen3-style", vocab_size=64, n_layers=2, d_model=32,
                                                           n_heads=2, n_kv_heads=1, max_seq_len=32, dropout=0.0))
    return model, build_optimizer(model, TrainConfig(optimizer=optimizer), "cpu", "fp32")


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    _, loss = model(ids, labels=ids)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_sharded_checkpoint_round_trips_exactly(tmp_path, optimizer):
    """Written and read by one process (the same code every FSDP rank runs on its shard): weights, optimizer state
    and hyper-parameters come back exactly, and training continues bit for bit."""
    model, opt = _toy(0, optimizer)
    for seed in range(3):
        _step(model, opt, seed)
    manager = CheckpointManager(tmp_path)
    path = manager.save_sharded(model, opt, {"step": 3}, DistInfo())
    state = manager.verify(path)
    assert state["format"] == "sharded" and not (path / "model.safetensors").exists()
    assert sorted(p.name for p in (path / "shards").iterdir()) == ["shard-00001-model-00001-of-00001.safetensors"]
    model2, opt2 = _toy(1, optimizer)  # other weights, empty optimizer state
    manager.load(path, model2, opt2)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for seed in range(3, 5):
        _step(model, opt, seed)
        _step(model2, opt2, seed)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_damaged_shard_is_set_aside_and_resume_falls_back(tmp_path):
    model, opt = _toy(0, "adamw")
    cfg = TrainConfig()
    identity = run_identity(cfg, {"n_layers": 2}, {}, 1)
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (1, 2):
        _step(model, opt, step)
        manager.save_sharded(model, opt, {"step": step, "identity": identity, "fingerprint": fingerprint(identity)},
                             DistInfo())
    shard = next((tmp_path / "step-000002/shards").iterdir())
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointDamaged, match="shards/shard-00001"):
        manager.verify(tmp_path / "step-000002")
    assert choose_resume(manager, identity, cfg) == tmp_path / "step-000001"
    assert (tmp_path / "step-000002.damaged-1").is_dir()
