"""Qwen3-style and MoE variants equal transformers' Llama / Qwen3 / Mixtral / Qwen3-MoE on the same random weights."""

from __future__ import annotations

import pytest
import torch

from gpt.hf import from_hf, hf_architecture, to_hf, to_hf_config
from gpt.model import DecoderOnlyTransformer, ModelConfig

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=89, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, dropout=0.0, d_ff=96)
CASES = {
    "llama": ("qwen3-style", dict(qk_norm=False, n_kv_heads=2)),
    "qwen3": ("qwen3-style", dict(head_dim=24, n_kv_heads=1, tie_embeddings=False)),  # head_dim != d/heads, MQA
    "mixtral": ("moe", dict(moe_shared_expert=False, moe_norm_topk=True, moe_top_k=2, moe_d_ff=40)),
    "qwen3_moe": ("hybrid", dict(n_layers=4, moe_norm_topk=False)),  # MoE in layers 1 and 3, dense in 0 and 2
}


def build(preset: str, **overrides) -> DecoderOnlyTransformer:
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(ModelConfig.from_preset(preset, **{**BASE, **overrides})).eval()
    with torch.no_grad():  # random norm weights and a sharper router, so every mapping error would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            if "router" in name:
                p.mul_(20)
    return model


@pytest.mark.parametrize("arch", CASES)
def test_logits_and_greedy_generation_equal_transformers(arch):
    preset, overrides = CASES[arch]
    model = build(preset, **overrides)
    assert hf_architecture(model.config) == arch
    hf = to_hf(model)
    assert type(hf).__name__.lower().startswith(arch.replace("_", ""))
    ids = torch.randint(0, 89, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[0], hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    ours_gen = model.generate(ids[:, :5], 20, temperature=0)
    hf_gen = hf.generate(ids[:, :5], max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours_gen, hf_gen)


@pytest.mark.parametrize("arch", CASES)
def test_round_trip_through_transformers_keeps_config_and_weights(arch):
    preset, overrides = CASES[arch]
    model = build(preset, **overrides)
    back = from_hf(to_hf(model))
    assert to_hf_config(back.config).to_dict() == to_hf_config(model.config).to_dict()
    a, b = model.state_dict(), back.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_moe_layer_equals_qwen3_moe_sparse_block_with_switch_gating():
    """The `moe` preset's routed experts (top-1, probabilities not renormalised) = Qwen3-MoE's block."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    model = build("moe", moe_shared_expert=False)
    ours = model.blocks[0].mlp
    hf_config = transformers.Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=96, num_experts=4,
                                            num_experts_per_tok=1, norm_topk_prob=False)
    block = Qwen3MoeSparseMoeBlock(hf_config).eval()
    with torch.no_grad():
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(ours.experts_gate_up.transpose(1, 2))
        block.experts.down_proj.copy_(ours.experts_proj.transpose(1, 2))
        x = torch.randn(3, 10, 64)
        torch.testing.assert_close(ours(x)[0], block(x), atol=1e-5, rtol=1e-5)  # ours: (output, aux loss)


def test_shared_expert_configs_are_refused_for_export():
    with pytest.raises(ValueError, match="shared expert has no HF equivalent"):
        hf_architecture(ModelConfig.from_preset("moe"))

