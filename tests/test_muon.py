"""Muon: the Newton–Schulz iteration orthogonalises, every parameter is in exactly one group, a Muon run trains, and
its optimizer state round-trips exactly through a state dict (what checkpoints store)."""

from __future__ import annotations

import copy

import pytest
import torch

from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.train.muon import SINGULAR_VALUE_BAND, Muon, build_muon, orthogonalize, split_params


def _with_spectrum(rows: int, cols: int, low: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random matrix U diag(s) Vᵀ whose singular values s span [low, 1] log-uniformly (condition number 1/low)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    s = torch.logspace(0, torch.log10(torch.tensor(low)).item(), k)
    return u @ torch.diag(s) @ v.T, u, v


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96)])
def test_newton_schulz_output_is_close_to_orthogonal(shape):
    """Singular values spanning a 100× range all land in the documented band; singular vectors are kept."""
    g, u, v = _with_spectrum(*shape, low=0.01, seed=0)
    x = orthogonalize(g * 7.0, dtype=torch.float32)  # the overall scale does not matter
    assert x.shape == g.shape
    s = torch.linalg.svdvals(x)
    lo, hi = SINGULAR_VALUE_BAND
    assert s.min() > lo and s.max() < hi, (s.min(), s.max())
    core = u.T @ x @ v  # diagonal when x = U f(S) Vᵀ
    off_diagonal = core - torch.diag(torch.diagonal(core))
    assert off_diagonal.abs().max() < 1e-3


def test_newton_schulz_batches_expert_banks():
    g = torch.stack([_with_spectrum(48, 24, low=0.01, seed=i)[0] for i in range(4)])
    x = orthogonalize(g, dtype=torch.float32)
    for i in range(4):
        assert torch.allclose(x[i], orthogonalize(g[i], dtype=torch.float32), atol=1e-5)


def test_the_band_check_can_fail():
    """Without the iteration the same matrices are far outside the band (the check above is not vacuous)."""
    g, _, _ = _with_spectrum(64, 64, low=0.01, seed=0)
    assert torch.linalg.svdvals(g).min() < SINGULAR_VALUE_BAND[0]


@pytest.mark.parametrize("preset", ["tiny", "qwen3-style", "moe"])
def test_each_parameter_is_in_exactly_one_group(preset):
    model = DecoderOnlyTransformer(ModelConfig.from_preset(preset, vocab_size=64, n_layers=2))
    muon, decay, no_decay = split_params(model)
    ids = [id(p) for p in muon + decay + no_decay]
    assert len(ids) == len(set(ids)) == len({id(p) for p in model.parameters()})
    assert muon and all(p.dim() >= 2 for p in muon)
    assert model.tok_embeddings.weight in decay  # embeddings / head stay on AdamW
    assert all(p.dim() < 2 for p in no_decay)


def _batch(vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(seed))


def test_muon_trains_and_resumes_exactly_from_its_state_dict():
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(ModelConfig.from_preset("tiny", vocab_size=64, n_layers=2, d_model=32,
                                                           n_heads=2, max_seq_len=32, dropout=0.0))
    opt = build_muon(model, lr=3e-3, muon_lr=0.02, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)

    def step(m, o, seed):
        ids = _batch(64, seed)
        _, loss = m(ids, labels=ids)
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()
        return loss.item()

    losses = [step(model, opt, s % 3) for s in range(30)]
    assert losses[-1] < losses[0] - 0.5  # it learns the three repeated batches
    # fork: continue the original, and a copy rebuilt from state dicts (as a checkpoint resume does)
    model2 = copy.deepcopy(model)
    opt2 = build_muon(model2, lr=3e-3, muon_lr=0.02, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for s in range(5):
        assert step(model, opt, s) == step(model2, opt2, s)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_muon_groups_refuse_vectors():
    with pytest.raises(ValueError, match="matrices"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(3))], "use_muon": True}])


def test_same_shape_matrices_are_orthogonalised_together_with_the_per_matrix_result():
    """The step stacks matrices of one shape into one batched iteration; each update equals the matrix alone."""
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(ModelConfig.from_preset("tiny", vocab_size=64, n_layers=3, d_model=32,
                                                           n_heads=2, max_seq_len=32, dropout=0.0))
    opt = build_muon(model, lr=3e-3, muon_lr=0.02, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                     ns_dtype="float32")
    ids = _batch(64, 0)
    model(ids, labels=ids)[1].backward()
    muon_params = opt.param_groups[0]["params"]
    shapes = [tuple(p.shape) for p in muon_params]
    assert len(set(shapes)) < len(shapes)  # something is batched
    before = [p.detach().clone() for p in muon_params]
    expected = []
    for p, old in zip(muon_params, before, strict=True):  # first step: momentum buffer = (1 - beta) grad
        direction = p.grad.lerp((1 - 0.95) * p.grad, 0.95)
        scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
        expected.append(old - 0.02 * scale * orthogonalize(direction, dtype=torch.float32))
    opt.step()
    for p, want in zip(muon_params, expected, strict=True):
        torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=1e-5)
