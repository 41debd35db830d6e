"""Conversion between our `DecoderOnlyTransformer` and Hugging Face `transformers` causal LMs.

`to_hf(model)` / `from_hf(hf_model)` pick the transformers architecture that computes exactly what a config
computes: GPT-2 (LayerNorm, learned positions, GELU MLP), Llama (RMSNorm, RoPE, SwiGLU, GQA), Qwen3 (+ QK-norm),
Mixtral (+ MoE in every layer) or Qwen3-MoE (+ QK-norm, MoE every k-th layer). These are the correctness
anchors of our blocks: the same weights must give the same logits.

GPT-2 (`GPT2LMHeadModel`) anchors the seed's block. HF GPT-2 stores its projections as `Conv1D` with weights shaped (in, out), the transpose of
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


# ---------------------------------------------------------------- Llama family (Llama, Qwen3, Mixtral, Qwen3-MoE)
# All four share the names model.embed_tokens / model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
# post_attention_layernorm, mlp.*} / model.norm / lm_head. Our fused qkv and gate_up are split into HF's separate
# projections; HF stores stacked expert weights for F.linear (E, out, in), we store them for x @ W (E, in, out).
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


def hf_architecture(config: ModelConfig) -> str:
    """The transformers architecture computing exactly what `config` computes, or ValueError saying why none does."""
    if config.position == "learned":
        check_gpt2_compatible(config)
        return "gpt2"
    problems = [msg for ok, msg in [
        (config.norm == "rmsnorm", "norm must be rmsnorm"),
        (config.mlp == "swiglu", "mlp must be swiglu"),
        (not config.moe_shared_expert, "a shared expert has no HF equivalent (Llama 4's MoE routes differently)"),
        (config.moe_capacity_factor is None, "capacity-based token dropping has no HF equivalent"),
    ] if not ok]
    if problems:
        raise ValueError("no transformers architecture matches this config: " + ", ".join(problems))
    if config.moe_n_experts == 0:
        if config.qk_norm and config.bias:
            raise ValueError("no transformers architecture matches this config: Qwen3 has no MLP biases")
        return "qwen3" if config.qk_norm else "llama"
    if config.bias:
        raise ValueError("no transformers architecture matches this config: HF MoE models have no biases")
    if config.qk_norm:
        return "qwen3_moe"
    if config.moe_every != 1 or not config.moe_norm_topk:
        raise ValueError("Mixtral needs MoE in every layer with renormalised top-k (or use qk_norm for Qwen3-MoE)")
    return "mixtral"


def to_hf_config(config: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None) -> Any:
    """The transformers config of `hf_architecture(config)`."""
    import transformers

    arch = hf_architecture(config)
    if arch == "gpt2":
        return gpt2_config_to_hf(config, bos_token_id, eos_token_id)
    kwargs = dict(
        vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.resolved_d_ff,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads,
        head_dim=config.resolved_head_dim, hidden_act="silu", max_position_embeddings=config.max_seq_len,
        initializer_range=config.init_std, rms_norm_eps=config.layer_norm_eps,
        tie_word_embeddings=config.tie_embeddings, attention_dropout=config.dropout,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=config.bias, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=None,
    )
    if arch == "llama":
        return transformers.LlamaConfig(mlp_bias=config.bias, **kwargs)
    if arch == "qwen3":
        return transformers.Qwen3Config(**kwargs)
    moe = dict(num_experts_per_tok=config.moe_top_k, router_aux_loss_coef=config.moe_aux_loss_coef)
    if arch == "mixtral":
        kwargs["intermediate_size"] = config.resolved_moe_d_ff
        return transformers.MixtralConfig(num_local_experts=config.moe_n_experts, **moe, **kwargs)
    return transformers.Qwen3MoeConfig(
        num_experts=config.moe_n_experts, moe_intermediate_size=config.resolved_moe_d_ff,
        norm_topk_prob=config.moe_norm_topk, decoder_sparse_step=config.moe_every, mlp_only_layers=[], **moe, **kwargs)


def config_from_hf(hf_config: Any) -> ModelConfig:
    """Our config for a transformers GPT-2 / Llama / Qwen3 / Mixtral / Qwen3-MoE config."""
    arch = hf_config.model_type
    if arch == "gpt2":
        return gpt2_config_from_hf(hf_config)
    if arch not in ("llama", "qwen3", "mixtral", "qwen3_moe"):
        raise ValueError(f"unsupported transformers architecture {arch!r}")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported RoPE scaling {rope.get('rope_type')!r}")
    fields = dict(
        vocab_size=hf_config.vocab_size, d_model=hf_config.hidden_size, n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads, n_kv_heads=hf_config.num_key_value_heads,
        head_dim=getattr(hf_config, "head_dim", None), max_seq_len=hf_config.max_position_embeddings,
        dropout=float(hf_config.attention_dropout), bias=bool(getattr(hf_config, "attention_bias", False)),
        layer_norm_eps=hf_config.rms_norm_eps, init_std=hf_config.initializer_range, norm="rmsnorm",
        position="rope", rope_theta=float(rope.get("rope_theta", 10000.0)), mlp="swiglu",
        d_ff=hf_config.intermediate_size, qk_norm=arch.startswith("qwen3"),
        tie_embeddings=bool(hf_config.tie_word_embeddings),
    )
    if arch == "mixtral":
        fields.update(moe_n_experts=hf_config.num_local_experts, moe_top_k=hf_config.num_experts_per_tok,
                      moe_d_ff=hf_config.intermediate_size, moe_norm_topk=True)
    elif arch == "qwen3_moe":
        if hf_config.mlp_only_layers:
            raise ValueError("Qwen3-MoE mlp_only_layers are not supported (use decoder_sparse_step)")
        fields.update(moe_n_experts=hf_config.num_experts, moe_top_k=hf_config.num_experts_per_tok,
                      moe_d_ff=hf_config.moe_intermediate_size, moe_norm_topk=hf_config.norm_topk_prob,
                      moe_every=hf_config.decoder_sparse_step)
    if fields["head_dim"] == fields["d_model"] // fields["n_heads"]:
        fields["head_dim"] = None
    if "moe_n_experts" in fields:
        fields["moe_aux_loss_coef"] = hf_config.router_aux_loss_coef
    return ModelConfig(**fields)


def _llama_layer_to_hf(state, config: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    ours, hf = f"blocks.{i}.", f"model.layers.{i}."
    hd, nh, nkv = config.resolved_head_dim, config.n_heads, config.kv_heads
    out = {hf + "input_layernorm.weight": state[ours + "attn_norm.weight"],
           hf + "post_attention_layernorm.weight": state[ours + "mlp_norm.weight"],
           hf + "self_attn.o_proj.weight": state[ours + "attn.out.weight"]}
    for kind in ("weight", "bias") if config.bias else ("weight",):
        q, k, v = state[ours + f"attn.qkv.{kind}"].split([nh * hd, nkv * hd, nkv * hd], dim=0)
        out.update({hf + f"self_attn.q_proj.{kind}": q, hf + f"self_attn.k_proj.{kind}": k,
                    hf + f"self_attn.v_proj.{kind}": v})
    if config.bias:
        out[hf + "self_attn.o_proj.bias"] = state[ours + "attn.out.bias"]
    if config.qk_norm:
        out[hf + "self_attn.q_norm.weight"] = state[ours + "attn.q_norm.weight"]
        out[hf + "self_attn.k_norm.weight"] = state[ours + "attn.k_norm.weight"]
    if config.is_moe_layer(i):
        out[hf + "mlp.gate.weight"] = state[ours + "mlp.router.weight"]
        out[hf + "mlp.experts.gate_up_proj"] = state[ours + "mlp.experts_gate_up"].transpose(1, 2)
        out[hf + "mlp.experts.down_proj"] = state[ours + "mlp.experts_proj"].transpose(1, 2)
        return out
    for kind in ("weight", "bias") if config.bias else ("weight",):
        gate, up = state[ours + f"mlp.gate_up.{kind}"].chunk(2, dim=0)
        out.update({hf + f"mlp.gate_proj.{kind}": gate, hf + f"mlp.up_proj.{kind}": up,
                    hf + f"mlp.down_proj.{kind}": state[ours + f"mlp.proj.{kind}"]})
    return out


def to_hf_state_dict(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict → the state dict of `hf_architecture(config)`'s causal LM."""
    if hf_architecture(config) == "gpt2":
        return to_hf_gpt2_state_dict(state, config)
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["final_norm.weight"],
           "lm_head.weight": state.get("lm_head.weight", state["tok_embeddings.weight"])}
    for i in range(config.n_layers):
        out.update(_llama_layer_to_hf(state, config, i))
    return {k: v.contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state_dict`: a transformers causal LM's state dict → ours."""
    if hf_architecture(config) == "gpt2":
        return from_hf_gpt2_state_dict(hf_state, config)
    out = {"tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
           "final_norm.weight": hf_state["model.norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = hf_state["lm_head.weight"]
    for i in range(config.n_layers):
        out.update(_llama_layer_from_hf(hf_state, config, i))
    return {k: v.contiguous().clone() for k, v in out.items()}


def _llama_layer_from_hf(hf_state, config: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    ours, hf = f"blocks.{i}.", f"model.layers.{i}."
    out = {ours + "attn_norm.weight": hf_state[hf + "input_layernorm.weight"],
           ours + "mlp_norm.weight": hf_state[hf + "post_attention_layernorm.weight"],
           ours + "attn.out.weight": hf_state[hf + "self_attn.o_proj.weight"]}
    for kind in ("weight", "bias") if config.bias else ("weight",):
        out[ours + f"attn.qkv.{kind}"] = torch.cat([hf_state[hf + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
    if config.bias:
        out[ours + "attn.out.bias"] = hf_state[hf + "self_attn.o_proj.bias"]
    if config.qk_norm:
        out[ours + "attn.q_norm.weight"] = hf_state[hf + "self_attn.q_norm.weight"]
        out[ours + "attn.k_norm.weight"] = hf_state[hf + "self_attn.k_norm.weight"]
    if config.is_moe_layer(i):
        out[ours + "mlp.router.weight"] = hf_state[hf + "mlp.gate.weight"]
        out[ours + "mlp.experts_gate_up"] = hf_state[hf + "mlp.experts.gate_up_proj"].transpose(1, 2)
        out[ours + "mlp.experts_proj"] = hf_state[hf + "mlp.experts.down_proj"].transpose(1, 2)
        return out
    for kind in ("weight", "bias") if config.bias else ("weight",):
        out[ours + f"mlp.gate_up.{kind}"] = torch.cat([hf_state[hf + f"mlp.gate_proj.{kind}"],
                                                       hf_state[hf + f"mlp.up_proj.{kind}"]])
        out[ours + f"mlp.proj.{kind}"] = hf_state[hf + f"mlp.down_proj.{kind}"]
    return out


def to_hf(model: DecoderOnlyTransformer, bos_token_id: int | None = None, eos_token_id: int | None = None) -> Any:
    """Our model → the equivalent transformers causal LM (GPT-2, Llama, Qwen3, Mixtral or Qwen3-MoE), eval mode."""
    import transformers

    hf_config = to_hf_config(model.config, bos_token_id, eos_token_id)
    hf_model = getattr(transformers, HF_CLASSES[hf_architecture(model.config)])(hf_config)
    _load_strict(hf_model, to_hf_state_dict(model.state_dict(), model.config))
    return hf_model.to(model.tok_embeddings.weight.dtype).eval()


def from_hf(hf_model: Any) -> DecoderOnlyTransformer:
    """A transformers GPT-2 / Llama / Qwen3 / Mixtral / Qwen3-MoE causal LM → our model, eval mode."""
    config = config_from_hf(hf_model.config)
    model = DecoderOnlyTransformer(config)
    _load_strict(model, from_hf_state_dict(hf_model.state_dict(), config))
    return model.to(next(hf_model.parameters()).dtype).eval()
