"""Tokenizer wrapper and BPE training: round trip, batch = single, special ids, determinism, size errors."""

from __future__ import annotations

import pickle

import pytest

from gpt.config import ConfigError, from_dict
from gpt.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, TokenizerConfig, TokenizerError, train_tokenizer

WORDS = "the function module returns value section class method string list parser object index buffer".split()
LINES = [
    f"Line {i}: the {WORDS[i % 14]} {WORDS[(i * 5) % 14]}s a {WORDS[(i * 3) % 14]}ing; see also {WORDS[i % 13]}ed {i}."
    for i in range(600)
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(LINES, TokenizerConfig(vocab_size=400), tmp_path_factory.mktemp("tok"))


def test_round_trip_and_byte_fallback(tokenizer):
    text = "the function returns Ünïcödé ✓ 数字 and\ttabs\n  indented"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_id not in ids  # unseen characters fall back to byte pieces
    assert any(tokenizer.is_byte(i) for i in ids)


def test_special_ids_and_batch_equals_single(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (BOS_ID, EOS_ID, PAD_ID)
    texts = ["see also", "", "module <|user|> x", "Line 3"]
    assert tokenizer.encode_batch(texts, num_threads=2) == [tokenizer.encode(t) for t in texts]
    assert [a.tolist() for a in tokenizer.encode_batch_numpy(texts, add_eos=True)] == [
        tokenizer.encode(t, add_eos=True) for t in texts
    ]
    assert tokenizer.encode("x", add_bos=True, add_eos=True)[::len(tokenizer.encode("x")) + 1] == [BOS_ID, EOS_ID]
    user = tokenizer.piece_to_id("<|user|>")
    # chat tokens are control symbols: inserted by id only, never matched in text (no forged turns)
    assert tokenizer.id_to_piece(user) == "<|user|>" and user not in tokenizer.encode("module <|user|> x")
    assert tokenizer.decode(tokenizer.encode("module <|user|> x")) == "module <|user|> x"


def test_load_file_or_dir_and_pickle(tokenizer):
    by_dir = Tokenizer.load(tokenizer.path.parent)
    assert by_dir.sha256 == tokenizer.sha256 == Tokenizer.load(tokenizer.path).sha256
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("the module") == tokenizer.encode("the module") and clone.sha256 == tokenizer.sha256


def test_training_is_deterministic(tmp_path, tokenizer):
    again = train_tokenizer(LINES, TokenizerConfig(vocab_size=400), tmp_path)
    assert again.sha256 == tokenizer.sha256
    assert (tmp_path / "tokenizer.vocab").read_bytes() == (tokenizer.path.parent / "tokenizer.vocab").read_bytes()


def test_vocab_too_large_names_largest_workable(tmp_path):
    with pytest.raises(TokenizerError, match=r"too large .* largest workable size is \d+") as err:
        train_tokenizer(LINES, TokenizerConfig(vocab_size=100_000), tmp_path)
    largest = int(str(err.value).split("largest workable size is ")[1].split()[0])
    assert train_tokenizer(LINES, TokenizerConfig(vocab_size=largest), tmp_path).vocab_size == largest
    with pytest.raises(TokenizerError, match="too small"):
        train_tokenizer(LINES, TokenizerConfig(vocab_size=100), tmp_path)


def test_bad_files_and_config(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer.load(tmp_path)
    with pytest.raises(ConfigError, match="tokenizer.vocab_size"):
        from_dict(TokenizerConfig, {"vocab_size": 8}, "tokenizer")
    with pytest.raises(ConfigError, match="tokenizer.special_tokens"):
        from_dict(TokenizerConfig, {"special_tokens": ["<a>", "<a>"]}, "tokenizer")
