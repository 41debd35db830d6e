"""train.init_from: continuing from a model directory (ours after N steps; an imported Hugging Face GPT-2)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt.config import ConfigError
from gpt.data.shards import TokenShards
from gpt.model_dir import read_lineage
from gpt.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from gpt.train.config import TrainConfig
from gpt.train.init import check_parent_tokenizer, copy_parent_tokenizer, parent_model, parent_model_config
from gpt.train.loop import train
from tests.sft_workspace import build_workspace, topic_texts, write_params

ROOT = Path(__file__).resolve().parents[1]
N, K = 20, 10  # the parent's steps, then k more
CONSTANT = {"schedule": "constant", "warmup_steps": 0, "lr": 3.0e-3}  # max_steps does not change the lr
CURVE = "metrics/train/plots/metrics/train/loss.tsv"


def curve(root: Path) -> dict[int, float]:
    rows = (root / CURVE).read_text().splitlines()[1:]
    return {int(step): float(loss) for step, loss in (row.split("\t") for row in rows)}


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory):
    """A run of N steps (its model directory is the parent), then the same run resumed for K more steps."""
    root = build_workspace(tmp_path_factory.mktemp("parent"))
    from stages import train as train_stage

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        write_params(root, {"train": {**CONSTANT, "max_steps": N}})
        train_stage.main()
        shutil.copytree(root / "data/model", root / "parent-model")
        write_params(root, {"train": {**CONSTANT, "max_steps": N + K}})
        train_stage.main()  # constant lr: resumes from the checkpoint at step N
    return root


class Shifted:
    """A batch source whose step s is the original's step s + offset (the resumed run's data order)."""

    def __init__(self, data, offset: int):
        self.data, self.offset = data, offset

    def get_batch(self, step, *args, **kwargs):
        return self.data.get_batch(step + self.offset, *args, **kwargs)

    def iter_windows(self, *args, **kwargs):
        return self.data.iter_windows(*args, **kwargs)


def test_init_from_step_n_then_k_steps_matches_the_run_resumed_for_k_steps(parent_run, tmp_path):
    resumed = curve(parent_run)
    assert min(resumed) == 1 and max(resumed) == N + K
    parent = parent_model(parent_run / "parent-model")
    tok = Tokenizer.load(parent_run / "data/tokenizer")
    shards = [TokenShards(parent_run / "data/shards" / split) for split in ("train", "val")]
    cfg = TrainConfig(**CONSTANT, max_steps=K, batch_size=8, seq_len=64, eval_every=K, eval_windows=8, checkpoint_every=K, precision="fp32",
                      device="cpu", progress=False, log_every=1)
    live = tmp_path / "live"
    parent_config = parent_model_config(parent, {}, tok.vocab_size, 64)
    train(parent.load(), cfg, Shifted(shards[0], N), shards[1], tmp_path / "ckpt", parent_config.to_dict(),
          {"init_from": parent.record()}, live_dir=live)
    rows = (live / "plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    continued = {int(s) + N: float(v) for s, v in (r.split("\t") for r in rows)}
    # step N+1: the same weights on the same batch → the same loss, exactly
    assert continued[N + 1] == resumed[N + 1]
    # then only AdamW's state differs (fresh vs the parent's moments; the fresh one's first update is the
    # largest): the losses stay close step by step and on average
    for step in range(N + 2, N + K + 1):
        assert abs(continued[step] - resumed[step]) < 0.1 * resumed[step], step
    mean = [sum(c[s] for s in range(N + 1, N + K + 1)) / K for c in (continued, resumed)]
    assert abs(mean[0] - mean[1]) < 0.05 * mean[1]


def test_the_train_stage_starts_from_the_parent_and_records_its_hash(parent_run, tmp_path, monkeypatch):
    root = tmp_path / "child"
    shutil.copytree(parent_run / "data/tokenizer", root / "data/tokenizer")
    shutil.copytree(parent_run / "data/shards", root / "data/shards")
    monkeypatch.chdir(root)
    parent_dir = parent_run / "parent-model"
    write_params(root, {"train": {**CONSTANT, "max_steps": 3, "init_from": str(parent_dir)},
                        "model": {"n_layers": 2}})  # repeating the parent's value is allowed
    from stages import train as train_stage

    train_stage.main()
    lineage = read_lineage(root / "data/model")
    weights = hashlib.sha256((parent_dir / "model.safetensors").read_bytes()).hexdigest()
    assert lineage.extra["init_from"] == {"path": str(parent_dir), "weights_sha256": weights}
    # its first step's loss is the parent's loss on batch 0 (a fresh model would be near log(vocab))
    first = curve(root)[1]
    parent = parent_model(parent_dir).load()
    batch = TokenShards(root / "data/shards/train").get_batch(0, 8, 64, TrainConfig().seed)
    with torch.no_grad():
        _, loss = parent(batch[:, :-1], labels=batch)
    assert first == pytest.approx(loss.item(), rel=1e-5)


def test_model_overrides_that_contradict_the_parent_name_the_key(parent_run, tmp_path):
    parent = parent_model(parent_run / "parent-model")
    with pytest.raises(ConfigError, match=r"model\.d_model: 96 contradicts .* d_model = 64"):
        parent_model_config(parent, {"preset": "tiny", "d_model": 96}, 400, 64)
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        parent_model_config(parent, {"vocab_size": 512}, 400, 64)
    with pytest.raises(ConfigError, match="train.seq_len"):
        parent_model_config(parent, {}, 400, 128)


def test_vocabulary_mismatch_names_both_sizes(parent_run, tmp_path):
    parent = parent_model(parent_run / "parent-model")
    vocab = parent.config.vocab_size
    with pytest.raises(ConfigError, match=rf"tokenizer has {vocab + 100} tokens.*vocab_size {vocab}"):
        parent_model_config(parent, {}, vocab + 100, 64)
    other = train_tokenizer((line for t in topic_texts() for line in t.splitlines() if line.strip()),
                            TokenizerConfig(vocab_size=380), tmp_path / "other")
    with pytest.raises(ConfigError, match=rf"380 tokens.*{vocab} tokens"):
        check_parent_tokenizer(parent, other)
    out = tmp_path / "copied"
    out.mkdir()
    assert copy_parent_tokenizer(parent, out) == ["tokenizer.model"]
    assert Tokenizer.load(out).sha256 == Tokenizer.load(parent_run / "parent-model").sha256


def test_a_missing_init_from_directory_is_one_error_line_naming_the_key(parent_run, tmp_path):
    root = tmp_path / "missing"
    shutil.copytree(parent_run / "data/tokenizer", root / "data/tokenizer")
    shutil.copytree(parent_run / "data/shards", root / "data/shards")
    write_params(root, {"train": {"init_from": "models/nowhere"}})
    result = subprocess.run([sys.executable, "-m", "stages.train"], cwd=root, capture_output=True, text=True,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.init_from:") and "models/nowhere" in lines[0]


def test_init_from_an_imported_hf_gpt2_gives_the_hf_logits_at_step_0(parent_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt.hf_dir import import_hf

    tok = Tokenizer.load(parent_run / "data/tokenizer")
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    shutil.copyfile(parent_run / "data/tokenizer/tokenizer.model", hf_dir / "tokenizer.model")
    parent = parent_model(import_hf(hf_dir, tmp_path / "imported"))
    assert parent_model_config(parent, {"preset": "tiny"}, tok.vocab_size, 64) == parent.config
    check_parent_tokenizer(parent, tok)  # import kept the sentencepiece model: the pipeline can tokenize with it
    model = parent.load()
    ids = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max() <= 1e-4
