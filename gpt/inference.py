"""Preparing a model for CPU inference: faster kernels for batch-1 decoding, applied from outside the model.

`prepare_for_inference(model)` replaces every `nn.Linear` whose weight is on the CPU with a `DecodeLinear` holding
the same parameters (tied weights stay tied), the way `gpt.quantize` swaps in `Int8Linear`. Whoever loads a model
to generate with it calls this (`gpt.model_dir.load` does); the model itself stays plain PyTorch, so training,
export and the equivalence tests see ordinary `nn.Linear` layers.

Why. Decoding one token at a time is memory-bound: every step reads every weight once, a single activation row
against the whole matrix (a GEMV). Which kernel reads the weight fastest depends on its dtype and layout;
measured on the AMD EPYC of the earlier sessions (AVX-512 bf16, torch 2.13, 2 threads, shared machine), seed model
decode tokens/s plain → prepared: fp32 48.7 → 52.1, bf16 53.0 → 68.4 (1 thread: 28.5 → 31.1, 32.9 → 45.7):
  - bf16: `F.linear` goes through oneDNN, which reorders the weight on every call; `torch.addmv` (ATen's own GEMV,
    float32 accumulation, the bias fused as in `F.linear`) reads the (out, in) weight about twice as fast on the
    65536 x 768 LM head. It is a per-call choice: no process-wide oneDNN switch is touched. Faster still, where
    the CPU has AVX-512 BF16 and a C compiler is present: `gpt.kernels.gemv` (a prefetching GEMV compiled on
    first use; 1.13x decode tokens/s over addmv on the 2-core Xeon of bench/README.md).
  - fp32: the BLAS GEMV reads an (in, out)-contiguous matrix faster than an (out, in) one. So the fp32 weights are
    stored transposed: the parameter becomes a `.t()` view of an (in, out) contiguous tensor, and `F.linear` on
    it runs the faster kernel. There is no second copy to go stale: `p.data.mul_(2)`, `load_state_dict` (which
    copies into the existing storage) and optimizer steps all write the one tensor the kernel reads; `p.data =
    new` swaps in a tensor of the new layout, which `F.linear` computes just as correctly (at the old speed).
  - fp16: no faster kernel found here; `F.linear` as is.
Costs: a prepared fp32 model's weights are not contiguous, so save the model you loaded, not a prepared one
(safetensors refuses non-contiguous tensors); the tied embedding is looked up from the transposed storage
(a strided gather: ~3 ms more per 512-token prefill of the seed model, nothing per decode step).

Also at preparation: `nn.Dropout(p=0)` layers are dropped (identities that still cost a module call and an op
each), and `warm_up` decodes two tokens so one-time kernel and thread-pool set-up happens at load, not in the
first timed completion. Not done, measured (issue 15, bench/README.md): torch.compile of the decode step (10 min
of compiling on the loaded 2-core box for an INT8 step that ran slower), oneDNN/MKL pre-packed weights (no faster
GEMV here, and a packed copy would go stale after an in-place weight edit). Which OpenMP wait policy decodes
fastest depends on the machine's load; `gpt.cli.openmp_wait_policy` picks it before torch loads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt import kernels
from gpt.model.cache import KVCache
from gpt.model.mlp import GeluMLP, SwiGLU
from gpt.model.positions import LearnedPositions, RotaryPositions


class DecodeLinear(nn.Linear):
    """`nn.Linear` whose single-row bf16 CPU calls use the native GEMV (`gpt.kernels.gemv`) or, where it is off,
    `torch.addmv`; every other call is `F.linear`.

    The kernel is chosen from the weight as it is at call time (dtype, layout, device), so nothing is cached.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DecodeLinear:
        """A DecodeLinear sharing `linear`'s parameters (no copy: a tied weight stays tied)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (x.device.type == "cpu" and weight.dtype == torch.bfloat16 and x.dtype == weight.dtype
                and x.numel() == x.shape[-1] and weight.is_contiguous()):
            row = x.reshape(-1)  # (in,)
            y = kernels.gemv(weight, row, self.bias)
            if y is None:
                y = torch.mv(weight, row) if self.bias is None else torch.addmv(self.bias, weight, row)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, weight, self.bias)


def _store_transposed(param: nn.Parameter) -> None:
    """Keep the values, change the layout: `param` becomes a (out, in) view of an (in, out) contiguous tensor."""
    if param.dim() == 2 and param.is_contiguous():
        param.data = param.data.t().contiguous().t()


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class OneTokenStep:
    """One new token of one sequence through a dense model, continuing its `KVCache`, without nn.Module dispatch:
    (1, 1) ids → final-norm hidden state (1, 1, C), what `model.hidden_states(ids, cache=cache)` gives.

    Why: a decode step of the seed model is ~25 GEMVs plus ~250 small tensor ops and ~80 module calls; with the
    GEMVs streaming at the memory's speed, the rest (~1.2 ms of an ~8.5 ms bf16 step on the 2-core Xeon of
    bench/README.md) was what separated us from llama.cpp. This step does the same arithmetic in the same order
    (so results are equal, not just close: tests/test_inference.py) with less Python work: layers are called
    through their `forward` (any Linear: DecodeLinear, Int8Linear; any norm; any dense MLP), q/k/v are views of
    the fused projection in the (1, heads, 1, head_dim) layout attention wants, and the cache's per-layer views
    are made once per cache. GPT-2 blocks (learned positions, multi-head, no QK-norm) go further: q/k/v are one
    view and one cast. It applies to every dense model — GPT-2 and Llama/Qwen3-style (RoPE, GQA, QK-norm,
    SwiGLU) blocks (`applies`); MoE layers, batches, padding and prompts go through `model.hidden_states`
    (`gpt.model.generation.hidden_states`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.simple = isinstance(model.positions, LearnedPositions) and all(  # GPT-2 attention: q, k, v of one shape, no norm on them
            isinstance(b.attn.q_norm, nn.Identity) and isinstance(b.attn.k_norm, nn.Identity)
            and b.attn.n_kv_heads == b.attn.n_heads for b in model.blocks)
        self.positions = torch.arange(model.config.max_seq_len, device=model.tok_embeddings.weight.device)
        # per-layer (keys, values) views of the last cache stepped, keyed by its buffers' address and layout: the
        # server hands in a new KVCache object over the same slot every step. (The views keep that one cache's
        # storage alive until another cache comes, so a key can never match freed, reused memory.)
        self._key: tuple | None = None
        self._views: list[tuple[torch.Tensor, torch.Tensor]] = []

    @staticmethod
    def applies(model: nn.Module) -> bool:
        blocks = getattr(model, "blocks", None)
        positions = getattr(model, "positions", None)
        if blocks is None or not isinstance(positions, (LearnedPositions, RotaryPositions)):
            return False
        return all(isinstance(b.mlp, (GeluMLP, SwiGLU)) for b in blocks)

    def __call__(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        model = self.model
        t = cache.length
        if t >= cache.capacity:
            raise RuntimeError(f"KV cache full: {t + 1} positions > capacity {cache.capacity}")
        key = (cache.keys.data_ptr(), cache.values.data_ptr(), cache.keys.shape, cache.keys.stride())
        if key != self._key:
            self._views = [(cache.keys[i], cache.values[i]) for i in range(cache.keys.shape[0])]  # (1, nkv, cap, hd)
            self._key = key
        position = self.positions[t:t + 1]
        x = model.positions.embed(model.tok_embeddings.forward(ids[0]), position)  # (1, C)
        for block, (keys, values) in zip(model.blocks, self._views):
            attn = block.attn
            qkv = attn.qkv.forward(block.attn_norm.forward(x))
            if self.simple:
                qkv = qkv.view(3, 1, attn.n_heads, 1, attn.head_dim)
                if qkv.dtype != keys.dtype:  # the cache may be kept in higher precision (see model.new_cache)
                    qkv = qkv.to(keys.dtype)
                q, k, v = qkv[0], qkv[1], qkv[2]
            else:
                hd, nh, nkv = attn.head_dim, attn.n_heads, attn.n_kv_heads
                q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
                q = attn.q_norm.forward(q.view(1, nh, 1, hd))  # (the norms act on the last dim only)
                k = attn.k_norm.forward(k.view(1, nkv, 1, hd))
                q, k = model.positions.rotate(q, k, position)
                v = v.view(1, nkv, 1, hd)
                if q.dtype != keys.dtype:
                    q = q.to(keys.dtype)
            keys[:, :, t:t + 1].copy_(k)
            values[:, :, t:t + 1].copy_(v)
            # 4-D (1, nh, 1, hd) as in CausalSelfAttention: 3-D inputs take a slower CPU kernel (2x, measured)
            y = F.scaled_dot_product_attention(q, keys[:, :, :t + 1], values[:, :, :t + 1],
                                               enable_gqa=attn.n_kv_heads != attn.n_heads)
            x = x + attn.out.forward(y.view(1, -1).to(x.dtype))
            x = x + block.mlp.forward(block.mlp_norm.forward(x))
        cache.advance(1)
        return model.final_norm.forward(x).view(1, 1, -1)


def warm_up(model: nn.Module) -> None:
    """Decode two tokens once, so that one-time costs (kernel selection and JIT code in oneDNN/MKL/fbgemm, the
    OpenMP thread pool, first allocations) are paid at load time, not inside a user's first timed completion."""
    generate = getattr(model, "generate", None)
    if generate is None or not hasattr(model, "config"):
        return
    device = next(model.parameters()).device
    generate(torch.zeros(1, 1, dtype=torch.long, device=device), 2, temperature=0.0)


def prepare_for_inference(model: nn.Module, warm: bool = True) -> nn.Module:
    """Swap the model's CPU `nn.Linear` layers for `DecodeLinear` (in place) and lay out fp32 weights for GEMV;
    drop `nn.Dropout(p=0)` layers (an identity that still costs a module call and an op per use, ~13 per decode
    step of the seed model); give a dense model its `OneTokenStep` (`model.one_token_step`, which
    generation and the server use for single-sequence decode steps); then, with `warm`, `warm_up` the model.

    Returns `model`. Call it after moving the model to its final device and dtype. The results equal the
    unprepared model's up to float rounding (the kernels sum in a different order). A prepared model still
    trains: dropout with p > 0 is kept.
    """
    swaps = [(name, module) for name, module in model.named_modules()
             if type(module) is nn.Linear and module.weight.device.type == "cpu"]
    for name, linear in swaps:
        layer = DecodeLinear.from_linear(linear)
        _replace(model, name, layer)
        if layer.weight.dtype == torch.float32:
            _store_transposed(layer.weight)
    for name in [name for name, m in model.named_modules() if type(m) is nn.Dropout and m.p == 0]:
        _replace(model, name, nn.Identity())
    if OneTokenStep.applies(model):
        model.one_token_step = OneTokenStep(model)
    if warm:
        warm_up(model)
    return model
