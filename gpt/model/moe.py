"""Mixture-of-Experts feed-forward block (Shazeer et al. 2017; Switch, Mixtral, Llama 4).

A linear router scores the experts per token; softmax, then the top-k experts are kept (probabilities
renormalised to sum to 1 as in Mixtral, or used as they are as in Switch). Each expert is a SwiGLU MLP; all
experts' weights live in two stacked tensors. Dispatch is vectorised: the (token, expert) assignments are sorted
by expert so each expert multiplies one contiguous slice, and results are scattered back with `index_add_` —
a loop over the (few) experts, never over tokens. An optional shared expert sees every token (Llama 4).

`forward` returns the output and the load-balancing loss (Switch Transformer eq. 4: n_experts * sum_e f_e * P_e,
equal to 1 for perfectly uniform routing); the model adds it to the LM loss. Each forward also records `stats`
(expert load, dropped fraction, detached) for the trainer to log through `DecoderOnlyTransformer.router_stats`.
With `moe_capacity_factor` set, an expert takes at most capacity_factor * tokens * top_k / n_experts
assignments; the rest are dropped (the token keeps its residual and the shared expert) and counted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt.model.config import ModelConfig
from gpt.model.mlp import SwiGLU

SINGLE_TOKEN_PATH = 1  # inference calls with this many tokens (1 = batch-1 decoding) skip the sort/scatter


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, C, H = config.moe_n_experts, config.d_model, config.resolved_moe_d_ff
        self.n_experts, self.top_k = E, config.moe_top_k
        self.norm_topk = config.moe_norm_topk
        self.capacity_factor = config.moe_capacity_factor
        self.router = nn.Linear(C, E, bias=False)
        self.experts_gate_up = nn.Parameter(torch.empty(E, C, 2 * H))  # x @ W: [gate | up] along the last dim
        self.experts_proj = nn.Parameter(torch.empty(E, H, C))
        self.shared = SwiGLU(config) if config.moe_shared_expert else None
        self.dropout = nn.Dropout(config.dropout)
        self.stats: dict[str, torch.Tensor] = {}  # of the last forward, for logging
        self.init_weights(config.init_std, config.residual_init_std)  # the stacked experts start as torch.empty

    def init_weights(self, std: float, residual_std: float) -> None:
        """GPT-2 scheme as for a dense MLP: the experts' output projections write into the residual stream."""
        nn.init.normal_(self.router.weight, mean=0.0, std=std)
        nn.init.normal_(self.experts_gate_up, mean=0.0, std=std)
        nn.init.normal_(self.experts_proj, mean=0.0, std=residual_std)
        if self.shared is not None:
            self.shared.init_weights(std, residual_std)

    @property
    def parameters_per_expert(self) -> int:
        return (self.experts_gate_up.numel() + self.experts_proj.numel()) // self.n_experts

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) → router probabilities (N, E) fp32, top-k weights (N, k) and expert ids (N, k)."""
        probs = self.router(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, experts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, C) → (output (B, T, C), load-balancing loss (scalar, fp32))."""
        B, T, C = x.shape
        xf = x.reshape(B * T, C)  # (N, C)
        probs, weights, experts = self.route(xf)
        if B * T <= SINGLE_TOKEN_PATH and not torch.is_grad_enabled():  # a decode step: no dispatch machinery
            out, aux_loss = self._one_token(xf, probs, weights, experts)
            out = out.view(B, T, C)
            return (out + self.shared(x) if self.shared is not None else out), aux_loss
        flat_experts = experts.reshape(-1)  # (N*k,) assignment a belongs to token a // k
        order = flat_experts.argsort(stable=True)
        sorted_experts = flat_experts[order]
        counts = torch.bincount(flat_experts, minlength=self.n_experts)  # (E,)
        keep = self._within_capacity(sorted_experts, counts, B * T)
        if keep is not None:
            order, sorted_experts = order[keep], sorted_experts[keep]
        kept_counts = torch.bincount(sorted_experts, minlength=self.n_experts) if keep is not None else counts
        token_idx = order // self.top_k
        expert_out = self._run_experts(xf[token_idx], kept_counts)  # (M, C), grouped by expert
        gate = weights.reshape(-1)[order].to(x.dtype).unsqueeze(1)  # (M, 1)
        out = torch.zeros_like(xf).index_add_(0, token_idx, expert_out * gate)
        aux_loss = self._record(probs, counts, kept_counts, B * T)
        out = self.dropout(out.view(B, T, C))
        return (out + self.shared(x) if self.shared is not None else out), aux_loss

    def _one_token(self, xf, probs, weights, experts) -> tuple[torch.Tensor, torch.Tensor]:
        """The same computation for a single token (capacity never binds: its k experts are distinct)."""
        out = torch.zeros_like(xf)
        for w, e in zip(weights[0].tolist(), experts[0].tolist()):
            gate, up = (xf @ self.experts_gate_up[e]).chunk(2, dim=-1)
            out += w * ((F.silu(gate) * up) @ self.experts_proj[e])
        counts = torch.bincount(experts[0], minlength=self.n_experts)
        return out, self._record(probs, counts, counts, 1)

    def _run_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            gate, up = (xs[start:start + n] @ self.experts_gate_up[e]).chunk(2, dim=-1)
            out[start:start + n] = (F.silu(gate) * up) @ self.experts_proj[e]
            start += n
        return out

    def _within_capacity(self, sorted_experts: torch.Tensor, counts: torch.Tensor, n_tokens: int):
        if self.capacity_factor is None:
            return None
        capacity = math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)
        starts = counts.cumsum(0) - counts  # first sorted slot of each expert
        rank = torch.arange(sorted_experts.numel(), device=sorted_experts.device) - starts[sorted_experts]
        return rank < capacity

    def _record(self, probs: torch.Tensor, counts: torch.Tensor, kept_counts: torch.Tensor,
                n_tokens: int) -> torch.Tensor:
        """Keep the routing statistics for logging; return the load-balancing loss."""
        assignments = n_tokens * self.top_k
        self.stats = {
            "load": (counts.float() / assignments).detach(),
            "dropped_frac": (1.0 - kept_counts.sum().float() / assignments).detach(),
        }
        return load_balancing_loss(probs, counts)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss: n_experts * sum_e f_e * P_e.

    f_e = fraction of (token, expert) assignments that went to expert e (not differentiable),
    P_e = mean router probability of e over the tokens (differentiable: the gradient pushes probability away
    from overloaded experts). Equals 1 when both are uniform; n_experts when everything goes to one expert.
    """
    load = counts.float() / counts.sum()
    return probs.shape[-1] * (load * probs.float().mean(dim=0)).sum()
