"""Mixture-of-Experts feed-forward block (Shazeer et al. 2017; Switch, Mixtral, Llama 4).

A linear router scores the experts per token; softmax, then the top-k experts are kept (probabilities
renormalised to sum to 1 as in Mixtral, or used as they are as in Switch). Each expert is a SwiGLU MLP; all
experts' weights live in two stacked tensors. Dispatch is vectorised: the (token, expert) assignments are sorted
by expert so each expert multiplies one contiguous slice, and results are scattered back with `index_add_` —
a loop over the (few) experts, never over tokens. An optional shared expert sees every token (Llama 4).

Each forward stores `aux_loss` (load-balancing loss, Switch Transformer eq. 4: n_experts * sum_e f_e * P_e,
equal to 1 for perfectly uniform routing) and `stats` (expert load, dropped fraction) for the trainer to log.
With `moe_capacity_factor` set, an expert takes at most capacity_factor * tokens * top_k / n_experts
assignments; the rest are dropped (the token keeps its residual and the shared expert) and counted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt.model.config import ModelConfig
from gpt.model.linear import Linear
from gpt.model.mlp import SwiGLU

SINGLE_TOKEN_PATH = 1  # inference calls with this many tokens (1 = batch-1 decoding) skip the sort/scatter


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, C, H = config.moe_n_experts, config.d_model, config.resolved_moe_d_ff
        self.n_experts, self.top_k = E, config.moe_top_k
        self.norm_topk = config.moe_norm_topk
        self.capacity_factor = config.moe_capacity_factor
        self.router = Linear(C, E, bias=False)
        self.experts_gate_up = nn.Parameter(torch.empty(E, C, 2 * H))  # x @ W: [gate | up] along the last dim
        self.experts_proj = nn.Parameter(torch.empty(E, H, C))
        nn.init.normal_(self.experts_gate_up, std=config.init_std)  # the model re-initialises these (GPT-2 scheme)
        nn.init.normal_(self.experts_proj, std=config.init_std)
        self.shared = SwiGLU(config) if config.moe_shared_expert else None
        self.dropout = nn.Dropout(config.dropout)
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) → router probabilities (N, E) fp32, top-k weights (N, k) and expert ids (N, k)."""
        probs = self.router(x).float().softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        xf = x.reshape(B * T, C)  # (N, C)
        probs, weights, experts = self.route(xf)
        if B * T <= SINGLE_TOKEN_PATH and not torch.is_grad_enabled():  # a decode step: no dispatch machinery
            out = self._one_token(xf, probs, weights, experts).view(B, T, C)
            return out + self.shared(x) if self.shared is not None else out
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
        self._record(probs, counts, kept_counts, B * T)
        out = self.dropout(out.view(B, T, C))
        return out + self.shared(x) if self.shared is not None else out

    def _one_token(self, xf, probs, weights, experts) -> torch.Tensor:
        """The same computation for a single token (capacity never binds: its k experts are distinct)."""
        out = torch.zeros_like(xf)
        for w, e in zip(weights[0].tolist(), experts[0].tolist()):
            gate, up = (xf @ self.experts_gate_up[e]).chunk(2, dim=-1)
            out += w * ((F.silu(gate) * up) @ self.experts_proj[e])
        counts = torch.bincount(experts[0], minlength=self.n_experts)
        self._record(probs, counts, counts, 1)
        return out

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

    def _record(self, probs: torch.Tensor, counts: torch.Tensor, kept_counts: torch.Tensor, n_tokens: int) -> None:
        assignments = n_tokens * self.top_k
        load = counts.float() / assignments
        self.aux_loss = load_balancing_loss(probs, counts)
        self.stats = {
            "load": load.detach(),
            "dropped_frac": (1.0 - kept_counts.sum().float() / assignments).detach(),
        }


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss: n_experts * sum_e f_e * P_e.

    f_e = fraction of (token, expert) assignments that went to expert e (not differentiable),
    P_e = mean router probability of e over the tokens (differentiable: the gradient pushes probability away
    from overloaded experts). Equals 1 when both are uniform; n_experts when everything goes to one expert.
    """
    load = counts.float() / counts.sum()
    return probs.shape[-1] * (load * probs.float().mean(dim=0)).sum()
