"""Model behaviour: config validation, parameter count, init, loss at init, ignore_index, causality, padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpt.config import ConfigError
from gpt.model import PRESETS, DecoderOnlyTransformer, ModelConfig, model_config_from_params, next_token_loss
from gpt.model.__main__ import parameter_breakdown

VARIANTS = ["tiny", "qwen3-style", "moe", "hybrid"]


def small(preset: str = "tiny", **overrides) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, dropout=0.0)
    if PRESETS[preset].get("d_ff"):
        base["d_ff"] = 48
    return ModelConfig.from_preset(preset, **{**base, **overrides})


def build(config: ModelConfig, seed: int = 0) -> DecoderOnlyTransformer:
    torch.manual_seed(seed)
    return DecoderOnlyTransformer(config).eval()


def test_seed_defaults_and_parameter_count():
    config = ModelConfig()
    assert (config.vocab_size, config.d_model, config.n_layers, config.n_heads, config.max_seq_len) == (
        65536, 768, 6, 12, 512)
    with torch.device("meta"):  # no memory, no init cost
        model = DecoderOnlyTransformer(config)
    expected = sum(n for _, n in parameter_breakdown(config))
    assert model.num_parameters() == expected == 93_253_632
    assert model.num_parameters(active=True) == expected  # dense: every parameter is active


def test_lm_head_is_tied_to_embedding_and_untied_on_request():
    tied = build(small())
    assert tied.lm_head.weight is tied.tok_embeddings.weight
    untied = build(small(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_embeddings.weight
    assert untied.num_parameters() == tied.num_parameters() + 97 * 32


@pytest.mark.parametrize("preset", VARIANTS)
def test_loss_at_init_is_close_to_ln_vocab(preset):
    config = small(preset, vocab_size=1000)
    model = build(config)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(1))
    logits, loss = model(ids, labels=ids)
    assert logits.shape == (4, 32, 1000)
    assert abs(loss.item() - math.log(1000)) < 0.3


def test_ignored_labels_do_not_count():
    model = build(small())
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, 3:9] = -100
    labels[1, 10:] = -100
    logits, loss = model(ids, labels=labels)
    keep = labels[:, 1:] != -100
    manual = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(loss, manual)
    # changing the ignored label values to other ignored values changes nothing; changing a counted one does
    assert model(ids, labels=labels)[1].item() == loss.item()
    labels[0, 1] = (labels[0, 1] + 1) % 97
    assert model(ids, labels=labels)[1].item() != loss.item()


def test_a_window_one_token_longer_than_the_inputs_scores_every_position():
    model = build(small())
    window = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(3))
    _, with_labels = model(window, labels=window)  # 16 scored positions out of 17
    logits, with_window = model(window[:, :-1], labels=window)  # the training step's call: all 16 scored
    torch.testing.assert_close(with_labels, with_window)
    torch.testing.assert_close(with_window, F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten()))
    assert torch.equal(next_token_loss(logits, window), with_window)
    with pytest.raises(ValueError, match="expected \\(B, T\\) or \\(B, T \\+ 1\\)"):
        model(window[:, :-2], labels=window)


def test_each_part_initialises_its_own_weights_gpt2_style():
    config = small("hybrid", n_layers=4, bias=True, init_std=0.5)  # large std: the sample std is clearly visible
    model = build(config)
    residual = config.init_std / math.sqrt(2 * config.n_layers)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(param == 0), name
        elif "norm" in name:
            assert torch.all(param == 1), name
        else:  # residual projections: attention out, (shared) MLP proj, the experts' output projections
            is_residual = name.endswith(("attn.out.weight", "proj.weight", "experts_proj"))
            expected = residual if is_residual else config.init_std
            assert param.std().item() == pytest.approx(expected, rel=0.2), name


@pytest.mark.parametrize("preset", VARIANTS)
def test_changing_a_token_leaves_earlier_logits_unchanged(preset):
    model = build(small(preset))
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    t = 12
    changed[0, t] = (changed[0, t] + 1) % 97
    with torch.no_grad():
        a, b = model(ids)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:])  # and the change is visible from t on


@pytest.mark.parametrize("preset", ["tiny", "qwen3-style"])
def test_left_padding_with_attention_mask_matches_unpadded(preset):
    model = build(small(preset))
    short = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(5))
    long = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(6))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :4] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask)[0]
        torch.testing.assert_close(padded[0, 4:], model(short)[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[1], model(long)[0][0], atol=1e-5, rtol=1e-5)


def test_sequence_longer_than_context_raises():
    model = build(small())
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=100, n_heads=12), "model.d_model: 100 is not divisible by n_heads=12"),
        (dict(n_layers=0), "model.n_layers: must be a positive integer"),
        (dict(vocab_size=-5), "model.vocab_size"),
        (dict(dropout=1.5), "model.dropout"),
        (dict(n_kv_heads=5), "model.n_kv_heads: 5 must be positive and divide n_heads=12"),
        (dict(moe_n_experts=2, moe_top_k=3), "model.moe_top_k"),
        (dict(activation="swish"), "model.activation: 'swish' is not one of"),
        (dict(norm="batchnorm"), "model.norm"),
        (dict(d_model="768"), "model.d_model: expected an integer"),
        (dict(d_modle=768), r"unknown key\(s\) \['d_modle'\]"),
    ],
)
def test_bad_configs_raise_config_error_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(overrides)
    assert issubclass(ConfigError, ValueError)


def test_model_config_from_params():
    config = model_config_from_params({"preset": "tiny", "n_layers": 2, "vocab_size": None}, vocab_size=5000)
    assert (config.vocab_size, config.n_layers, config.d_model) == (5000, 2, PRESETS["tiny"]["d_model"])
    assert model_config_from_params({}, vocab_size=300).vocab_size == 300  # preset defaults to tiny
    assert model_config_from_params({"vocab_size": 6016}, vocab_size=6000).vocab_size == 6016
    with pytest.raises(ConfigError, match="smaller than the tokenizer"):
        model_config_from_params({"vocab_size": 100}, vocab_size=6000)
    with pytest.raises(ConfigError, match="model.preset: unknown preset 'gpt5'"):
        model_config_from_params({"preset": "gpt5"}, vocab_size=300)
    with pytest.raises(ConfigError, match=r"model: unknown key\(s\) \['lr'\]"):
        model_config_from_params({"lr": 0.1}, vocab_size=300)


def test_config_dict_round_trip_and_presets_build():
    for name in PRESETS:
        config = ModelConfig.from_preset(name)
        assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_preset("gpt2") == ModelConfig()  # issue 7's name for the seed model


def test_verify_installation_output(capsys):
    from gpt.model.__main__ import main

    main(["--preset", "tiny", "--explain"])
    out = capsys.readouterr().out
    config = ModelConfig.from_preset("tiny")
    assert f"Logits shape: torch.Size([2, 16, {config.vocab_size}])" in out
    assert "Generated shape: torch.Size([1, 25])" in out
    with torch.device("meta"):
        count = DecoderOnlyTransformer(config).num_parameters()
    assert f"Total parameters: {count:,}" in out
    loss = float(out.split("Loss: ")[1].split()[0])
    assert abs(loss - math.log(config.vocab_size)) < 0.3


@pytest.mark.parametrize("preset", ["tiny", "qwen3-style"])
def test_cpu_bf16_training_attention_runs_in_fp32_and_matches_the_bf16_kernel(preset):
    """Under CPU bf16 autocast with gradients, short sequences take attention through fp32 (the faster backward,
    gpt/model/attention.py) — also with QK-norm, whose float32 queries autocast would otherwise cast to bf16; the
    loss and gradients agree with bf16 attention to bf16 tolerance."""
    from gpt.model import attention

    torch.manual_seed(0)
    model = DecoderOnlyTransformer(ModelConfig.from_preset(preset, vocab_size=64, n_layers=2, max_seq_len=64,
                                                           d_model=64, n_heads=4, n_kv_heads=2))
    ids = torch.randint(0, 64, (2, 64))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids)[1]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    seen = []
    real_sdpa = attention.F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):  # the dtype the kernel runs in: autocast casts its inputs to bf16
        seen.append(torch.bfloat16 if torch.is_autocast_enabled("cpu") else q.dtype)
        return real_sdpa(q, *args, **kwargs)

    attention.F.scaled_dot_product_attention = spy
    try:
        fp32_loss, fp32_grads = loss_and_grads()
        assert seen == [torch.float32] * 2
        threshold, attention.FP32_ATTENTION_BELOW = attention.FP32_ATTENTION_BELOW, 0
        try:
            bf16_loss, bf16_grads = loss_and_grads()
        finally:
            attention.FP32_ATTENTION_BELOW = threshold
        assert seen[2:] == [torch.bfloat16] * 2
    finally:
        attention.F.scaled_dot_product_attention = real_sdpa
    torch.testing.assert_close(fp32_loss, bf16_loss, atol=2e-2, rtol=1e-2)
    for a, b in zip(fp32_grads, bf16_grads, strict=True):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference keeps the bf16 kernel
        seen.clear()
        attention.F.scaled_dot_product_attention = spy
        try:
            model(ids)
        finally:
            attention.F.scaled_dot_product_attention = real_sdpa
        assert seen == [torch.bfloat16] * 2


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_fused_head_and_loss_equal_logits_then_cross_entropy(dtype, monkeypatch):
    """model(..., labels, return_logits=False) (training's path: LM head + cross-entropy fused, chunked) gives the
    loss and gradients of the plain path, with ignored labels and several chunks; no logits are returned."""
    import contextlib

    from gpt.model import loss as loss_module

    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 64 * 10)  # 10 rows per chunk: 7 chunks below
    monkeypatch.setattr(loss_module, "MIN_CHUNK_ROWS", 10)
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(ModelConfig.from_preset("tiny", vocab_size=64, n_layers=2, max_seq_len=32))
    window = torch.randint(0, 64, (2, 33))
    labels = window.clone()
    labels[0, 3:11] = -100

    def run(return_logits):
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            logits, loss = model(window[:, :-1], labels=labels, return_logits=return_logits)
        loss.backward()
        return logits, loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_logits, plain_loss, plain_grads = run(True)
    fused_logits, fused_loss, fused_grads = run(False)
    assert plain_logits is not None and fused_logits is None
    tol = dict(atol=1e-5, rtol=1e-5) if dtype is None else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(fused_loss, plain_loss, **tol)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        if dtype is None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
        else:
            assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999
