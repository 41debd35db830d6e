"""Training loop: schedules, param groups, clipping, accumulation, precision, non-finite guard, checkpoints,
exact resume and the resume policy. Tiny real models on tiny token shards written by the real ShardWriter."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import safetensors.torch
import torch

from gpt.config import ConfigError
from gpt.data.shards import ShardWriter, TokenShards
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.train.checkpoints import CheckpointManager, ResumeError, optimizer_from_flat, optimizer_to_flat
from gpt.train.config import TrainConfig
from gpt.train.device import Precision
from gpt.train.loop import NonFiniteLossError, train
from gpt.train.optim import build_optimizer, lr_at, param_groups
from gpt.train.step import train_step

VOCAB = 64
LINEAGE = {"tokenizer_sha256": "t" * 64, "train_manifest_sha256": "a", "val_manifest_sha256": "b"}


def tiny_model(seed: int = 0, **overrides) -> DecoderOnlyTransformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, dropout=0.0)
    return DecoderOnlyTransformer(ModelConfig.from_preset("tiny", **{**cfg, **overrides}))


def write_split(path, n_tokens: int, seed: int) -> TokenShards:
    rng = np.random.default_rng(seed)
    # a learnable stream: mostly "next = current + 1 (mod 61)", some noise
    tokens = (np.arange(n_tokens) * 1) % 61 + 3
    noise = rng.random(n_tokens) < 0.1
    tokens[noise] = rng.integers(3, VOCAB, noise.sum())
    writer = ShardWriter(path, path.name, VOCAB, "t" * 64, shard_tokens=1000)
    writer.add_document(tokens, num_bytes=2 * n_tokens)
    writer.close()
    return TokenShards(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return write_split(root / "train", 5000, 1), write_split(root / "val", 1200, 2)


def cfg(**overrides) -> TrainConfig:
    base = dict(max_steps=6, batch_size=4, seq_len=16, lr=1.0e-2, warmup_steps=2, eval_every=3, eval_windows=4,
                checkpoint_every=3, keep_last=2, precision="fp32", device="cpu", progress=False, log_every=1)
    return TrainConfig(**{**base, **overrides})


def run(model, c, shards, ckpt_dir, live_dir=None):
    train_data, val_data = shards
    return train(model, c, train_data, val_data, ckpt_dir, model.config.to_dict(), LINEAGE, live_dir=live_dir)


# ---- schedule, param groups, accumulation, clipping ----
def test_cosine_schedule_warms_up_then_decays_to_min():
    c = cfg(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule="cosine")
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warmup
    assert lr_at(100, c) == pytest.approx(0.1) and lrs[55] == pytest.approx(0.55)  # halfway = mean of max, min


def test_wsd_schedule_is_flat_then_decays_in_last_fraction():
    c = cfg(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(s, c) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(80, c) < 1.0 and lr_at(99, c) == pytest.approx(0.0)
    assert lr_at(90, c) == pytest.approx(0.45)


def test_param_groups_decay_matrices_only_and_cover_every_param_once():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    ids = [id(p) for p in decay["params"] + no_decay["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert any(p is model.lm_head.weight for p in decay["params"])  # tied embedding, decayed once
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


def test_accumulation_4x2_equals_batch_8(shards):
    batch = shards[0].get_batch(0, 8, 16, seed=3)
    results = []
    for micro in ([batch], list(batch.chunk(4))):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # update == -gradient (Adam would hide the scale)
        res = train_step(model, opt, micro, Precision("fp32", "cpu"), grad_clip=0.0)
        results.append((res, model.state_dict()))
    (r1, s1), (r2, s2) = results
    assert r1.loss == pytest.approx(r2.loss, rel=1e-6) and r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-5)
    for key in s1:
        torch.testing.assert_close(s1[key], s2[key], rtol=1e-5, atol=1e-6)


def test_clipping_limits_the_update_to_max_norm(shards):
    batch = shards[0].get_batch(0, 4, 16, seed=3)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)  # update == -clipped gradient
    res = train_step(model, sgd, [batch], Precision("fp32", "cpu"), grad_clip=0.05)
    delta = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert res.grad_norm > 0.05 and float(delta) == pytest.approx(0.05, rel=1e-4)


def test_bf16_autocast_trains_on_cpu(shards, tmp_path):
    result, _ = run(tiny_model(), cfg(precision="bf16", max_steps=12, eval_every=12, checkpoint_every=12),
                    shards, tmp_path / "ckpt")
    assert math.isfinite(result.val_loss) and result.val_loss < math.log(VOCAB) - 0.3


def test_tokens_per_step_sets_accumulation_and_must_divide():
    assert cfg(tokens_per_step=4 * 16 * 4).grad_accum_steps(world_size=1) == 4
    assert cfg(tokens_per_step=4 * 16 * 4).grad_accum_steps(world_size=2) == 2
    with pytest.raises(ConfigError, match="train.tokens_per_step"):
        cfg(tokens_per_step=100).grad_accum_steps(1)


# ---- non-finite guard ----
class NanAfter(DecoderOnlyTransformer):
    """A model whose loss turns NaN from its `bad_call`-th training forward on."""

    def __init__(self, config, bad_call):
        super().__init__(config)
        self.calls, self.bad_call = 0, bad_call

    def forward(self, input_ids, labels=None, attention_mask=None, targets=None):
        logits, loss = super().forward(input_ids, labels, attention_mask, targets)
        if self.training:
            self.calls += 1
            if self.calls >= self.bad_call:
                loss = loss * float("nan")
        return logits, loss


def test_nonfinite_loss_stops_naming_the_step(shards, tmp_path):
    model = NanAfter(tiny_model().config, bad_call=3)
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        run(model, cfg(), shards, tmp_path / "ckpt")


def test_nonfinite_skip_leaves_weights_unchanged_then_gives_up(shards, tmp_path):
    model = NanAfter(tiny_model().config, bad_call=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_skips"):
        run(model, cfg(on_nonfinite="skip", max_nonfinite_skips=2), shards, tmp_path / "ckpt")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---- checkpoints and resume ----
def test_optimizer_state_round_trips_through_safetensors_and_json(shards, tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, cfg(), "cpu")
    train_step(model, opt, [shards[0].get_batch(0, 2, 16, 1)], Precision("fp32", "cpu"), 1.0)
    tensors, meta = optimizer_to_flat(opt)
    safetensors.torch.save_file(tensors, tmp_path / "o.safetensors")
    restored = optimizer_from_flat(safetensors.torch.load_file(tmp_path / "o.safetensors"), meta)
    original = opt.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for index, state in original["state"].items():
        for name, value in state.items():
            assert torch.equal(restored["state"][index][name], value), (index, name)


class StopAt:
    """Data source that raises KeyboardInterrupt when asked for `stop_step` (simulates Ctrl-C mid-run)."""

    def __init__(self, data, stop_step):
        self.data, self.stop_step = data, stop_step

    def get_batch(self, step, *args, **kwargs):
        if step == self.stop_step:
            raise KeyboardInterrupt
        return self.data.get_batch(step, *args, **kwargs)


def final_state(ckpt_dir):
    path = CheckpointManager(ckpt_dir).latest()
    return (safetensors.torch.load_file(path / "model.safetensors"),
            safetensors.torch.load_file(path / "optimizer.safetensors"))


def test_resume_is_bit_identical_to_an_uninterrupted_run(shards, tmp_path):
    c = cfg(max_steps=6, checkpoint_every=3)
    full, _ = run(tiny_model(dropout=0.1), c, shards, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model(dropout=0.1), c, (StopAt(shards[0], 4), shards[1]), tmp_path / "resumed")
    assert CheckpointManager(tmp_path / "resumed").latest().name == "step-000003"
    resumed, _ = run(tiny_model(seed=99, dropout=0.1), c, shards, tmp_path / "resumed")  # other init: all loaded
    assert resumed.resumed_from == 3 and resumed.val_loss == full.val_loss
    (w1, o1), (w2, o2) = final_state(tmp_path / "full"), final_state(tmp_path / "resumed")
    assert w1.keys() == w2.keys() and o1.keys() == o2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and all(torch.equal(o1[k], o2[k]) for k in o1)


def test_changed_params_start_fresh_or_fail_clearly(shards, tmp_path):
    run(tiny_model(), cfg(max_steps=6, checkpoint_every=3), shards, tmp_path / "c")
    with pytest.raises(ResumeError, match="train.lr"):
        run(tiny_model(), cfg(max_steps=6, lr=2.0e-2, resume="strict"), shards, tmp_path / "c")
    result, _ = run(tiny_model(), cfg(max_steps=6, lr=2.0e-2), shards, tmp_path / "c")
    assert result.resumed_from == 0


def test_completed_run_is_not_retrained(shards, tmp_path):
    first, _ = run(tiny_model(), cfg(), shards, tmp_path / "c")
    again, _ = run(tiny_model(seed=5), cfg(), shards, tmp_path / "c")
    assert again.resumed_from == 6 and again.val_loss == first.val_loss


def test_manager_keeps_last_k_and_best(tmp_path):
    model = tiny_model()
    opt = build_optimizer(model, cfg(), "cpu")
    manager = CheckpointManager(tmp_path, keep_last=2, keep_best=True)
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.4)]:
        manager.save(model, opt, {"step": step, "val_loss": val})
    assert [s for s, _ in manager.steps()] == [2, 4, 5]
    assert manager.best().name == "step-000002"
    (tmp_path / ".tmp-step-000006-x").mkdir()  # a crash mid-write leaves only a temp dir
    assert manager.latest().name == "step-000005"


def test_train_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="train.warmup_steps"):
        TrainConfig(max_steps=10, warmup_steps=20)
    with pytest.raises(ConfigError, match="train.lr"):
        dataclasses.replace(cfg(), lr=0.0)


@pytest.mark.slow
def test_torch_compile_trains_like_eager(shards, tmp_path):
    c = cfg(max_steps=3, checkpoint_every=3, eval_every=3)
    eager, _ = run(tiny_model(), c, shards, tmp_path / "eager")
    compiled, _ = run(tiny_model(), dataclasses.replace(c, compile=True), shards, tmp_path / "compiled")
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-3)


def test_moe_model_trains_and_logs_router_load(shards, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig.from_preset("moe", vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                     max_seq_len=32, d_ff=64)
    model = DecoderOnlyTransformer(config)
    result, _ = run(model, cfg(max_steps=2, checkpoint_every=2, eval_every=2), shards, tmp_path / "c",
                    live_dir=tmp_path / "live")
    assert math.isfinite(result.val_loss)
    assert list((tmp_path / "live/plots/metrics/moe").rglob("*.tsv"))  # expert load per layer


def test_fp16_with_grad_scaler_trains_and_resumes_exactly(shards, tmp_path):
    """The GPU-only-in-practice fp16 path (autocast fp16 + GradScaler), run on CPU: scaler state is checkpointed."""
    c = cfg(precision="fp16", max_steps=4, checkpoint_every=2, eval_every=2)
    full, _ = run(tiny_model(), c, shards, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model(), c, (StopAt(shards[0], 2), shards[1]), tmp_path / "resumed")
    state = CheckpointManager(tmp_path / "resumed").read_state(tmp_path / "resumed/step-000002")
    assert state["precision"] == "fp16" and state["scaler"]["scale"] > 0
    resumed, _ = run(tiny_model(seed=7), c, shards, tmp_path / "resumed")
    assert resumed.resumed_from == 2 and math.isfinite(full.val_loss)
    (w1, _), (w2, _) = final_state(tmp_path / "full"), final_state(tmp_path / "resumed")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
