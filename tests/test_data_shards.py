"""Token shards: writer/reader round trip, deterministic batches, rank disjointness, eval windows, mismatch errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gpt.data.shards import ShardError, ShardWriter, TokenShards, token_dtype


def _write(tmp_path, docs, shard_tokens=7, vocab_size=1000, sha="abc"):
    w = ShardWriter(tmp_path / "train", "train", vocab_size, sha, shard_tokens=shard_tokens)
    for d in docs:
        w.add_document(np.asarray(d), num_bytes=len(d) * 2)
    return w.close()


def test_round_trip_stream_equals_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=rng.integers(1, 20)) for _ in range(30)]
    manifest = _write(tmp_path, docs)
    stream = np.concatenate(docs)
    s = TokenShards(tmp_path / "train", tokenizer_sha256="abc", vocab_size=1000)
    assert s.num_tokens == manifest["num_tokens"] == stream.size
    assert s.num_documents == 30 and s.num_bytes == 2 * stream.size
    assert all(e["num_tokens"] == 7 for e in manifest["shards"][:-1])
    np.testing.assert_array_equal(s.read(0, s.num_tokens), stream)
    np.testing.assert_array_equal(s.read(5, 17), stream[5:22])  # spans shards


def test_dtype_by_vocab_size(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    _write(tmp_path, [[70000, 1, 2]], vocab_size=70001)
    assert json.loads((tmp_path / "train/manifest.json").read_text())["dtype"] == "uint32"
    assert TokenShards(tmp_path / "train").read(0, 3).tolist() == [70000, 1, 2]


def test_get_batch_deterministic_and_windows_are_stream_slices(tmp_path):
    docs = [np.arange(i * 10, i * 10 + 10) % 1000 for i in range(50)]
    _write(tmp_path, docs, shard_tokens=64)
    s = TokenShards(tmp_path / "train")
    b1 = s.get_batch(step=3, batch_size=4, seq_len=16, seed=7)
    assert b1.dtype == torch.long and b1.shape == (4, 17)
    assert torch.equal(b1, TokenShards(tmp_path / "train").get_batch(3, 4, 16, 7))  # fresh reader, same batch
    assert not torch.equal(b1, s.get_batch(4, 4, 16, 7))
    assert not torch.equal(b1, s.get_batch(3, 4, 16, 8))
    stream = s.read(0, s.num_tokens)
    for start, row in zip(s.window_starts(3, 4, 16, 7, 0, 1), b1):
        assert row.tolist() == stream[start : start + 17].tolist()


def test_ranks_partition_the_global_batch(tmp_path):
    _write(tmp_path, [np.arange(5000) % 1000], shard_tokens=512)
    s = TokenShards(tmp_path / "train")
    whole = s.get_batch(5, batch_size=8, seq_len=32, seed=1)
    parts = [s.get_batch(5, batch_size=4, seq_len=32, seed=1, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(parts[0], parts[1])


def test_iter_windows_predicts_every_token_once(tmp_path):
    _write(tmp_path, [np.arange(103)], shard_tokens=10)
    s = TokenShards(tmp_path / "train")
    windows = list(s.iter_windows(seq_len=10))
    assert len(windows) == 10 and all(w.shape == (11,) for w in windows)
    targets = torch.cat([w[1:] for w in windows])
    assert targets.tolist() == list(range(1, 101))
    assert len(list(s.iter_windows(10, max_windows=3))) == 3


def test_mismatch_and_corruption_errors(tmp_path):
    _write(tmp_path, [np.arange(20)])
    with pytest.raises(ShardError, match="tokenizer sha256"):
        TokenShards(tmp_path / "train", tokenizer_sha256="other")
    with pytest.raises(ShardError, match="vocab_size 1000"):
        TokenShards(tmp_path / "train", vocab_size=512)
    with pytest.raises(ShardError, match="no manifest"):
        TokenShards(tmp_path / "missing")
    (tmp_path / "train/shard-00001.arrow").write_bytes(b"garbage")
    with pytest.raises(ShardError, match="unreadable shard"):
        TokenShards(tmp_path / "train")
    with pytest.raises(ShardError, match="cannot fill"):
        _write(tmp_path / "small", [[1, 2]])
        TokenShards(tmp_path / "small/train").get_batch(0, 1, 8, 0)


def test_out_of_range_ids_rejected(tmp_path):
    with pytest.raises(ShardError, match="out of range"):
        _write(tmp_path, [[5, 1000]])
