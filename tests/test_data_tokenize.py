"""`tokenize`: shards hold exactly encode(doc) + EOS per document, in corpus order, whatever the threads/batches."""

from __future__ import annotations

import numpy as np
import pytest

from gpt.config import ConfigError, from_dict
from gpt.data.corpus import CorpusWriter, read_corpus
from gpt.data.shards import TokenShards
from gpt.data.tokenize import TokenizeConfig, tokenize_split
from gpt.tokenizer import EOS_ID, TokenizerConfig, train_tokenizer

WORDS = "alpha beta gamma delta module parser token stream window shard manifest ünïcode ✓".split()


def _text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + i % 40)) + f" #{i}"


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    with CorpusWriter(root / "corpus", rows_per_file=25) as w:
        w.write(
            [
                {"id": str(i), "text": _text(i), "source": "t", "lang": "en", "split": "val" if i % 5 == 0 else "train"}
                for i in range(120)
            ]
        )
    texts = [t for b in read_corpus(root / "corpus", split="train") for t in b.column("text").to_pylist()]
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=320), root / "tokenizer")
    return root / "corpus", tokenizer


@pytest.mark.parametrize(("threads", "batch"), [(1, 1), (2, 7), (-1, 256)])
def test_shards_equal_per_document_encoding(tmp_path, corpus_and_tokenizer, threads, batch):
    corpus, tok = corpus_and_tokenizer
    cfg = TokenizeConfig(shard_tokens=1024, batch_documents=batch, num_threads=threads)
    for split in ("train", "val"):
        manifest = tokenize_split(tok, corpus, split, tmp_path / split, cfg)
        texts = [t for b in read_corpus(corpus, split=split) for t in b.column("text").to_pylist()]
        expected = [i for t in texts for i in tok.encode(t) + [EOS_ID]]
        shards = TokenShards(tmp_path / split, tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size)
        assert shards.read(0, shards.num_tokens).tolist() == expected
        assert manifest["num_documents"] == len(texts) and manifest["num_bytes"] == sum(len(t.encode()) for t in texts)
        assert manifest["dtype"] == "uint16" and all(s["num_tokens"] == 1024 for s in manifest["shards"][:-1])


def test_output_bytes_do_not_depend_on_threads_or_batches(tmp_path, corpus_and_tokenizer):
    corpus, tok = corpus_and_tokenizer
    configs = {
        "a": TokenizeConfig(shard_tokens=1024, batch_documents=1, num_threads=1),
        "b": TokenizeConfig(shard_tokens=1024, batch_documents=50, num_threads=2),
        "c": TokenizeConfig(shard_tokens=1024, batch_bytes=300, num_threads=2),
    }
    for name, cfg in configs.items():
        tokenize_split(tok, corpus, "train", tmp_path / name, cfg)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    for other in ("b", "c"):
        assert files == sorted(p.name for p in (tmp_path / other).iterdir()) and len(files) > 2
        assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / other / f).read_bytes() for f in files)


def test_empty_split_gives_empty_manifest(tmp_path, corpus_and_tokenizer):
    _, tok = corpus_and_tokenizer
    with CorpusWriter(tmp_path / "c") as w:
        w.write([{"id": "1", "text": "alpha", "source": "t", "lang": "en", "split": "train"}])
    manifest = tokenize_split(tok, tmp_path / "c", "val", tmp_path / "val", TokenizeConfig())
    assert manifest["num_tokens"] == 0 and manifest["shards"] == []
    assert TokenShards(tmp_path / "val").num_windows(8) == 0
    assert np.array_equal(TokenShards(tmp_path / "val").read(0, 0), np.empty(0))


def test_config_errors():
    with pytest.raises(ConfigError, match="tokenize.shard_tokens"):
        from_dict(TokenizeConfig, {"shard_tokens": 10}, "tokenize")
    with pytest.raises(ConfigError, match="tokenize.num_threads"):
        from_dict(TokenizeConfig, {"num_threads": 0}, "tokenize")


def test_tokenize_does_not_import_pandas(tmp_path, corpus_and_tokenizer):
    """pyarrow imports pandas the first time Python/NumPy objects are converted to Arrow (~0.15 s, the tokenize
    stage's whole start-up gap to plain sentencepiece); the stage's code path must not trigger it."""
    import subprocess
    import sys

    corpus, tok = corpus_and_tokenizer
    code = (
        "import sys\n"
        "from gpt.data.tokenize import TokenizeConfig, tokenize_split\n"
        "from gpt.tokenizer import Tokenizer\n"
        f"tok = Tokenizer.load({str(tok.path)!r})\n"
        "for split in ('train', 'val'):\n"
        f"    tokenize_split(tok, {str(corpus)!r}, split, {str(tmp_path)!r} + '/' + split, TokenizeConfig())\n"
        "print('pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
