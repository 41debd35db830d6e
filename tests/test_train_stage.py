"""The train and evaluate stages on a small real workspace (tokenizer + shards built in tmp_path by B's code):
outputs the contract promises, a model that beats the unigram baseline, resume through the stage, vocab errors,
and the bits-per-byte / unigram arithmetic checked by hand."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml

from gpt.config import ConfigError
from gpt.data.shards import ShardWriter, TokenShards
from gpt.eval import bits_per_byte, score_windows, unigram_log_probs, unigram_nats
from gpt.model import ModelConfig
from gpt.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from tests.project_params import write_params as write_project_params

PARAMS = {
    "model": {"preset": "tiny", "vocab_size": None, "d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
    "train": {"max_steps": 60, "batch_size": 8, "seq_len": 64, "lr": 1.0e-2, "warmup_steps": 5,
              "eval_every": 20, "eval_windows": 8, "checkpoint_every": 30, "precision": "fp32", "device": "cpu",
              "progress": False, "log_every": 5},
    "evaluate": {"max_windows": 40, "batch_size": 8, "prompts": ["The", "def"], "max_new_tokens": 16,
                 "device": "cpu"},
}


def topic_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)][:80]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws")
    texts = topic_texts()
    tok = train_tokenizer((line for t in texts for line in t.splitlines() if line.strip()),
                          TokenizerConfig(vocab_size=400, special_tokens=[]), root / "data/tokenizer")
    for split, docs in (("train", texts[:70]), ("val", texts[70:])):
        writer = ShardWriter(root / "data/shards" / split, split, tok.vocab_size, tok.sha256, shard_tokens=20000)
        for doc in docs:
            writer.add_document(tok.encode(doc, add_eos=True), len(doc.encode("utf-8")))
        writer.close()
    return root


def write_params(root, **sections):
    params = {"paths": {"tokenizer": "data/tokenizer", "shards": "data/shards", "checkpoints": "data/checkpoints",
                        "model": "data/model", "metrics": "metrics"}}
    for name, base in PARAMS.items():
        params[name] = {**base, **sections.get(name, {})}
    write_project_params(root, params)


def test_train_then_evaluate_writes_the_promised_outputs(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    write_params(workspace)
    from stages import evaluate, train

    train.main()
    model_dir = workspace / "data/model"
    assert {p.name for p in model_dir.iterdir()} == {"model.safetensors", "config.json", "tokenizer.model",
                                                     "lineage.json"}
    lineage = json.loads((model_dir / "lineage.json").read_text())
    assert lineage["step"] == 60 and lineage["tokenizer_sha256"] == Tokenizer.load(model_dir).sha256
    assert lineage["train_manifest_sha256"] == TokenShards(workspace / "data/shards/train").manifest_sha256
    assert sorted(p.name for p in (workspace / "data/checkpoints").iterdir()) == ["step-000030", "step-000060"]
    assert (workspace / "metrics/train/metrics.json").is_file()
    assert (workspace / "metrics/train/plots/metrics/train/loss.tsv").is_file()

    evaluate.main()
    metrics = json.loads((workspace / "metrics/eval.json").read_text())
    # 60 tiny steps get about to the unigram level (beating it is checked by the pipeline e2e test, `make repro`)
    assert metrics["val_loss"] < math.log(400) - 1.0 and metrics["bpb_vs_unigram"] < 1.1
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["tokens_scored"] == 40 * 64 or metrics["windows"] < 40
    samples = (workspace / "metrics/samples.md").read_text()
    assert "## 1. `The`" in samples and "## 2. `def`" in samples

    # re-running the finished stage resumes at the end: same model, no retraining
    before = safetensors.torch.load_file(model_dir / "model.safetensors")
    summary_before = json.loads((workspace / "metrics/train/metrics.json").read_text())
    train.main()
    after = safetensors.torch.load_file(model_dir / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # ... and keeps the metrics the real run measured (no "0 tokens/s" from the no-op re-export)
    assert json.loads((workspace / "metrics/train/metrics.json").read_text()) == summary_before
    # `dvc repro --force` deletes the metrics first: the no-op rerun reports the throughput recorded in the checkpoint
    shutil.rmtree(workspace / "metrics/train")
    train.main()
    redone = json.loads((workspace / "metrics/train/metrics.json").read_text())
    assert redone["final/tokens_per_s"] == pytest.approx(summary_before["final/tokens_per_s"], rel=0.5)


def test_vocab_smaller_than_tokenizer_is_a_clear_error(workspace, monkeypatch, tmp_path):
    monkeypatch.chdir(workspace)
    write_params(workspace, model={"vocab_size": 100})
    from stages import train

    with pytest.raises(ConfigError, match="model.vocab_size"):
        train.main()


def test_seq_len_longer_than_model_context_is_a_clear_error(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    write_params(workspace, train={"seq_len": 128})
    from stages import train

    with pytest.raises(ConfigError, match="train.seq_len"):
        train.main()


# ---- evaluation arithmetic on a hand-checkable fixture ----
class Uniform:
    """A 'model' predicting every token of a 4-token vocabulary with probability 1/4."""

    def eval(self):
        return self

    def __call__(self, inputs):
        import torch

        return torch.zeros(*inputs.shape, 4), None


def test_bits_per_byte_and_unigram_baseline_by_hand(tmp_path):
    import torch

    tokens = np.array([0, 1, 1, 2, 1, 3, 1, 1, 0], dtype=np.int64)  # 9 tokens, 18 bytes say
    writer = ShardWriter(tmp_path / "val", "val", 4, "x" * 64, shard_tokens=100)
    writer.add_document(tokens, num_bytes=18)
    writer.close()
    val = TokenShards(tmp_path / "val")
    stats = score_windows(Uniform(), val.iter_windows(4), 4, 2, torch.device("cpu"), progress=False)
    # windows start at 0 and 4: targets are tokens[1:9] — 8 targets, each ln 4 nats
    assert stats.tokens == 8 and stats.nats == pytest.approx(8 * math.log(4))
    # 8 of 9 tokens scored → 16 of 18 bytes; 8 * 2 bits / 16 bytes = 1 bit per byte
    assert bits_per_byte(stats.nats, stats.tokens, val.num_tokens, val.num_bytes) == pytest.approx(1.0)
    # unigram from the same split, add-one: counts 2,5,1,1 (+1) / 13
    log_p = unigram_log_probs(val, 4)
    assert np.exp(log_p) == pytest.approx(np.array([3, 6, 2, 2]) / 13)
    targets = tokens[1:]
    expected = -sum(math.log([3, 6, 2, 2][t] / 13) for t in targets)
    assert unigram_nats(log_p, stats.target_counts) == pytest.approx(expected)
    # argmax of uniform logits is token 0: correct exactly where the target is 0
    assert stats.correct == int((targets == 0).sum())


ROOT = Path(__file__).resolve().parents[1]
STAGE = [sys.executable, "-m", "stages.train"]
CURVE = "metrics/train/plots/metrics/train/loss.tsv"
RESUMABLE = {"max_steps": 40, "checkpoint_every": 10, "eval_every": 10}


def stage_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def stage_copy(workspace: Path, work: Path, **train) -> Path:
    shutil.copytree(workspace / "data/tokenizer", work / "data/tokenizer")
    shutil.copytree(workspace / "data/shards", work / "data/shards")
    write_params(work, train={**RESUMABLE, **train})
    return work


def assert_same_run(a: Path, b: Path) -> None:
    """Same final weights and the same loss curve, byte for byte (same rows, same line endings)."""
    wa = safetensors.torch.load_file(a / "data/model/model.safetensors")
    wb = safetensors.torch.load_file(b / "data/model/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / CURVE).read_bytes() == (b / CURVE).read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(workspace, tmp_path_factory) -> Path:
    """The reference: the train stage run once, start to end, in a subprocess."""
    work = stage_copy(workspace, tmp_path_factory.mktemp("plain") / "plain")
    subprocess.run(STAGE, cwd=work, env=stage_env(), check=True, capture_output=True, timeout=300)
    return work


def start_and_wait_for_first_checkpoint(work: Path) -> subprocess.Popen:
    proc = subprocess.Popen(STAGE, cwd=work, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    first = work / "data/checkpoints/step-000010/state.json"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_uninterrupted_model(workspace, uninterrupted, tmp_path):
    """A real SIGKILL at an arbitrary moment after the first checkpoint; re-running resumes and ends with the same
    weights (fp32, CPU) as a run that was never interrupted."""
    work = stage_copy(workspace, tmp_path / "killed")
    proc = start_and_wait_for_first_checkpoint(work)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (work / "data/model").exists(), "killed too late: the run had finished"
    rerun = subprocess.run(STAGE, cwd=work, env=stage_env(), check=True, capture_output=True, text=True,
                           timeout=300)
    assert "resuming from" in rerun.stderr and "(step 0)" not in rerun.stderr  # continued, not restarted
    state = json.loads((work / "data/checkpoints/step-000040/state.json").read_text())
    assert state["step"] == 40
    assert_same_run(work, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_the_current_step_and_exits_with_one_line(workspace, uninterrupted, tmp_path,
                                                                          signum):
    work = stage_copy(workspace, tmp_path / "stopped")
    proc = start_and_wait_for_first_checkpoint(work)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"train: interrupted by {name} at step "), stderr[-2000:]
    step = int(last.split(" at step ")[1].split(";")[0])
    assert 10 <= step < 40 and (work / f"data/checkpoints/step-{step:06d}/state.json").is_file()
    assert not (work / "data/model").exists()
    rerun = subprocess.run(STAGE, cwd=work, env=stage_env(), check=True, capture_output=True, text=True,
                           timeout=300)
    assert f"(step {step})" in rerun.stderr  # resumed from the step it stopped at
    assert_same_run(work, uninterrupted)


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_and_ends_identical(workspace, uninterrupted, tmp_path):
    """Flipped bytes in the finished run's last optimizer state: the rerun names the file, sets the checkpoint
    aside, continues from the one before and ends with the uninterrupted run's weights and curve."""
    work = stage_copy(workspace, tmp_path / "damaged")
    subprocess.run(STAGE, cwd=work, env=stage_env(), check=True, capture_output=True, timeout=300)
    optimizer = work / "data/checkpoints/step-000040/optimizer.safetensors"
    data = bytearray(optimizer.read_bytes())
    data[-5] ^= 0x10
    optimizer.write_bytes(bytes(data))
    rerun = subprocess.run(STAGE, cwd=work, env=stage_env(), check=True, capture_output=True, text=True,
                           timeout=300)
    assert "step-000040" in rerun.stderr and "optimizer.safetensors" in rerun.stderr
    assert "(step 30)" in rerun.stderr
    assert (work / "data/checkpoints/step-000040.damaged-1/optimizer.safetensors").read_bytes() == bytes(data)
    assert_same_run(work, uninterrupted)


def test_leftovers_of_a_killed_export_are_removed_at_start(workspace, monkeypatch, tmp_path):
    work = stage_copy(workspace, tmp_path / "ws", max_steps=2, warmup_steps=1, checkpoint_every=2, eval_every=2)
    for leftover in (".model.k3x9.tmp", ".tmp-model-abc", ".old-model-42"):  # gpt.atomic's and the older writer's
        (work / "data" / leftover).mkdir()
        (work / "data" / leftover / "model.safetensors").write_bytes(b"half")
    monkeypatch.chdir(work)
    from stages import train

    train.main()
    assert sorted(p.name for p in (work / "data").iterdir()) == ["checkpoints", "model", "shards", "tokenizer"]


@pytest.mark.parametrize("path", ["data/checkpoints/step-000010/state.json", "data/model-int8/config.json",
                                  "data/model-hf/model.safetensors"])
def test_resume_state_and_suggested_model_outputs_are_git_ignored(path):
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


def test_the_projects_params_yaml_sections_are_valid():
    from gpt.params import load_params
    from tests.project_params import PROJECT_PARAMS

    params = load_params(PROJECT_PARAMS)
    model_cfg = params.model.resolve(4096)
    assert params.train.seq_len <= model_cfg.max_seq_len
    params.train.grad_accum_steps(world_size=1)


@pytest.mark.parametrize("preset", ["qwen3-style", "moe", "hybrid"])
def test_every_architecture_preset_trains_and_generates_through_the_stages(workspace, monkeypatch, tmp_path,
                                                                           preset):
    """Issue 7: `dvc exp run -S model.preset=...` = the same train/evaluate stages with another block."""
    for sub in ("data/tokenizer", "data/shards"):
        shutil.copytree(workspace / sub, tmp_path / sub)
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, train={"max_steps": 30, "eval_every": 30, "checkpoint_every": 30})
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["model"] = {"preset": preset, "vocab_size": None, "max_seq_len": 64}  # the preset's own sizes
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    from stages import evaluate, train

    train.main()
    losses = [float(line.split("\t")[1]) for line in
              (tmp_path / "metrics/train/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert losses[-1] < losses[0] - 0.5, losses
    config = json.loads((tmp_path / "data/model/config.json").read_text())["config"]
    reference = ModelConfig.from_preset(preset)
    assert (config["position"], config["mlp"], config["n_kv_heads"]) == (
        reference.position, reference.mlp, reference.n_kv_heads)
    evaluate.main()
    samples = (tmp_path / "metrics/samples.md").read_text()
    assert "The" in samples and json.loads((tmp_path / "metrics/eval.json").read_text())["val_loss"] < math.log(400)
