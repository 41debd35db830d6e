"""Conversion between our `DecoderOnlyTransformer` and Hugging Face `transformers` causal LMs.

GPT-2 (`GPT2LMHeadModel`) is the correctness anchor of the GPT-2 block: the same weights must give the same
logits. HF GPT-2 stores its projections as `Conv1D` with weights shaped (in, out), the transpose of
`nn.Linear`; its fused `c_attn` has the same [q | k | v] layout as our `attn.qkv`.

The state-dict functions work on plain tensors and import nothing from transformers; the `*_model`
functions build or read a transformers model (transformers is imported only there).
"""

from __future__ import annotations

from typing import Any

import torch

from gpt.model import DecoderOnlyTransformer, ModelConfig

_GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
_FROM_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                        "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}


# ---------------------------------------------------------------- GPT-2
def check_gpt2_compatible(config: ModelConfig) -> None:
    """GPT-2's HF architecture has LayerNorm, learned positions, a GELU-style MLP, MHA, no QK-norm, no MoE."""
    problems = [
        msg for ok, msg in [
            (config.norm == "layernorm", "norm must be layernorm"),
            (config.position == "learned", "position must be learned"),
            (config.mlp == "gelu", "mlp must be gelu"),
            (config.kv_heads == config.n_heads, "n_kv_heads must equal n_heads"),
            (config.head_dim is None, "head_dim must be d_model / n_heads"),
            (not config.qk_norm, "qk_norm must be off"),
            (config.moe_n_experts == 0, "no MoE layers"),
        ] if not ok
    ]
    if problems:
        raise ValueError("model is not a GPT-2 architecture: " + ", ".join(problems))


def gpt2_config_to_hf(config: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None) -> Any:
    """GPT2Config for our config; pass the tokenizer's BOS/EOS ids (GPT-2's default 50256 is rarely right here)."""
    from transformers import GPT2Config

    check_gpt2_compatible(config)
    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.max_seq_len, n_embd=config.d_model,
        n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.resolved_d_ff,
        activation_function=_GPT2_ACTIVATIONS[config.activation], resid_pdrop=config.dropout,
        embd_pdrop=config.dropout, attn_pdrop=config.dropout, layer_norm_epsilon=config.layer_norm_eps,
        initializer_range=config.init_std, tie_word_embeddings=config.tie_embeddings,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id,
    )


def gpt2_config_from_hf(hf_config: Any) -> ModelConfig:
    activation = _FROM_HF_ACTIVATIONS.get(hf_config.activation_function)
    if activation is None:
        raise ValueError(f"unsupported GPT-2 activation {hf_config.activation_function!r}")
    return ModelConfig(
        vocab_size=hf_config.vocab_size, d_model=hf_config.n_embd, n_layers=hf_config.n_layer,
        n_heads=hf_config.n_head, max_seq_len=hf_config.n_positions, dropout=hf_config.resid_pdrop,
        bias=True, activation=activation, layer_norm_eps=hf_config.layer_norm_epsilon,
        init_std=hf_config.initializer_range,
        d_ff=None if hf_config.n_inner in (None, 4 * hf_config.n_embd) else hf_config.n_inner,
        tie_embeddings=getattr(hf_config, "tie_word_embeddings", True),
    )


def _gpt2_names(config: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our name, HF name, transposed) for every tensor; biases included when our model has them."""
    pairs = [("tok_embeddings.weight", "transformer.wte.weight", False),
             ("positions.wpe.weight", "transformer.wpe.weight", False)]
    for i in range(config.n_layers):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for our_mod, hf_mod, conv in [("attn_norm", "ln_1", False), ("attn.qkv", "attn.c_attn", True),
                                      ("attn.out", "attn.c_proj", True), ("mlp_norm", "ln_2", False),
                                      ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]:
            pairs.append((ours + our_mod + ".weight", hf + hf_mod + ".weight", conv))
            pairs.append((ours + our_mod + ".bias", hf + hf_mod + ".bias", False))
    pairs += [("final_norm.weight", "transformer.ln_f.weight", False),
              ("final_norm.bias", "transformer.ln_f.bias", False),
              ("lm_head.weight", "lm_head.weight", False)]
    return pairs


def to_hf_gpt2_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict → GPT2LMHeadModel's. A bias-free model gets zero biases (GPT-2 always has them)."""
    check_gpt2_compatible(config)
    out = {}
    for ours, hf, transposed in _gpt2_names(config):
        if ours == "lm_head.weight" and ours not in state:
            ours = "tok_embeddings.weight"  # tied
        if ours in state:
            tensor = state[ours]
            out[hf] = tensor.t().contiguous() if transposed else tensor.clone()
        elif ours.endswith(".bias"):
            weight = state[ours[: -len("bias")] + "weight"]
            out[hf] = torch.zeros(weight.shape[0], dtype=weight.dtype)  # Linear weight is (out, in)
    return out


def from_hf_gpt2_state_dict(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict → ours (only the tensors our config has)."""
    out = {}
    for ours, hf, transposed in _gpt2_names(config):
        if ours.endswith(".bias") and not config.bias:
            continue
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue
        if hf == "lm_head.weight" and hf not in hf_state:
            hf = "transformer.wte.weight"
        tensor = hf_state[hf]
        out[ours] = tensor.t().contiguous() if transposed else tensor.clone()
    return out


def to_hf_gpt2(model: DecoderOnlyTransformer, bos_token_id: int | None = None,
               eos_token_id: int | None = None) -> Any:
    """Our GPT-2-architecture model → an equivalent `transformers.GPT2LMHeadModel` (eval mode, same dtype)."""
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel(gpt2_config_to_hf(model.config, bos_token_id, eos_token_id))
    state = to_hf_gpt2_state_dict(model.state_dict(), model.config)
    _load_strict(hf_model, state)
    return hf_model.to(model.tok_embeddings.weight.dtype).eval()


def from_hf_gpt2(hf_model: Any) -> DecoderOnlyTransformer:
    """A `transformers.GPT2LMHeadModel` → our model with the same weights (eval mode)."""
    config = gpt2_config_from_hf(hf_model.config)
    model = DecoderOnlyTransformer(config)
    state = from_hf_gpt2_state_dict(hf_model.state_dict(), config)
    _load_strict(model, state)
    return model.eval()


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """load_state_dict that tolerates only tied/derived entries being absent, and fails on anything else."""
    result = module.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"}
    missing = [k for k in result.missing_keys if k not in tied and not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or result.unexpected_keys:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {result.unexpected_keys}")
