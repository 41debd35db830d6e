"""The marian (seq2seq) backend with a tiny random-weight MarianMT model and tokenizer built in the test
(save_pretrained → loaded by path, as a user would load a downloaded Opus-MT model). The output is gibberish;
the tests check batching, splitting to the model's length limit, the paragraph layout and the pipeline wiring.
"""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pytest

from gpt.augment import AugmentConfig, BackendUnavailable, augment_corpus
from gpt.augment.marian import MarianConfig
from gpt.data.corpus import CorpusWriter, read_corpus

pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

SENTENCES = [
    "The house is big.", "My brother reads a book in the garden.", "Where is the train station?",
    "The weather is nice today.", "We translate documents offline.", "A small model is enough for a test.",
] * 20


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import MarianConfig as HFMarianConfig
    from transformers import MarianMTModel, MarianTokenizer

    root = tmp_path_factory.mktemp("marian")
    (root / "corpus.txt").write_text("\n".join(SENTENCES) + "\n")
    for side in ("source", "target"):
        spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"), model_prefix=str(root / side), vocab_size=40,
                                       model_type="unigram", character_coverage=1.0, minloglevel=2)
    pieces = ["</s>", "<unk>", "<pad>"]
    for side in ("source", "target"):
        proc = spm.SentencePieceProcessor(model_file=str(root / f"{side}.model"))
        pieces += [proc.id_to_piece(i) for i in range(proc.get_piece_size())]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    (root / "vocab.json").write_text(json.dumps(vocab))
    tok = MarianTokenizer(str(root / "source.model"), str(root / "target.model"), str(root / "vocab.json"),
                          model_max_length=24)
    cfg = HFMarianConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                         decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=vocab["<pad>"],
                         eos_token_id=vocab["</s>"], decoder_start_token_id=vocab["<pad>"])
    out = root / "model"
    tok.save_pretrained(out)
    MarianMTModel(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 16-wide model gains nothing from threads; on a shared 2-core machine they only contend (20x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def translator(model_dir):
    from gpt.augment.marian import MarianTranslator

    return MarianTranslator(MarianConfig(model=str(model_dir), segments_per_batch=4))


def test_split_respects_the_model_limit(translator):
    long_par = " ".join(SENTENCES[:12])
    assert translator.max_tokens == 24
    segments = translator.split(long_par)
    assert len(segments) > 1
    assert all(translator._length(s) <= translator.max_tokens for s in segments)
    assert " ".join(segments) == long_par  # cut only at sentence boundaries, nothing lost
    words = translator.split(" ".join(["word"] * 60))  # no sentence end: cut between words
    assert all(translator._length(s) <= translator.max_tokens for s in words) and len(words) > 1


def test_batch_translation_keeps_documents_and_paragraphs(translator):
    docs = ["The house is big.", " ".join(SENTENCES[:10]) + "\n\nThe weather is nice today.\n\n\nWe translate.", ""]
    out = translator.translate(docs)
    assert len(out) == 3 and out[2] == ""
    assert [len(re.findall(r"\n\s*\n", o)) for o in out] == [0, 2, 0]
    assert out[1].split("\n\n")[1] == translator.translate(["The weather is nice today."])[0]
    assert out == translator.translate(docs)  # greedy decoding is deterministic


def test_marian_backend_in_the_pipeline(tmp_path, model_dir):
    rows = [{"id": f"d{i}", "text": SENTENCES[i], "source": "t", "lang": "en", "split": "train"} for i in range(5)]
    with CorpusWriter(tmp_path / "cleaned") as writer:
        writer.write(rows)
    cfg = AugmentConfig(backend="marian", tgt_lang="id", fraction=1.0, marian=MarianConfig(model=str(model_dir)),
                        detect_lang=False)
    metrics = augment_corpus(cfg, tmp_path / "cleaned", tmp_path / "aug", tmp_path / "cache", progress=False)
    out = pa.Table.from_batches(list(read_corpus(tmp_path / "aug"))).to_pylist()
    assert metrics["documents_translated"] == 5 and metrics["config"]["workers"] == 1
    assert {(r["mt_backend"], r["mt_model"], r["lang"]) for r in out if r["origin_id"]} == {
        ("marian", str(model_dir), "id")}
    again = augment_corpus(cfg, tmp_path / "cleaned", tmp_path / "aug", tmp_path / "cache", progress=False)
    assert again["cache_hits"] == 5 and again["documents_sent"] == 0


def test_missing_model_is_a_clear_error(tmp_path):
    from gpt.augment.marian import MarianTranslator

    with pytest.raises(BackendUnavailable, match="(?s)augment.marian.model.*allow_download"):
        MarianTranslator(MarianConfig(model="no-such-org/no-such-model"))


def test_code_is_copied_and_only_prose_is_translated(translator):
    text = "The house is big.\n\n>>> print('The house is big.')\nThe house is big.\n\nWe translate `x = 1` offline."
    out = translator.translate([text])[0]
    assert "\n\n>>> print('The house is big.')\nThe house is big.\n\n" in out and "`x = 1`" in out
    assert out.startswith(translator.translate(["The house is big."])[0] + "\n\n")


def test_cache_key_follows_the_weights_not_their_names(tmp_path, model_dir):
    """Retraining keeps file names and sizes: the translations of the old weights must not be served."""
    import shutil

    from safetensors.torch import load_file, save_file

    from gpt.augment.marian import MarianTranslator

    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    before = MarianTranslator(MarianConfig(model=str(copy))).version
    weights = next(copy.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1.0
    size = weights.stat().st_size
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert weights.stat().st_size == size
    after = MarianTranslator(MarianConfig(model=str(copy))).version
    assert after != before
    assert MarianTranslator(MarianConfig(model=str(model_dir))).version == before  # same files, same key


def test_model_dir_is_a_dvc_dependency_that_always_exists():
    """dvc.yaml cannot add a dependency only when a param is set, so the model path is always one; its default
    is a directory in the repository (models/translation), so `dvc repro` never misses it."""
    from pathlib import Path

    import yaml

    from gpt.augment import AugmentConfig

    root = Path(__file__).resolve().parents[1]
    deps = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]["augment"]["deps"]
    assert "${augment.marian.model}" in deps
    params = yaml.safe_load((root / "params.yaml").read_text())["augment"]["marian"]
    assert params["model"] == AugmentConfig().marian.model and (root / params["model"]).is_dir()
    assert (root / params["model"] / "README.md").is_file()
