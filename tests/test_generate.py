"""Generation: KV-cache decoding equals full recompute, sampling filters, EOS, padding, context limits."""

from __future__ import annotations

import pytest
import torch

from gpt.model import sample_next_token
from tests.test_model import VARIANTS, build, small


def prompt(B: int = 2, T: int = 7, seed: int = 0, vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", VARIANTS + ["tiny-untied-mqa"])
def test_cached_decoding_equals_full_recompute(preset):
    config = small("tiny", tie_embeddings=False, n_kv_heads=1) if preset == "tiny-untied-mqa" else small(preset)
    model = build(config)
    ids = prompt(T=5)
    cached = model.generate(ids, max_new_tokens=20, temperature=0)
    recomputed = model.generate(ids, max_new_tokens=20, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    # logits of every position fed one token at a time through the cache == one full forward
    with torch.no_grad():
        full = model(cached)[0]
        cache = model.new_cache(cached.shape[0])
        steps = [model.lm_head(model.hidden_states(cached[:, :5], cache=cache))]
        steps += [model.lm_head(model.hidden_states(cached[:, t:t + 1], cache=cache)) for t in range(5, 25)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_chunked_prefill_after_cache_equals_full_forward():
    model = build(small("qwen3-style"))
    ids = prompt(T=12)
    with torch.no_grad():
        cache = model.new_cache(2)
        first = model.lm_head(model.hidden_states(ids[:, :5], cache=cache))
        rest = model.lm_head(model.hidden_states(ids[:, 5:], cache=cache))  # 7 queries after 5 cached keys
        torch.testing.assert_close(torch.cat([first, rest], 1), model(ids)[0], atol=1e-5, rtol=0)


def test_stream_yields_the_tokens_generate_returns():
    model = build(small())
    ids = prompt()
    streamed = list(model.stream(ids, max_new_tokens=8, temperature=0))
    assert len(streamed) == 8 and streamed[0].shape == (2,)
    assert torch.equal(torch.stack(streamed, 1), model.generate(ids, 8, temperature=0)[:, 7:])


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = build(small())
    ids = prompt()
    runs = [model.generate(ids, 15, temperature=1.0, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = build(small())
    ids = prompt()
    greedy = model.generate(ids, 10, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(ids, 10, temperature=1.3, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(ids, 10, temperature=1.3, top_p=1e-6, generator=g), greedy)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next_token(logits, 1.0, top_k=3, generator=g).tolist()) == {0, 1, 2}
    probs = logits[0].softmax(-1)  # ≈ .64 .23 .09 .03 ...: top_p=0.8 needs the first two only
    assert probs[0] < 0.8 < probs[:2].sum()
    assert set(sample_next_token(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert len(set(sample_next_token(logits, 1.0, generator=g).tolist())) == 6


def test_each_sequence_stops_at_its_own_eos():
    model = build(small())
    ids = prompt()
    free = model.generate(ids, 12, temperature=0)
    new0, new1 = free[0, 7:].tolist(), free[1, 7:].tolist()
    # EOS := the first token of sequence 0 that sequence 1 never produces
    j = next(j for j, tok in enumerate(new0) if tok not in new1 and tok not in new0[:j])
    eos, end = new0[j], 7 + j + 1
    stopped = model.generate(ids, 12, temperature=0, eos_token_id=eos)
    assert torch.equal(stopped[0, :end], free[0, :end])
    assert (stopped[0, end:] == eos).all()  # padded with EOS after stopping
    assert torch.equal(stopped[1], free[1])  # the other sequence is unaffected
    # generation ends early once every sequence has stopped
    assert model.generate(ids[:1], 12, temperature=0, eos_token_id=[eos]).shape == (1, end)

@pytest.mark.parametrize("preset", ["tiny", "qwen3-style"])
def test_left_padded_batch_generates_like_single_prompts(preset):
    model = build(small(preset))
    short, long = prompt(1, 4, seed=1), prompt(1, 9, seed=2)
    batch = torch.cat([torch.cat([torch.full((1, 5), 3), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    out = model.generate(batch, 10, temperature=0, attention_mask=mask)
    assert torch.equal(out[0, 5:], model.generate(short, 10, temperature=0)[0])
    assert torch.equal(out[1], model.generate(long, 10, temperature=0)[0])


def test_long_prompt_is_left_truncated_and_decoding_slides_past_the_context():
    model = build(small())  # max_seq_len 32
    ids = prompt(1, 40)
    out = model.generate(ids, 5, temperature=0)
    assert torch.equal(out[:, 40:], model.generate(ids[:, -32:], 5, temperature=0)[:, 32:])
    long_run = model.generate(prompt(1, 4), 60, temperature=0)  # 64 tokens through a 32-token window
    assert long_run.shape == (1, 64)


def test_generate_restores_training_mode_and_checks_arguments():
    model = build(small()).train()
    model.generate(prompt(), 2)
    assert model.training
    for bad in [dict(temperature=-1.0), dict(top_k=0), dict(top_p=1.5), dict(max_new_tokens=-1)]:
        with pytest.raises(ValueError):
            model.generate(prompt(), **{"max_new_tokens": 2, **bad})
    assert torch.equal(model.generate(prompt(), 0), prompt())


@pytest.mark.parametrize("preset", ["tiny", "qwen3-style"])
def test_bf16_decoding_tracks_the_full_forward(preset):
    model = build(small(preset)).to(torch.bfloat16)
    ids = model.generate(prompt(T=5), 12, temperature=0)
    assert model.new_cache(1).keys.dtype == torch.float32  # CPU: bf16 model, fp32 cache
    with torch.no_grad():
        full = model(ids)[0].float()
        cache = model.new_cache(2)
        steps = [model.lm_head(model.hidden_states(ids[:, :5], cache=cache))]
        steps += [model.lm_head(model.hidden_states(ids[:, t:t + 1], cache=cache)) for t in range(5, 17)]
    torch.testing.assert_close(torch.cat(steps, 1).float(), full, atol=3e-2, rtol=3e-2)
