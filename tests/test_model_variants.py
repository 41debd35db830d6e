"""Issue-7 variants: GQA, RoPE, QK-norm, SwiGLU, MoE (dispatch, aux loss, capacity), presets and their sizes."""

from __future__ import annotations

import pytest
import torch

from gpt.model import PRESETS, DecoderOnlyTransformer, ModelConfig
from gpt.model.mlp import SwiGLU
from gpt.model.moe import MoE, load_balancing_loss
from gpt.model.positions import RotaryPositions
from tests.test_model import build, small


def test_gqa_equals_mha_with_shared_key_value_heads():
    gqa = build(small("qwen3-style", n_heads=4, n_kv_heads=2))
    mha = DecoderOnlyTransformer(gqa.config.replace(n_kv_heads=4)).eval()
    state = gqa.state_dict()
    hd = gqa.config.resolved_head_dim
    for i in range(gqa.config.n_layers):
        for kind in ("weight",):
            q, k, v = state[f"blocks.{i}.attn.qkv.{kind}"].split([4 * hd, 2 * hd, 2 * hd])
            # query heads 0,1 share kv head 0 and 2,3 share kv head 1: duplicate each kv head for MHA
            dup = [t.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1) for t in (k, v)]
            state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([q, *dup])
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids)[0], mha(ids)[0], atol=1e-5, rtol=1e-5)
    assert gqa.new_cache(1).num_bytes() * 2 == mha.new_cache(1).num_bytes()  # cache holds only KV heads


def test_n_kv_heads_equal_to_n_heads_is_plain_mha():
    a = build(small("qwen3-style", n_kv_heads=None))
    b = build(small("qwen3-style", n_kv_heads=4))
    ids = torch.randint(0, 97, (1, 12))
    assert torch.equal(a(ids)[0], b(ids)[0])


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryPositions(max_seq_len=64, head_dim=8, theta=10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> torch.Tensor:
        qm, _ = rope.rotate(q, k, torch.tensor([m]))
        _, kn = rope.rotate(q, k, torch.tensor([n]))
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))
    torch.testing.assert_close(score(0, 0), (q * k).sum())  # position 0 is the identity
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_moe_with_one_expert_top1_equals_dense_swiglu():
    config = small("moe", moe_n_experts=1, moe_top_k=1, moe_shared_expert=False, moe_norm_topk=True)
    moe, dense = MoE(config), SwiGLU(config)
    with torch.no_grad():
        moe.experts_gate_up.copy_(dense.gate_up.weight.t())
        moe.experts_proj.copy_(dense.proj.weight.t())
    x = torch.randn(2, 7, 32)
    out, _ = moe(x)
    torch.testing.assert_close(out, dense(x))


@pytest.mark.parametrize("top_k, norm_topk", [(1, False), (2, True), (3, False)])
def test_vectorised_dispatch_equals_per_token_reference(top_k, norm_topk):
    torch.manual_seed(0)
    config = small("moe", moe_n_experts=4, moe_top_k=top_k, moe_norm_topk=norm_topk, moe_shared_expert=True)
    moe = MoE(config)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 9, 32)
    probs = torch.softmax(x @ moe.router.weight.t(), dim=-1)
    expected = torch.empty_like(x)
    for b in range(2):
        for t in range(9):
            weights, experts = probs[b, t].topk(top_k)
            if norm_topk:
                weights = weights / weights.sum()
            out = moe.shared(x[b, t])
            for w, e in zip(weights, experts):
                gate, up = (x[b, t] @ moe.experts_gate_up[e]).chunk(2)
                out = out + w * ((torch.nn.functional.silu(gate) * up) @ moe.experts_proj[e])
            expected[b, t] = out
    torch.testing.assert_close(moe(x)[0], expected, atol=1e-5, rtol=1e-5)


def test_load_balancing_loss_is_minimal_for_uniform_routing():
    E, N = 4, 64
    uniform = load_balancing_loss(torch.full((N, E), 1 / E), torch.full((E,), N // E))
    assert uniform.item() == pytest.approx(1.0)
    collapsed = load_balancing_loss(torch.eye(E)[[0] * N], torch.tensor([N, 0, 0, 0]))
    assert collapsed.item() == pytest.approx(E)
    for seed in range(5):
        logits = torch.randn(N, E, generator=torch.Generator().manual_seed(seed)) * 2
        probs = logits.softmax(-1)
        counts = torch.bincount(probs.argmax(-1), minlength=E)
        assert load_balancing_loss(probs, counts) > uniform


def test_aux_loss_is_added_in_training_mode_and_exposed():
    model = build(small("moe", moe_aux_loss_coef=0.5))
    ids = torch.randint(0, 97, (2, 16))
    eval_loss = model(ids, labels=ids)[1]
    model.train()
    train_loss = model(ids, labels=ids)[1]
    torch.testing.assert_close(train_loss - eval_loss, model.aux_loss)
    torch.testing.assert_close(model.aux_loss, 0.5 * model.last_aux_loss)
    stats = model.router_stats()
    loads = [v for k, v in stats.items() if k.startswith("layer0.expert")]
    assert len(loads) == 4 and sum(loads) == pytest.approx(1.0)
    assert stats["layer0.dropped_frac"] == 0.0
    dense = build(small())
    dense(ids, labels=ids)
    assert dense.aux_loss is None and dense.router_stats() == {}


def test_router_gets_gradient_from_the_lm_loss_with_switch_gating():
    model = build(small("moe", moe_aux_loss_coef=0.0)).train()
    ids = torch.randint(0, 97, (2, 16))
    model(ids, labels=ids)[1].backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0


def test_capacity_drops_and_counts_overflow_tokens():
    config = small("moe", moe_capacity_factor=0.5, moe_shared_expert=False)
    moe = MoE(config)
    x = torch.randn(4, 16, 32)
    out, _ = moe(x)
    assert moe.stats["dropped_frac"].item() >= 0.5 - 1e-6  # capacity for half the assignments at most
    dropped_rows = (out.reshape(-1, 32).abs().sum(-1) == 0).float().mean()
    assert dropped_rows.item() == pytest.approx(moe.stats["dropped_frac"].item())
    unlimited = MoE(config.replace(moe_capacity_factor=1000.0))
    unlimited.load_state_dict(moe.state_dict())
    no_capacity = MoE(config.replace(moe_capacity_factor=None))
    no_capacity.load_state_dict(moe.state_dict())
    torch.testing.assert_close(unlimited(x)[0], no_capacity(x)[0])


def test_parameter_counts_total_and_active():
    config = ModelConfig.from_preset("hybrid")  # MoE in blocks 1 and 3: 4 experts, top-2
    with torch.device("meta"):
        model = DecoderOnlyTransformer(config)
    per_expert = 3 * config.d_model * config.resolved_moe_d_ff
    n_moe_layers = sum(config.is_moe_layer(i) for i in range(config.n_layers))
    assert n_moe_layers == 2
    assert model.num_parameters() - model.num_parameters(active=True) == n_moe_layers * per_expert * (4 - 2)


@pytest.mark.parametrize("preset", ["tiny", "qwen3-style", "moe", "hybrid"])
def test_each_preset_learns_a_fixed_batch(preset):
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(small(preset, vocab_size=64)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_presets_describe_the_promised_architectures():
    q = ModelConfig.from_preset("qwen3-style")
    assert (q.norm, q.position, q.mlp, q.qk_norm, q.bias) == ("rmsnorm", "rope", "swiglu", True, False)
    assert q.kv_heads < q.n_heads
    m = ModelConfig.from_preset("moe")
    assert m.moe_n_experts > 1 and m.moe_shared_expert and all(m.is_moe_layer(i) for i in range(m.n_layers))
    h = ModelConfig.from_preset("hybrid")
    assert [h.is_moe_layer(i) for i in range(h.n_layers)] == [False, True, False, True]
    assert set(PRESETS) >= {"gpt2", "seed", "tiny", "gpt2-124m", "qwen3-style", "moe", "hybrid"}


@pytest.mark.parametrize("top_k, capacity", [(1, None), (2, 0.5)])
def test_single_token_decode_path_equals_the_dispatch_path(top_k, capacity):
    torch.manual_seed(0)
    moe = MoE(small("moe", moe_top_k=top_k, moe_capacity_factor=capacity))
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    x = torch.randn(1, 1, 32)
    dispatched, dispatched_aux = moe(x)  # autograd on: the sort/scatter path
    dispatched_stats = {k: v.clone() for k, v in moe.stats.items()}
    with torch.no_grad():
        one_token, one_token_aux = moe(x)
    torch.testing.assert_close(one_token, dispatched.detach())
    torch.testing.assert_close(one_token_aux, dispatched_aux.detach())
    assert all(torch.equal(moe.stats[k], v) for k, v in dispatched_stats.items())
