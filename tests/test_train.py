"""Training loop: schedules, param groups, clipping, accumulation, precision, non-finite guard, checkpoints,
exact resume and the resume policy. Tiny real models on tiny token shards written by the real ShardWriter."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import stat

import numpy as np
import pytest
import safetensors.torch
import torch

from gpt.config import ConfigError
from gpt.data.shards import ShardWriter, TokenShards
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.train.checkpoints import (
    CheckpointManager,
    ResumeError,
    file_digest,
    optimizer_from_flat,
    optimizer_to_flat,
    remove_leftovers,
)
from gpt.train.config import TrainConfig
from gpt.train.device import Precision
from gpt.train.loop import NonFiniteLossError, TrainingInterrupted, train
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

    def forward(self, input_ids, labels=None, attention_mask=None, return_logits=True):
        logits, loss = super().forward(input_ids, labels, attention_mask, return_logits)
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
    # DVC deletes metrics before a forced rerun: the no-op rerun reports the throughput the run measured, not 0
    assert again.tokens_per_second > 0 and 0 < again.train_seconds <= first.train_seconds
    trained_tokens = first.tokens_per_second * first.train_seconds  # all 6 steps' tokens, timed when trained
    assert again.tokens_per_second * again.train_seconds == pytest.approx(trained_tokens)


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


# ---- checkpoints that survive damage (issue 11 §2) ----
def test_checkpoint_records_file_sizes_and_hashes_with_ordinary_permissions(shards, tmp_path):
    run(tiny_model(), cfg(max_steps=3, checkpoint_every=3), shards, tmp_path / "c")
    path = tmp_path / "c/step-000003"
    state = CheckpointManager(tmp_path / "c").read_state(path)
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "state.json")
    assert sorted(state["files"]) == on_disk and "model.safetensors" in on_disk
    for name, meta in state["files"].items():
        assert meta == file_digest(path / name)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()} == {0o666 & ~umask}
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]  # no temp left


def _damage(path, how):
    if how == "missing state":
        (path / "state.json").unlink()
        return "state.json"
    how, name = how.split(" ", 1)
    file = path / name
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "zero-length":
        file.write_bytes(b"")
    else:  # flipped: same size, one byte of the tensor data changed
        file.write_bytes(data[:-9] + bytes([data[-9] ^ 0x40]) + data[-8:])
    return name


@pytest.mark.parametrize("how", ["truncated model.safetensors", "zero-length optimizer.safetensors",
                                 "flipped rng.safetensors", "flipped model.safetensors", "missing state"])
def test_damaged_latest_checkpoint_is_set_aside_and_the_run_falls_back(shards, tmp_path, caplog, how):
    c = cfg(max_steps=6, checkpoint_every=3)
    full, _ = run(tiny_model(), c, shards, tmp_path / "full")
    run(tiny_model(), c, shards, tmp_path / "c")
    name = _damage(tmp_path / "c/step-000006", how)
    with caplog.at_level(logging.WARNING):
        again, _ = run(tiny_model(seed=3), c, shards, tmp_path / "c")
    assert again.resumed_from == 3  # the newest intact one, then steps 4..6 again
    assert any("step-000006" in r.message and name in r.message for r in caplog.records), caplog.text
    aside = tmp_path / "c/step-000006.damaged-1"
    assert aside.is_dir() and (how == "missing state" or (aside / name).is_file())  # kept, not deleted
    (w1, o1), (w2, o2) = final_state(tmp_path / "full"), final_state(tmp_path / "c")
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and all(torch.equal(o1[k], o2[k]) for k in o1)
    assert again.val_loss == full.val_loss


def test_no_intact_checkpoint_starts_fresh_under_auto_and_fails_under_strict(shards, tmp_path, caplog):
    c = cfg(max_steps=3, checkpoint_every=3)
    run(tiny_model(), c, shards, tmp_path / "c")
    _damage(tmp_path / "c/step-000003", "truncated model.safetensors")
    with pytest.raises(ResumeError, match=r"step-000003.*model\.safetensors"):
        run(tiny_model(), dataclasses.replace(c, resume="strict"), shards, tmp_path / "c")
    assert (tmp_path / "c/step-000003").is_dir()  # strict changes nothing
    with caplog.at_level(logging.WARNING):
        again, _ = run(tiny_model(), c, shards, tmp_path / "c")
    assert again.resumed_from == 0 and "starting fresh" in caplog.text
    assert (tmp_path / "c/step-000003.damaged-1").is_dir() and (tmp_path / "c/step-000003/state.json").is_file()


def test_leftovers_of_killed_writes_and_interrupted_prunes_are_cleaned_at_start(shards, tmp_path, caplog):
    c = cfg(max_steps=3, checkpoint_every=3)
    run(tiny_model(), c, shards, tmp_path / "c")
    ckpt = tmp_path / "c"
    for leftover in (".step-000006.x1y2.tmp", ".tmp-step-000006-abc", ".old-step-000003-12"):
        (ckpt / leftover).mkdir()
        (ckpt / leftover / "model.safetensors").write_bytes(b"partial")
    (ckpt / "step-000001").mkdir()  # older than the newest complete one: an interrupted prune
    (ckpt / "step-000001" / "rng.safetensors").write_bytes(b"x")
    (ckpt / "step-000009").mkdir()  # newer and without state: damage, set aside
    with caplog.at_level(logging.WARNING):
        again, _ = run(tiny_model(), c, shards, tmp_path / "c")
    assert again.resumed_from == 3
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-000003", "step-000009.damaged-1"]
    assert "step-000009" in caplog.text


def test_remove_leftovers_next_to_an_output(tmp_path):
    (tmp_path / "model").mkdir()
    for name in (".model.a1b2.tmp", ".tmp-model-x", ".old-model-7", ".other.zz.tmp"):
        (tmp_path / name).mkdir()
    removed = remove_leftovers(tmp_path / "model")
    assert sorted(p.name for p in removed) == [".model.a1b2.tmp", ".old-model-7", ".tmp-model-x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.zz.tmp", "model"]


# ---- other runs' checkpoints are kept; extending a finished run ----
def test_changed_params_move_the_old_run_aside_and_changing_back_continues_it(shards, tmp_path, caplog):
    c = cfg(max_steps=6, checkpoint_every=3, keep_other_runs=1)
    first, _ = run(tiny_model(), c, shards, tmp_path / "c")
    fp = CheckpointManager(tmp_path / "c").read_state(tmp_path / "c/step-000006")["fingerprint"][:16]
    with caplog.at_level(logging.WARNING):
        other, _ = run(tiny_model(), dataclasses.replace(c, lr=2.0e-2), shards, tmp_path / "c")
    assert other.resumed_from == 0
    moved = tmp_path / "c/runs" / fp
    assert sorted(p.name for p in moved.iterdir()) == ["step-000003", "step-000006"]
    assert str(moved) in caplog.text and "train.lr" in caplog.text  # says where they went and why
    back, _ = run(tiny_model(seed=4), c, shards, tmp_path / "c")  # lr back: the first run, finished
    assert back.resumed_from == 6 and back.val_loss == first.val_loss
    assert [p.name for p in (tmp_path / "c/runs").iterdir()] != [fp]  # the lr=2e-2 run is the other run now
    run(tiny_model(), dataclasses.replace(c, lr=5.0e-3), shards, tmp_path / "c")
    assert len(list((tmp_path / "c/runs").iterdir())) == 1  # keep_other_runs: 1


def weights(ckpt_dir):
    return final_state(ckpt_dir)[0]


@pytest.mark.parametrize("schedule, old_max, new_max, continues_from", [
    ("constant", 6, 9, 6),  # lr never depends on max_steps: continue from the end
    ("wsd", 6, 12, 3),  # decay_fraction 0.5: the old decay started at 3 (pinned checkpoint), the new one at 6
    ("cosine", 6, 9, 0),  # the cosine curve after warmup depends on max_steps: start fresh
])
def test_raising_max_steps_on_a_finished_run(shards, tmp_path, caplog, schedule, old_max, new_max,
                                             continues_from):
    c = cfg(max_steps=old_max, checkpoint_every=3, keep_last=1, keep_best=False, schedule=schedule,
            decay_fraction=0.5)
    run(tiny_model(), c, shards, tmp_path / "c")
    longer = dataclasses.replace(c, max_steps=new_max)
    with caplog.at_level(logging.WARNING):
        extended, _ = run(tiny_model(), longer, shards, tmp_path / "c")  # fresh starts from the same init
    direct, _ = run(tiny_model(), longer, shards, tmp_path / "direct")
    assert extended.resumed_from == continues_from
    assert extended.val_loss == direct.val_loss
    w1, w2 = weights(tmp_path / "c"), weights(tmp_path / "direct")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    if continues_from == 0:
        assert "learning rate" in caplog.text and list((tmp_path / "c/runs").iterdir())


# ---- SIGINT / SIGTERM ----
class SignalAt:
    """Data source that sends this process `signum` while fetching the batch of `at_step`."""

    def __init__(self, data, at_step, signum):
        self.data, self.at_step, self.signum = data, at_step, signum

    def get_batch(self, step, *args, **kwargs):
        if step == self.at_step:
            os.kill(os.getpid(), self.signum)
        return self.data.get_batch(step, *args, **kwargs)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_at_the_current_step_and_the_rerun_matches(shards, tmp_path, signum):
    c = cfg(max_steps=6, checkpoint_every=3)
    run(tiny_model(dropout=0.1), c, shards, tmp_path / "full")
    with pytest.raises(TrainingInterrupted) as stopped:
        run(tiny_model(dropout=0.1), c, (SignalAt(shards[0], 3, signum), shards[1]), tmp_path / "stopped")
    assert stopped.value.step == 4 and stopped.value.exit_code == 128 + signum
    assert CheckpointManager(tmp_path / "stopped").latest().name == "step-000004"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed, _ = run(tiny_model(dropout=0.1), c, shards, tmp_path / "stopped")
    assert resumed.resumed_from == 4
    (w1, o1), (w2, o2) = final_state(tmp_path / "full"), final_state(tmp_path / "stopped")
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and all(torch.equal(o1[k], o2[k]) for k in o1)


# ---- messages and output ----
class NanGradients(DecoderOnlyTransformer):
    """Finite loss, NaN gradients (what a corrupted-but-loadable checkpoint produced)."""

    def __init__(self, config):
        super().__init__(config)
        self.lm_head.weight.register_hook(lambda grad: grad * float("nan"))


def test_nonfinite_gradient_norm_is_named_as_such(shards, tmp_path):
    model = NanGradients(tiny_model().config)
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm .* at step 1") as err:
        run(model, cfg(), shards, tmp_path / "ckpt")
    assert "non-finite loss" not in str(err.value)


def test_progress_bar_is_quiet_when_stderr_is_not_a_terminal(shards, tmp_path, capsys):
    run(tiny_model(), cfg(max_steps=2, checkpoint_every=2, progress=True), shards, tmp_path / "c")
    assert "train:" not in capsys.readouterr().err


def test_muon_run_resumes_bit_identically(shards, tmp_path):
    """train.optimizer=muon through the real loop: checkpointed Muon momentum restores exactly (resumed = full)."""
    c = cfg(optimizer="muon", muon_lr=2.0e-2)
    full, _ = run(tiny_model(), c, shards, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model(), c, (StopAt(shards[0], 4), shards[1]), tmp_path / "resumed")
    resumed, _ = run(tiny_model(seed=99), c, shards, tmp_path / "resumed")
    assert resumed.resumed_from == 3 and resumed.val_loss == full.val_loss
    (w1, o1), (w2, o2) = final_state(tmp_path / "full"), final_state(tmp_path / "resumed")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any("momentum_buffer" in k for k in o1) and all(torch.equal(o1[k], o2[k]) for k in o1)
