"""Hugging Face export/import: transformers loads the export offline; logits, greedy generation and tokenizer
ids equal ours; a GPT-2-format directory imports back to the same model."""

from __future__ import annotations

import json

import pytest
import torch

from gpt.checkpoint import load_model
from gpt.export import ExportError, build_hf_tokenizer, export_hf, import_hf, read_spm_model
from gpt.serve.loading import load_tokenizer
from gpt.tokenizer import Tokenizer

STRINGS = [
    "the cat saw the dog",
    "Day 3: the birds saw rivers by the trees.",
    "Ünïcödé naïve café ✓ 数字 😀 ñ",  # non-ASCII: mostly byte fallback in this tiny vocabulary
    "\x00\x7f control bytes and \u200b zero width",
    " leading space",
    "two  spaces\tand\ttabs\n\nnewlines  ",
    "digits 12345 and 3.14",
    "<|user|>hi<|end|> x<|assistant|> y",  # user-defined pieces: whole, never merged
    "<s>the</s> <pad>",  # control pieces typed as text stay text, as in sentencepiece
    "",
    " ",
    "▁raw▁marks▁",
]


@pytest.fixture(scope="module")
def hf_dir(tiny_model_dir, tmp_path_factory):
    return export_hf(tiny_model_dir, tmp_path_factory.mktemp("export") / "hf")


def test_tokenizer_json_matches_sentencepiece(tiny_model_dir):
    ours = Tokenizer.load(tiny_model_dir)
    converted = build_hf_tokenizer(ours.model_bytes)
    converted.encode_special_tokens = True
    for text in STRINGS:
        ids = ours.encode(text)
        assert converted.encode(text, add_special_tokens=False).ids == ids, text
        assert converted.decode(ids, skip_special_tokens=False) == ours.decode(ids), text


def test_reads_the_sentencepiece_model_file(tiny_model_dir):
    ours = Tokenizer.load(tiny_model_dir)
    spm = read_spm_model(ours.model_bytes)
    assert [p for p, _, _ in spm.pieces] == [ours.id_to_piece(i) for i in range(ours.vocab_size)]
    assert spm.model_type == 2 and spm.byte_fallback and spm.add_dummy_prefix


def test_transformers_loads_the_export_and_agrees(hf_dir, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    ours, tok = load_model(tiny_model_dir), Tokenizer.load(tiny_model_dir)
    for text in STRINGS:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text), text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id)
    ids = torch.tensor([tok.encode("the cat saw the dog by the river")])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours(ids)[0], atol=1e-4, rtol=0)
    greedy = ours.generate(ids, 12, temperature=0.0)
    hf_greedy = hf_model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert hf_greedy.tolist() == greedy.tolist()


def test_import_round_trip(hf_dir, tiny_model_dir, tmp_path):
    out = import_hf(hf_dir, tmp_path / "imported")
    a, b = load_model(tiny_model_dir), load_model(out)
    ids = torch.tensor([[5, 99, 200, 17, 300]])
    with torch.no_grad():
        torch.testing.assert_close(b(ids)[0], a(ids)[0], atol=1e-5, rtol=0)
    tok, back = Tokenizer.load(tiny_model_dir), load_tokenizer(out)
    for text in STRINGS:
        assert back.encode(text) == tok.encode(text), text
        assert back.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert json.loads((out / "lineage.json").read_text())["format"] == "hf-gpt2"


def test_import_errors_name_the_problem(hf_dir, tmp_path):
    with pytest.raises(ExportError, match="config.json"):
        import_hf(tmp_path / "nowhere", tmp_path / "out")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((hf_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ExportError, match="pickled"):
        import_hf(pickled, tmp_path / "out")
    with pytest.raises(ExportError, match="already exists"):
        import_hf(hf_dir, hf_dir)
