"""Our GPT-2 equals Hugging Face `GPT2LMHeadModel` on the same random weights (the correctness anchor)."""

from __future__ import annotations

import pytest
import torch

from gpt.hf import from_hf_gpt2, to_hf_gpt2, to_hf_gpt2_state_dict
from gpt.model import DecoderOnlyTransformer, ModelConfig

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # GPT-2 proper: tanh GELU, biases, tied head
    "gpt2-like": dict(vocab_size=101, d_model=32, n_layers=2, n_heads=4, max_seq_len=48, activation="gelu_tanh"),
    # exact GELU, no biases (exported as zero biases), untied head, 2 heads of 24, 3 layers
    "variant": dict(vocab_size=67, d_model=48, n_layers=3, n_heads=2, max_seq_len=40, activation="gelu",
                    bias=False, tie_embeddings=False, layer_norm_eps=1e-6, d_ff=80),
}


def build(name: str) -> DecoderOnlyTransformer:
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(ModelConfig(dropout=0.0, **CONFIGS[name])).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped weight/bias would show
        for name_, p in model.named_parameters():
            if "norm" in name_:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_greedy_generation_equal_hf(name):
    model = build(name)
    hf = to_hf_gpt2(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids)[0], hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    new = 15
    ours_gen = model.generate(ids[:, :6], new, temperature=0)
    hf_gen = hf.generate(ids[:, :6], max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    assert torch.equal(ours_gen, hf_gen)


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_model_converts_back_to_the_same_weights(name):
    model = build(name)
    back = from_hf_gpt2(to_hf_gpt2(model))
    assert back.config == model.config.replace(bias=True)  # GPT-2 always has biases
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(back(ids)[0], model(ids)[0])


def test_hf_initialised_gpt2_loads_into_our_model():
    hf_config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=24, n_layer=2, n_head=3,
                                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    ours = from_hf_gpt2(hf)
    assert ours.config.activation == "gelu_tanh"  # GPT-2's default "gelu_new"
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert (ours(ids)[0] - hf(ids).logits).abs().max() <= 1e-4


def test_conv1d_weights_are_transposed():
    model = build("gpt2-like")
    hf_state = to_hf_gpt2_state_dict(model.state_dict(), model.config)
    ours = model.blocks[0].attn.qkv.weight  # Linear: (out=3C, in=C)
    assert hf_state["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    assert torch.equal(hf_state["transformer.h.0.attn.c_attn.weight"], ours.t())


def test_non_gpt2_architectures_are_refused():
    model = DecoderOnlyTransformer(ModelConfig.from_preset("qwen3-style", vocab_size=50, d_model=32, n_layers=1))
    with pytest.raises(ValueError, match="not a GPT-2 architecture: norm must be layernorm"):
        to_hf_gpt2(model)
