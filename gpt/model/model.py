"""The decoder-only transformer: embeddings → pre-norm blocks → final norm → LM head.

`DecoderOnlyTransformer(config)(input_ids, labels=...)` returns `(logits, loss)` as in the seed project; the loss
is `loss.next_token_loss` (plus the MoE load-balancing loss in training mode).
Every variant (GPT-2, Qwen3-style, MoE) is this same module with different small parts, picked by the config:
norm (`norms.py`), positions (`positions.py`), attention (`attention.py`), MLP or MoE (`mlp.py`, `moe.py`).
Each part initialises its own weights (`init_weights`, GPT-2's scheme); `DecoderOnlyTransformer.init_weights` calls
them. Generation (`generate`, `stream`) lives in `generation.py` and decodes through a preallocated KV cache; a
`BatchKVCache` (cache.py) lets rows of different lengths decode together (the server's continuous batching).
The layers are plain `nn.Linear`; CPU decode kernels are swapped in from outside by `gpt.inference`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from gpt.model import generation
from gpt.model.attention import CausalSelfAttention, build_attention_mask
from gpt.model.cache import BatchKVCache, KVCache
from gpt.model.config import ModelConfig
from gpt.model.loss import fused_next_token_loss, next_token_loss
from gpt.model.mlp import build_dense_mlp
from gpt.model.moe import MoE
from gpt.model.norms import build_norm
from gpt.model.positions import LearnedPositions, build_positions


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)) (GPT-2, Llama, Qwen3 alike)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = build_norm(config.norm, config.d_model, config.layer_norm_eps, config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp_norm = build_norm(config.norm, config.d_model, config.layer_norm_eps, config.bias)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else build_dense_mlp(config)

    def init_weights(self, std: float, residual_std: float) -> None:
        self.attn_norm.init_weights()
        self.attn.init_weights(std, residual_std)
        self.mlp_norm.init_weights()
        self.mlp.init_weights(std, residual_std)

    def forward(self, x, positions_module, positions, mask, is_causal,
                cache) -> tuple[torch.Tensor, torch.Tensor | None]:
        """→ (x (B, T, C), the MoE load-balancing loss or None for a dense block)."""
        x = x + self.attn(self.attn_norm(x), positions_module, positions, mask, is_causal, cache)
        if isinstance(self.mlp, MoE):
            out, aux_loss = self.mlp(self.mlp_norm(x))
        else:
            out, aux_loss = self.mlp(self.mlp_norm(x)), None
        return x + out, aux_loss


class DecoderOnlyTransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = build_positions(config)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = build_norm(config.norm, config.d_model, config.layer_norm_eps, config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight  # weight tying (Press & Wolf 2017), as in GPT-2
        # mean load-balancing loss over the MoE blocks of the last forward (None for dense models); see aux_loss
        self.last_aux_loss: torch.Tensor | None = None
        self.init_weights()

    def init_weights(self) -> None:
        """GPT-2's initialisation: normal(0, init_std) matrices, zero biases, unit norms, and the projections into
        the residual stream at init_std / sqrt(2 * n_layers). Each part initialises its own parameters."""
        std, residual_std = self.config.init_std, self.config.residual_init_std
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=std)
        self.positions.init_weights(std)
        for block in self.blocks:
            block.init_weights(std, residual_std)
        self.final_norm.init_weights()
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)

    # ---- forward ----
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """input_ids (B, T) → (logits (B, T, V), loss or None).

        labels: the tokens to predict, shifted inside: position t is scored against labels[:, t + 1]. Usually the
        inputs themselves (B, T); a training window of T + 1 tokens passes input_ids = window[:, :-1] and
        labels = window, so every position is scored. -100 marks labels that do not count (`loss.next_token_loss`).
        attention_mask: (B, T), 1 = real token, 0 = padding (left padding for batched prompts).
        In training mode an MoE model adds moe_aux_loss_coef * load-balancing loss to the loss.
        return_logits=False (with labels; what training uses) → (None, loss): the LM head and the loss are fused
        (`loss.fused_next_token_loss`), so the (B, T, V) logits are never built.
        """
        hidden, aux_loss = self._run_blocks(input_ids, attention_mask, cache=None)
        if labels is not None and not return_logits and type(self.lm_head) is nn.Linear:  # not a LoRA/INT8 head
            logits, loss = None, fused_next_token_loss(hidden, self.lm_head.weight, labels)
        else:
            logits = self.lm_head(hidden)
            loss = None if labels is None else next_token_loss(logits, labels)
        if labels is not None and self.training and aux_loss is not None:
            loss = loss + self.config.moe_aux_loss_coef * aux_loss
        return logits, loss

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | BatchKVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model); with a cache, continues after the cached tokens."""
        return self._run_blocks(input_ids, attention_mask, cache)[0]

    def _run_blocks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    cache: KVCache | BatchKVCache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """→ (final-norm hidden states (B, T, C), mean MoE load-balancing loss over the MoE blocks or None)."""
        B, T = input_ids.shape
        past = cache.length if isinstance(cache, KVCache) else 0  # a BatchKVCache checks its rows in begin()
        if past + T > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {past + T} tokens is longer than max_seq_len={self.config.max_seq_len}; "
                "truncate the input (generate() slides the window itself)"
            )
        if isinstance(cache, BatchKVCache):  # rows of different lengths (continuous batching): the cache knows
            key_padding, is_causal = None, False
            positions, mask = cache.begin(B, T)
        else:
            key_padding = self._key_padding(attention_mask, cache, B, T)
            positions = self._positions(key_padding, past, T, input_ids.device)
            mask, is_causal = build_attention_mask(T, past, key_padding, input_ids.device)
        x = self.dropout(self.positions.embed(self.tok_embeddings(input_ids), positions))  # (B, T, C)
        aux_losses = []
        for block in self.blocks:
            x, aux_loss = block(x, self.positions, positions, mask, is_causal, cache)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
        if cache is not None:
            cache.advance(T, None if key_padding is None else key_padding[:, past:])
        self.last_aux_loss = torch.stack(aux_losses).mean() if aux_losses else None
        return self.final_norm(x), self.last_aux_loss

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

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """moe_aux_loss_coef * load-balancing loss of the last forward (None for dense models).

        For trainers that compute the LM loss from the logits themselves: add this to it. (The loss returned
        by `forward` with labels in training mode already includes it.)
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
            if isinstance(self.positions, LearnedPositions):
                total -= self.positions.wpe.weight.numel()
        if active:
            for moe in (block.mlp for block in self.blocks if isinstance(block.mlp, MoE)):
                total -= moe.parameters_per_expert * (moe.n_experts - moe.top_k)
        return total

    def router_stats(self) -> dict[str, float]:
        """Expert load per MoE layer from the last forward (for logging): {"layer3.expert0.load": 0.27, ...}."""
        stats: dict[str, float] = {}
        for i, block in enumerate(self.blocks):
            if not isinstance(block.mlp, MoE):
                continue
            for key, value in block.mlp.stats.items():
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
        return KVCache(cfg.n_layers, batch_size, cfg.kv_heads, capacity or cfg.max_seq_len, cfg.resolved_head_dim,
                       ref.device, self._cache_dtype())

    def new_batch_cache(self, slots: int) -> BatchKVCache:
        """A cache of `slots` sequences of up to max_seq_len positions each, every one with its own length
        (continuous batching, gpt/serve/batch.py); same dtype choice as `new_cache`."""
        cfg = self.config
        return BatchKVCache(cfg.n_layers, slots, cfg.kv_heads, cfg.max_seq_len, cfg.resolved_head_dim,
                            self.tok_embeddings.weight.device, self._cache_dtype())

    def _cache_dtype(self) -> torch.dtype:
        ref = self.tok_embeddings.weight
        return torch.float32 if ref.device.type == "cpu" and ref.dtype in (torch.bfloat16, torch.float16) else ref.dtype

    # ---- generation (see generation.py) ----
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
                 generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
                 use_cache: bool = True, vocab_limit: int | None = None) -> torch.Tensor:
        """Prompt (B, T) → prompt + new tokens (B, T + n). See `generation.generate`."""
        return generation.generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                   generator, attention_mask, use_cache, vocab_limit)

    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None, eos_token_id=None,
               generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
               use_cache: bool = True, vocab_limit: int | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every sequence, (B,) LongTensor, step by step. See `generation.stream`."""
        return generation.stream(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                 generator, attention_mask, use_cache, vocab_limit)
