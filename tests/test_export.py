"""Hugging Face export/import: transformers loads the export offline; logits, greedy generation and tokenizer
ids equal ours; a GPT-2-format directory imports back to the same model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from gpt.hf import to_hf_config
from gpt.hf_dir import ExportError, build_hf_tokenizer, export_hf, import_hf, read_spm_model
from gpt.model_dir import load_model
from gpt.tokenizer import Tokenizer, load_tokenizer

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


def assert_same_model(hf_model, ours, tok) -> torch.Tensor:
    """The transformers model computes our function: logits within 1e-4 and identical greedy continuations.
    Returns the input ids it checked."""
    ids = torch.tensor([tok.encode("the cat saw the dog by the river")])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours(ids)[0], atol=1e-4, rtol=0)
    greedy = ours.generate(ids, 12, temperature=0.0)
    hf_greedy = hf_model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert hf_greedy.tolist() == greedy.tolist()
    return ids


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
        # split_special_tokens: special strings stay text, as in sentencepiece (the export's default matches them,
        # which its chat template needs: tests/test_chat_export.py)
        assert hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tok.encode(text), text
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id)
    assert_same_model(hf_model, ours, tok)


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


# ---------------------------------------------------------------- the other architectures (gpt.hf.hf_architecture)
SMALL = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=64, d_ff=48)  # hybrid: layer 0 dense, layer 1 MoE


def preset_model_dir(tiny_model_dir, root, preset: str, **overrides):
    """`tiny_model_dir`'s tokenizer with a small random `preset` model; norms and routers perturbed so that a
    swapped q/k norm or a wrong expert layout would change the logits."""
    from gpt.model import DecoderOnlyTransformer, ModelConfig
    from gpt.model_dir import save_model

    torch.manual_seed(0)
    vocab_size = Tokenizer.load(tiny_model_dir).vocab_size
    config = ModelConfig.from_preset(preset, vocab_size=vocab_size, **{**SMALL, **overrides})
    if config.moe_n_experts:
        config = config.replace(moe_d_ff=24)
    model = DecoderOnlyTransformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            if "router" in name:
                p.mul_(20)
    save_model(model, root / preset)
    shutil.copy(tiny_model_dir / "tokenizer.model", root / preset / "tokenizer.model")
    return root / preset


ARCHITECTURES = {  # HF class: (preset, overrides)
    "Qwen3ForCausalLM": ("qwen3-style", {}),
    "Qwen3MoeForCausalLM": ("hybrid", {}),
    "LlamaForCausalLM": ("qwen3-style", dict(qk_norm=False)),
    # transformers saves Mixtral experts one by one (block_sparse_moe.experts.N.w1), so import must convert
    "MixtralForCausalLM": ("moe", dict(moe_shared_expert=False, moe_norm_topk=True, moe_top_k=2)),
}


@pytest.mark.parametrize("hf_class", ARCHITECTURES)
def test_rope_and_moe_presets_export_and_import_with_equal_logits(hf_class, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    preset, overrides = ARCHITECTURES[hf_class]
    src = preset_model_dir(tiny_model_dir, tmp_path, preset, **overrides)
    hf_dir = export_hf(src, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    assert type(hf_model).__name__ == hf_class
    ours, tok = load_model(src), Tokenizer.load(src)
    hf_tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
    assert hf_tok(STRINGS[2], add_special_tokens=False)["input_ids"] == tok.encode(STRINGS[2])
    ids = assert_same_model(hf_model, ours, tok)

    back = load_model(import_hf(hf_dir, tmp_path / "imported"))
    # same function; Mixtral has no dense d_ff to round-trip, so configs are compared as transformers sees them
    assert to_hf_config(back.config).to_dict() == to_hf_config(ours.config).to_dict()
    with torch.no_grad():
        assert torch.equal(back(ids)[0], ours(ids)[0])
    assert json.loads((tmp_path / "imported" / "lineage.json").read_text())["format"] == f"hf-{hf_model.config.model_type}"


def test_moe_preset_export_fails_with_a_one_line_reason(tiny_model_dir, tmp_path, capsys):
    from gpt.cli import main

    src = preset_model_dir(tiny_model_dir, tmp_path, "moe")
    assert main(["export", "--format", "hf", "-c", str(src), "-o", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("gpt export: error:")
    assert "shared expert" in err and "Mixtral" in err and "qwen3-style" in err
    assert not (tmp_path / "hf").exists()


# ---------------------------------------------------------------- every supported transformers loads the export
PARITY_PROMPTS = ["the cat saw the dog by the river", "Day 3: the birds", "Ünïcödé ✓"]
PARITY_SCRIPT = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True).eval()
out = []
for text in json.loads(sys.argv[2]):
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    out.append({"keys": sorted(enc), "ids": ids[0].tolist(), "class": type(tok).__name__})
print(json.dumps(out))
"""


def our_greedy(model_dir, prompts: list[str]) -> list[list[int]]:
    ours, tok = load_model(model_dir), Tokenizer.load(model_dir)
    return [ours.generate(torch.tensor([tok.encode(p)]), 12, temperature=0.0)[0].tolist() for p in prompts]


def check_parity(report: list[dict], model_dir) -> None:
    for item, expected in zip(report, our_greedy(model_dir, PARITY_PROMPTS), strict=True):
        assert item["keys"] == ["attention_mask", "input_ids"]  # no token_type_ids for GPT-2 to add
        assert item["class"] in ("PreTrainedTokenizerFast", "TokenizersBackend")  # 5.x: the same class, renamed
        assert item["ids"] == expected


def test_export_tokenizer_config_is_portable_and_generates_like_ours(hf_dir, tiny_model_dir):
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.x knows no TokenizersBackend
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", PARITY_SCRIPT, str(hf_dir), json.dumps(PARITY_PROMPTS)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    check_parity(json.loads(run.stdout.splitlines()[-1]), tiny_model_dir)


OLDEST_TRANSFORMERS = "4.45.*"  # pyproject: transformers>=4.45


@pytest.mark.slow
def test_export_generates_like_ours_in_the_oldest_supported_transformers(hf_dir, tiny_model_dir, tmp_path):
    """A throwaway virtualenv with transformers 4.45 (and the CPU torch this project pins) loads the export with
    AutoTokenizer / AutoModelForCausalLM and generates greedily what our model generates."""
    import subprocess
    import sys

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              f"transformers=={OLDEST_TRANSFORMERS}", f"torch=={torch.__version__.split('+')[0]}",
                              "safetensors"], capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        pytest.skip(f"pip could not install transformers=={OLDEST_TRANSFORMERS}: {install.stderr.strip()[-300:]}")
    run = subprocess.run([str(python), "-c", PARITY_SCRIPT, str(hf_dir), json.dumps(PARITY_PROMPTS)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    version = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    assert version.startswith("4.45.")
    check_parity(json.loads(run.stdout.splitlines()[-1]), tiny_model_dir)


# ---------------------------------------------------------------- directories `gpt generate` is pointed at
def test_generate_on_a_hugging_face_directory_suggests_import(hf_dir, capsys):
    from gpt.cli import main

    assert main(["generate", "x", "-c", str(hf_dir), "-m", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Hugging Face" in err and f"gpt import --from hf {hf_dir}" in err


def test_training_checkpoints_carry_their_tokenizer(tiny_model_dir, tmp_path, capsys):
    from gpt.cli import main
    from gpt.train.checkpoints import CheckpointManager

    model = load_model(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    path = CheckpointManager(tmp_path / "ckpt", tokenizer_dir=tiny_model_dir).save(model, optimizer, {"step": 3})
    assert CheckpointManager(tmp_path / "ckpt").verify(path)  # the copy is one of the verified files
    assert main(["generate", "the cat", "-c", str(path), "-m", "4", "-t", "0", "--no-prompt"]) == 0
    assert main(["info", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tokenizer    tokenizer.model" in out
