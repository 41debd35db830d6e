"""The decoder-only transformer: embeddings → pre-norm blocks → final norm → LM head.

`DecoderOnlyTransformer(config)(input_ids, labels=...)` returns `(logits, loss)` as in the seed project.
Every variant (GPT-2, Qwen3-style, MoE) is this same module with different small parts, picked by the config:
norm (`norms.py`), positions (`positions.py`), attention (`attention.py`), MLP or MoE (`mlp.py`, `moe.py`).
Generation (`generate`, `stream`) lives in `generation.py` and decodes through a preallocated KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from gpt.model import generation
from gpt.model.attention import CausalSelfAttention, build_attention_mask
from gpt.model.cache import KVCache
from gpt.model.config import ModelConfig
from gpt.model.linear import Linear
from gpt.model.mlp import build_mlp
from gpt.model.norms import build_norm
from gpt.model.positions import build_positions


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (GPT-2, Llama, Qwen3 alike)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = build_norm(config.norm, config.d_model, config.layer_norm_eps, config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp_norm = build_norm(config.norm, config.d_model, config.layer_norm_eps, config.bias)
        self.mlp = build_mlp(config, layer_idx)

    def forward(self, x, positions_module, positions, mask, is_causal, cache):
        x = x + self.attn(self.attn_norm(x), positions_module, positions, mask, is_causal, cache)
        return x + self.mlp(self.mlp_norm(x))


class DecoderOnlyTransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = build_positions(config)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = build_norm(config.norm, config.d_model, config.layer_norm_eps, config.bias)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight  # weight tying (Press & Wolf 2017), as in GPT-2
        self.last_aux_loss: torch.Tensor | None = None
        self.apply(self._init_weights)
        self._init_residual_projections()

    # ---- initialisation (GPT-2) ----
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif hasattr(module, "experts_gate_up"):
            nn.init.normal_(module.experts_gate_up, mean=0.0, std=std)

    def _init_residual_projections(self) -> None:
        # GPT-2: residual projections scaled by 1/sqrt(2*n_layers) so the residual stream's variance stays ~constant
        std = self.config.init_std / math.sqrt(2 * self.config.n_layers)
        for name, param in self.named_parameters():
            if name.endswith(("attn.out.weight", "mlp.proj.weight", "shared.proj.weight", "mlp.experts_proj")):
                nn.init.normal_(param, mean=0.0, std=std)

    # ---- forward ----
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """input_ids (B, T) → (logits (B, T, V), loss or None).

        labels: (B, T), usually the inputs themselves; shifted inside (position t predicts labels[t+1]).
        targets: alternative to labels, already shifted (position t predicts targets[t]), for training on
        windows of max_seq_len + 1 tokens. -100 marks positions that do not count in either.
        attention_mask: (B, T), 1 = real token, 0 = padding (left padding for batched prompts).
        In training mode an MoE model adds moe_aux_loss_coef * load-balancing loss to the loss.
        """
        if labels is not None and targets is not None:
            raise ValueError("pass labels (shifted inside) or targets (already shifted), not both")
        hidden = self.hidden_states(input_ids, attention_mask=attention_mask)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            logits_for_loss = logits[:, :-1]
        elif targets is not None:
            logits_for_loss = logits
        if targets is not None:
            loss = F.cross_entropy(logits_for_loss.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-100)
            if self.training and self.last_aux_loss is not None:
                loss = loss + self.config.moe_aux_loss_coef * self.last_aux_loss
        return logits, loss

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model); with a cache, continues after the cached tokens."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than max_seq_len={self.config.max_seq_len}; "
                "truncate the input (generate() slides the window itself)"
            )
        key_padding = self._key_padding(attention_mask, cache, B, T)
        positions = self._positions(key_padding, past, T, input_ids.device)
        mask, is_causal = build_attention_mask(T, past, key_padding, input_ids.device)
        x = self.dropout(self.positions.embed(self.tok_embeddings(input_ids), positions))  # (B, T, C)
        for block in self.blocks:
            x = block(x, self.positions, positions, mask, is_causal, cache)
        if cache is not None:
            cache.advance(T, None if key_padding is None else key_padding[:, past:])
        self._collect_aux_loss()
        return self.final_norm(x)

    @staticmethod
    def _key_padding(attention_mask, cache, B, T) -> torch.Tensor | None:
        """(B, S) bool of real keys over cached + new tokens, or None if there is no padding anywhere."""
        past_mask = cache.key_mask if cache is not None else None
        if past_mask is None and (attention_mask is None or bool(attention_mask.all())):
            return None
        past = cache.length if cache is not None else 0
        if past_mask is None:
            past_mask = torch.ones(B, past, dtype=torch.bool, device=attention_mask.device)
        if attention_mask is None:
            new = torch.ones(B, T, dtype=torch.bool, device=past_mask.device)
        else:
            new = attention_mask.bool()
        return torch.cat([past_mask, new], dim=1)

    @staticmethod
    def _positions(key_padding, past: int, T: int, device) -> torch.Tensor:
        """Absolute positions of the new tokens: (T,) without padding, else (B, T) counting only real tokens."""
        if key_padding is None:
            return torch.arange(past, past + T, device=device)
        return (key_padding.long().cumsum(dim=1) - 1).clamp(min=0)[:, past:]

    def _collect_aux_loss(self) -> None:
        losses = [b.mlp.aux_loss for b in self.blocks if getattr(b.mlp, "aux_loss", None) is not None]
        self.last_aux_loss = torch.stack(losses).mean() if losses else None

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """moe_aux_loss_coef * load-balancing loss of the last forward (None for dense models).

        For trainers that compute the LM loss from the logits themselves: add this to it. (The loss returned
        by `forward` with labels/targets in training mode already includes it.)
        """
        if self.last_aux_loss is None:
            return None
        return self.config.moe_aux_loss_coef * self.last_aux_loss

    # ---- introspection ----
    def num_parameters(self, active: bool = False, non_embedding: bool = False) -> int:
        """Parameters (tied weights counted once). active=True counts only the top-k experts a token uses."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_embeddings.weight.numel()
            if hasattr(self.positions, "wpe"):
                total -= self.positions.wpe.weight.numel()
        if active:
            for block in self.blocks:
                if hasattr(block.mlp, "experts_gate_up"):
                    per_expert = (block.mlp.experts_gate_up.numel() + block.mlp.experts_proj.numel()) // block.mlp.n_experts
                    total -= per_expert * (block.mlp.n_experts - block.mlp.top_k)
        return total

    def router_stats(self) -> dict[str, float]:
        """Expert load per MoE layer from the last forward (for logging): {"layer3.expert0.load": 0.27, ...}."""
        stats: dict[str, float] = {}
        for i, block in enumerate(self.blocks):
            for key, value in getattr(block.mlp, "stats", {}).items():
                if value.numel() == 1:
                    stats[f"layer{i}.{key}"] = float(value)
                else:
                    stats.update({f"layer{i}.expert{e}.{key}": float(v) for e, v in enumerate(value.tolist())})
        return stats

    def new_cache(self, batch_size: int, capacity: int | None = None) -> KVCache:
        """An empty KV cache for up to `capacity` (default max_seq_len) positions.

        On CPU a bf16/fp16 model keeps its cache in float32: CPU attention kernels for one query are 2-5x slower in
        bf16 than in fp32 (bench/README.md), and the cache is small next to the weights. Elsewhere: the model's dtype.
        """
        cfg, ref = self.config, self.tok_embeddings.weight
        dtype = torch.float32 if ref.device.type == "cpu" and ref.dtype in (torch.bfloat16, torch.float16) else ref.dtype
        return KVCache(cfg.n_layers, batch_size, cfg.kv_heads, capacity or cfg.max_seq_len, cfg.resolved_head_dim,
                       ref.device, dtype)

    # ---- generation (see generation.py) ----
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                 generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Prompt (B, T) → prompt + new tokens (B, T + n). See `generation.generate`."""
        return generation.generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                   generator, attention_mask, use_cache)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
               generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
               use_cache: bool = True) -> Iterator[torch.Tensor]:
        """Yield the next token of every sequence, (B,) LongTensor, step by step. See `generation.stream`."""
        return generation.stream(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                 generator, attention_mask, use_cache)
