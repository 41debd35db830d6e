"""`ModelConfig`: every architectural choice of the decoder-only transformer, plus named presets.

Defaults are the seed project's model (vocab 65536, d_model 768, 6 layers, 12 heads, context 512, GPT-2 block).
Variants are string choices resolved to small classes (`norm`, `position`, `mlp`), in the manner of litgpt's
`norm_class_name` / `mlp_class_name`, so one forward serves GPT-2, Qwen3-style and MoE models.

The `model:` section of params.yaml is `{preset: <name>, <any field below as an override>}`;
`model_config_from_params` turns it into a validated config (vocab_size null = the tokenizer's).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from gpt.config import ConfigError, from_dict

NormKind = Literal["layernorm", "rmsnorm"]
PositionKind = Literal["learned", "rope"]
MlpKind = Literal["gelu", "swiglu"]
Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and architecture of a `DecoderOnlyTransformer`. Frozen; derive variants with `replace(...)`."""

    vocab_size: int = 65536
    d_model: int = 768
    n_layers: int = 6
    n_heads: int = 12
    max_seq_len: int = 512
    dropout: float = 0.1
    bias: bool = True  # biases in linear layers and LayerNorm
    activation: Activation = "gelu"  # of the `gelu` MLP: exact GELU, or "gelu_tanh" as in the original GPT-2
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    # --- variants (issue 7); the defaults give the GPT-2 block ---
    norm: NormKind = "layernorm"
    position: PositionKind = "learned"
    rope_theta: float = 10000.0
    mlp: MlpKind = "gelu"
    d_ff: int | None = None  # hidden size of the MLP; None = 4*d_model (gelu) or the Llama rule (swiglu)
    n_kv_heads: int | None = None  # None = n_heads (MHA); fewer = grouped-query attention, 1 = MQA
    head_dim: int | None = None  # None = d_model // n_heads (Qwen3 decouples it)
    qk_norm: bool = False  # RMSNorm on queries and keys per head (Qwen3)
    tie_embeddings: bool = True
    # --- mixture of experts (0 experts = dense MLP everywhere) ---
    moe_n_experts: int = 0
    moe_top_k: int = 1
    moe_every: int = 1  # every k-th block is MoE (1 = all; 2 = alternate dense/MoE, the seed's "hybrid")
    moe_d_ff: int | None = None  # hidden size of each expert; None = d_ff
    moe_shared_expert: bool = False  # an always-on dense expert beside the routed ones (Llama 4)
    moe_norm_topk: bool = True  # renormalise the top-k probabilities to sum to 1 (Mixtral); False = Switch gating
    moe_capacity_factor: float | None = None  # None = no token dropping
    moe_aux_loss_coef: float = 0.01  # load-balancing loss weight, added to the loss in training mode

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.layer_norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            raise ConfigError("model.layer_norm_eps, init_std, rope_theta: must be positive")
        if self.head_dim is None and self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"model.d_model: {self.d_model} is not divisible by n_heads={self.n_heads} "
                "(choose d_model = n_heads * head size, or set head_dim)"
            )
        if self.head_dim is not None and self.head_dim <= 0:
            raise ConfigError(f"model.head_dim: must be positive, got {self.head_dim}")
        if self.position == "rope" and self.resolved_head_dim % 2:
            raise ConfigError(f"model.head_dim: RoPE needs an even head size, got {self.resolved_head_dim}")
        kv = self.kv_heads
        if kv <= 0 or self.n_heads % kv:
            raise ConfigError(f"model.n_kv_heads: {kv} must be positive and divide n_heads={self.n_heads}")
        for name in ("d_ff", "moe_d_ff"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{name}: must be positive or null, got {value}")
        self._check_moe()

    def _check_moe(self) -> None:
        if self.moe_n_experts < 0:
            raise ConfigError(f"model.moe_n_experts: must be >= 0, got {self.moe_n_experts}")
        if self.moe_n_experts and not 1 <= self.moe_top_k <= self.moe_n_experts:
            raise ConfigError(
                f"model.moe_top_k: {self.moe_top_k} must be between 1 and moe_n_experts={self.moe_n_experts}"
            )
        if self.moe_every < 1:
            raise ConfigError(f"model.moe_every: must be >= 1, got {self.moe_every}")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ConfigError(f"model.moe_capacity_factor: must be positive or null, got {self.moe_capacity_factor}")
        if self.moe_aux_loss_coef < 0:
            raise ConfigError(f"model.moe_aux_loss_coef: must be >= 0, got {self.moe_aux_loss_coef}")

    # ---- derived values ----
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":  # Llama: 2/3 of 4*d_model keeps the parameter count of a GELU MLP, rounded up to 64
            return 64 * math.ceil(int(8 * self.d_model / 3) / 64)
        return 4 * self.d_model

    @property
    def resolved_moe_d_ff(self) -> int:
        return self.moe_d_ff if self.moe_d_ff is not None else self.resolved_d_ff

    @property
    def residual_init_std(self) -> float:
        """GPT-2: projections into the residual stream start at init_std / sqrt(2 * n_layers), so the stream's
        variance stays about constant with depth (two residual additions per block)."""
        return self.init_std / math.sqrt(2 * self.n_layers)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MoE blocks are every `moe_every`-th block, counted so that the last block is one (as in Llama 4)."""
        return self.moe_n_experts > 0 and (layer_idx + 1) % self.moe_every == 0

    # ---- (de)serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], section: str = "model") -> ModelConfig:
        """Validated construction from a plain mapping (unknown keys / wrong types raise ConfigError)."""
        return from_dict(cls, dict(data), section)

    def replace(self, **changes: Any) -> ModelConfig:
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# Architecture of the seed's "reference implementations", at the size of `tiny` so they train on a CPU.
# Sizes are chosen so that tiny, qwen3-style, moe and hybrid have (almost) the same parameters *active per token*
# (~0.79M outside the embedding): SwiGLU's 384 = 2/3 of GELU's 4*128, and the MoE experts split that in two
# (shared + 1 routed of 192 in `moe`, 2 routed of 192 in `hybrid`'s MoE blocks).
_TINY = dict(vocab_size=8192, d_model=128, n_layers=4, n_heads=4, max_seq_len=256, dropout=0.0)
_QWEN3 = dict(norm="rmsnorm", position="rope", rope_theta=1.0e6, mlp="swiglu", qk_norm=True, bias=False,
              layer_norm_eps=1e-6)

PRESETS: dict[str, dict[str, Any]] = {
    # the seed's model (86-93M parameters with its 65536 vocabulary); `gpt2` is the name issue 7 uses for it
    "seed": {},
    "gpt2": {},
    # OpenAI GPT-2 small (124M): loads HF `gpt2` weights through gpt.hf
    "gpt2-124m": dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024,
                      activation="gelu_tanh", dropout=0.1),
    # the pipeline's CPU default: trains to useful loss in minutes on 2 cores
    "tiny": dict(_TINY),
    "qwen3-style": {**_TINY, **_QWEN3, "n_kv_heads": 2},
    # top-1 routing gated by the router probability (renormalising a single weight would make it always 1
    # and leave the router without a gradient from the language-model loss)
    "moe": {**_TINY, **_QWEN3, "n_kv_heads": 2, "qk_norm": False, "rope_theta": 5.0e5, "d_ff": 192,
            "moe_n_experts": 4, "moe_top_k": 1, "moe_shared_expert": True, "moe_norm_topk": False},
    "hybrid": {**_TINY, **_QWEN3, "n_kv_heads": 2, "moe_d_ff": 192, "moe_n_experts": 4, "moe_top_k": 2,
               "moe_every": 2},
}


def model_config_from_params(section: dict[str, Any] | None, vocab_size: int | None) -> ModelConfig:
    """`model:` params section → ModelConfig. `vocab_size` (the tokenizer's) fills a null/absent vocab_size.

    A vocab_size set explicitly must be at least the tokenizer's (larger pads the embedding, e.g. to a multiple of 64).
    """
    section = dict(section or {})
    preset = section.pop("preset", "tiny")
    if not isinstance(preset, str):
        raise ConfigError(f"model.preset: expected a preset name, got {preset!r}; choose one of {sorted(PRESETS)}")
    if section.get("vocab_size") is None:
        section.pop("vocab_size", None)
        if vocab_size is not None:
            section["vocab_size"] = vocab_size
    elif vocab_size is not None and section["vocab_size"] < vocab_size:
        raise ConfigError(
            f"model.vocab_size: {section['vocab_size']} is smaller than the tokenizer's vocabulary ({vocab_size}); "
            "set it to null to use the tokenizer's"
        )
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[preset], **section})
