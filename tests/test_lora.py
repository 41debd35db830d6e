"""LoRA (gpt/sft/lora.py): adapters start as the identity, merge exactly, train alone, save and load."""

from __future__ import annotations

import pytest
import torch

from gpt.config import ConfigError
from gpt.model import DecoderOnlyTransformer
from gpt.model.config import PRESETS, ModelConfig
from gpt.sft.lora import (
    LoraConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    optimizer_state_bytes,
    parameter_counts,
    save_adapter,
)
from gpt.train.config import TrainConfig
from gpt.train.device import Precision
from gpt.train.optim import build_optimizer
from gpt.train.step import LabeledWindows, train_step

SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)


def model_of(preset: str = "tiny") -> DecoderOnlyTransformer:
    torch.manual_seed(0)
    return DecoderOnlyTransformer(ModelConfig(**{**PRESETS[preset], **SMALL})).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def randomise_adapters(model) -> None:
    torch.manual_seed(1)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)


IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("preset", ["tiny", "qwen3-style", "moe"])
def test_zero_initialised_adapters_give_the_base_logits_exactly(preset):
    model = model_of(preset)
    base = logits(model, IDS)
    names = apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    assert names and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert not any(n.endswith("router") for n in names)
    assert torch.equal(logits(model, IDS), base)


def test_merged_equals_unmerged_and_is_a_plain_model():
    model = model_of()
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    randomise_adapters(model)
    unmerged = logits(model, IDS)
    assert not torch.equal(unmerged, logits(model_of(), IDS))  # the adapters do something
    merge_lora(model)
    assert not lora_layers(model)
    assert set(model.state_dict()) == set(model_of().state_dict())
    assert (logits(model, IDS) - unmerged).abs().max() <= 1e-5


def test_targets_choose_the_layers_and_unknown_ones_are_named():
    model = model_of()
    assert apply_lora(model, LoraConfig(rank=2, targets=["attention"])) == [
        "blocks.0.attn.qkv", "blocks.0.attn.out", "blocks.1.attn.qkv", "blocks.1.attn.out"]
    assert apply_lora(model_of(), LoraConfig(rank=2, targets=["fc"])) == ["blocks.0.mlp.fc", "blocks.1.mlp.fc"]
    with pytest.raises(ConfigError, match=r"sft.lora.targets: \['gate_up'\]"):
        apply_lora(model_of(), LoraConfig(rank=2, targets=["mlp", "gate_up"]))  # GELU MLP has no gate_up
    with pytest.raises(ConfigError, match="sft.lora.rank"):
        LoraConfig(rank=-1)


def test_only_adapter_parameters_change_in_training_and_the_optimizer_holds_only_them():
    model = model_of().train()
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counts = parameter_counts(model)
    adapters = sum(v.numel() for v in adapter_state_dict(model).values())
    assert counts["trainable"] == adapters < counts["total"] / 5
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, warmup_steps=0, optimizer="adamw"), "cpu")
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == adapters
    windows = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(3))
    labels = windows.clone()
    labels[:, :8] = -100  # score only the second half, as SFT scores only assistant tokens
    for _ in range(3):
        train_step(model, optimizer, [LabeledWindows(windows, labels)], Precision("fp32", "cpu"), 1.0)
    after = model.state_dict()
    for key, value in before.items():
        if "lora_" in key:
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key
    assert optimizer_state_bytes(optimizer) == 2 * 4 * adapters + 4 * len(optimizer.state)  # m, v + a step each


def test_adapters_saved_separately_load_back_onto_the_base(tmp_path):
    model = model_of()
    cfg = LoraConfig(rank=4, alpha=8.0, targets=["attention", "mlp"])
    apply_lora(model, cfg)
    randomise_adapters(model)
    path = save_adapter(adapter_state_dict(model), tmp_path / "adapter.safetensors", cfg)
    again = load_adapter(model_of(), path)
    assert torch.equal(logits(again, IDS), logits(model, IDS))
    assert all(not p.requires_grad for n, p in again.named_parameters() if "lora_" not in n)
