"""GGUF export (gpt/gguf.py): the file reads back with the expected metadata, tensors and vocabulary (fast), and
real llama.cpp (llama-cpp-python, `slow`) tokenizes and decodes greedily exactly like us."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'gpt-pipeline[gguf]')")

from gpt.chat import CHAT_TOKENS, ChatTemplate  # noqa: E402
from gpt.gguf import (  # noqa: E402
    CHAT_TEMPLATE,
    GgufExportError,
    _interleave_rope_rows,
    export_gguf,
    gguf_architecture,
)
from gpt.model import DecoderOnlyTransformer, ModelConfig  # noqa: E402
from gpt.model_dir import Lineage, load_model, save_quantized, write_model_dir  # noqa: E402
from gpt.params import load_params  # noqa: E402
from gpt.tokenizer import Tokenizer  # noqa: E402


def _field(reader, key):
    field = reader.fields[key]
    if len(field.types) > 1:  # an array
        return [field.contents(i) for i in range(len(field.data))]
    return field.contents()


def preset_dir(tokenizer_file, root, preset: str, seed: int = 0, **overrides):
    """A model directory of `preset` shrunk to test size, random weights."""
    tok = Tokenizer.load(tokenizer_file)
    torch.manual_seed(seed)
    sizes = dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=128, dropout=0.0)
    config = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, **{**sizes, **overrides})
    directory = root / f"{preset}-{seed}-{len(overrides)}"
    write_model_dir(DecoderOnlyTransformer(config).eval(), directory, tokenizer_file,
                    Lineage(tokenizer_sha256=tok.sha256, step=0))
    return directory


# ---------------------------------------------------------------- fast: the file itself
def test_gpt2_file_reads_back_with_metadata_vocabulary_and_tensors(tiny_model_dir, tmp_path):
    path = export_gguf(tiny_model_dir, tmp_path / "m.gguf")
    model, tok = load_model(tiny_model_dir), Tokenizer.load(tiny_model_dir)
    cfg = model.config
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "gpt2"
    assert _field(reader, "gpt2.context_length") == cfg.max_seq_len
    assert _field(reader, "gpt2.block_count") == cfg.n_layers
    assert _field(reader, "gpt2.embedding_length") == cfg.d_model
    assert _field(reader, "gpt2.attention.head_count") == cfg.n_heads
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.tokens") == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    scores = _field(reader, "tokenizer.ggml.scores")
    assert np.allclose(scores, [tok.sp.get_score(i) for i in range(tok.vocab_size)])
    types = _field(reader, "tokenizer.ggml.token_type")
    for i in range(tok.vocab_size):
        expected = (2 if tok.sp.is_unknown(i) else 3 if tok.sp.is_control(i) else 6 if tok.sp.is_byte(i) else 1)
        assert types[i] == expected, tok.id_to_piece(i)
    assert all(types[tok.piece_to_id(t)] == 3 for t in CHAT_TOKENS)  # control: never matched in plain text
    assert (_field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id"),
            _field(reader, "tokenizer.ggml.unknown_token_id"), _field(reader, "tokenizer.ggml.padding_token_id")) \
        == (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id)
    assert _field(reader, "tokenizer.ggml.add_bos_token") is False
    assert _field(reader, "tokenizer.ggml.eot_token_id") == tok.piece_to_id("<|end|>")
    assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE

    tensors = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"} | {
        f"blk.{i}.{part}.{kind}" for i in range(cfg.n_layers) for kind in ("weight", "bias")
        for part in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")}
    assert set(tensors) == expected  # tied head: no output.weight (llama.cpp reuses token_embd)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in tensors.values())
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [cfg.d_model, cfg.resolved_d_ff]  # GGUF: (in, out)
    qkv = model.blocks[1].attn.qkv.weight.detach().numpy()
    assert np.array_equal(tensors["blk.1.attn_qkv.weight"].data.reshape(qkv.shape), qkv)


@pytest.mark.parametrize("dtype, ggml_type", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")])
def test_precision_applies_to_matrices_and_dequantizes_close(tiny_model_dir, tmp_path, dtype, ggml_type):
    path = export_gguf(tiny_model_dir, tmp_path / "m.gguf", dtype)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.ffn_up.weight"].tensor_type.name == ggml_type
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # norms and biases stay f32
    assert tensors["position_embd.weight"].tensor_type.name == "F32"
    original = load_model(tiny_model_dir).blocks[0].mlp.fc.weight.detach().numpy()
    t = tensors["blk.0.ffn_up.weight"]
    restored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(original.shape)
    tolerance = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2, "q4_0": 0.15}[dtype]
    assert np.abs(restored - original).max() <= tolerance * np.abs(original).max()


def test_qwen3_and_llama_layouts(tiny_model_dir, tmp_path):
    tok_file = tiny_model_dir / "tokenizer.model"
    for preset, overrides, arch in [("qwen3-style", {}, "qwen3"), ("qwen3-style", {"qk_norm": False}, "llama")]:
        src = preset_dir(tok_file, tmp_path, preset, **overrides)
        cfg = load_model(src).config
        reader = gguf.GGUFReader(export_gguf(src, tmp_path / f"{arch}.gguf"))
        assert _field(reader, "general.architecture") == arch
        assert _field(reader, f"{arch}.attention.head_count_kv") == cfg.kv_heads
        assert math.isclose(_field(reader, f"{arch}.rope.freq_base"), cfg.rope_theta)
        names = {t.name for t in reader.tensors}
        assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.0.ffn_gate.weight",
                "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"} <= names
        assert ("blk.0.attn_q_norm.weight" in names) == (arch == "qwen3")


def test_llama_rope_permutation_is_the_same_rotation():
    """Interleaved RoPE (llama.cpp's llama) on the permuted rows == our rotate-half RoPE, rows permuted alike."""
    from gpt.model.positions import RotaryPositions

    n_heads, hd, positions = 2, 8, torch.arange(5)
    w = torch.randn(n_heads * hd, 3)
    x = torch.randn(5, 3)
    q = (x @ w.T).view(5, n_heads, hd).transpose(0, 1)[None]  # (1, nh, T, hd)
    ours = RotaryPositions(16, hd, 10000.0).rotate(q, q, positions)[0]  # (1, nh, T, hd)
    wp = torch.from_numpy(_interleave_rope_rows(w.numpy(), n_heads))
    qp = (x @ wp.T).view(5, n_heads, hd)  # (T, nh, hd), pairs (2i, 2i+1)
    angles = positions[:, None].float() * 10000.0 ** (-torch.arange(0, hd, 2).float() / hd)  # (T, hd/2)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    even, odd = qp[..., 0::2], qp[..., 1::2]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)  # (T, nh, hd)
    # our output channels (i, i + hd/2) moved next to each other: (2i, 2i+1)
    expected = ours[0].view(n_heads, 5, 2, hd // 2).transpose(-1, -2).reshape(n_heads, 5, hd).transpose(0, 1)
    assert torch.allclose(rotated, expected, atol=1e-5)


def test_unsupported_layouts_and_inputs_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(GgufExportError, match="shared expert"):
        gguf_architecture(ModelConfig.from_preset("moe"))
    with pytest.raises(GgufExportError, match="moe_every"):
        gguf_architecture(ModelConfig.from_preset("hybrid"))
    assert gguf_architecture(ModelConfig.from_preset("hybrid", moe_every=1)) == "qwen3moe"
    assert gguf_architecture(ModelConfig.from_preset("hybrid", moe_every=1, qk_norm=False)) == "llama"
    quantized = save_quantized(tiny_model_dir, tmp_path / "int8", "int8")
    with pytest.raises(GgufExportError, match="quantized copy"):
        export_gguf(quantized, tmp_path / "q.gguf")
    (tmp_path / "exists.gguf").write_bytes(b"")
    with pytest.raises(GgufExportError, match="already exists"):
        export_gguf(tiny_model_dir, tmp_path / "exists.gguf")
    with pytest.raises(GgufExportError, match="--dtype"):
        export_gguf(tiny_model_dir, tmp_path / "x.gguf", "q4_k")


def test_cli_export_gguf(tiny_model_dir, tmp_path, capsys):
    from gpt.cli import main

    assert main(["export", "-c", str(tiny_model_dir), "--format", "gguf", "--dtype", "q8_0",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    moe = preset_dir(tiny_model_dir / "tokenizer.model", tmp_path, "moe")
    assert main(["export", "-c", str(moe), "--format", "gguf", "--out", str(tmp_path / "moe.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shared expert" in err[0]


def test_chat_template_renders_the_chat_format(tiny_model_dir):
    jinja2 = pytest.importorskip("jinja2")
    tok = Tokenizer.load(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True,
                                                 eos_token=tok.id_to_piece(tok.eos_id))
    assert text == "</s><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello.<|end|><|user|>Bye<|end|>" \
                   "<|assistant|>"


# ---------------------------------------------------------------- slow: real llama.cpp
VARIED_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n",
    "    indented\n\n\n  lines\t\ttabs and   runs    of spaces",
    "numbers 1234567890, 3.14159 and -42e10",
    "émigré café naïve façade",
    "Größe über Straße",
    "日本語のテキストと中文",
    "emoji 😀🎉 👍🏽 and a flag 🇮🇩",
    "   leading spaces",
    "trailing spaces   ",
    "mixed\r\nline endings\r",
    "<|end|><|assistant|> typed chat tokens stay text",
    "<s></s><unk><pad> reserved pieces as text",
    '{"json": [1, 2, {"a": null}], "b": "c"}',
    "https://example.com/path?q=1&r=2#frag",
    "a",
    " ",
    "ALL CAPS, snake_case_names and CamelCaseWords",
    "Ελληνικά και русский текст \x1b[0m",
]
GREEDY_PROMPTS = ["The", "def main(", "Return the number of", "x = 1\ny = "]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def llama_cpp():
    module = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: `make test-slow` installs "
                                                     "it (pip install -c constraints.txt 'gpt-pipeline[llamacpp]')")
    # On CPUs with AMX (Sapphire Rapids and later) llama.cpp repacks q8_0 weights into its AMX buffer and then
    # segfaults in the first matmul — any q8_0 file, also one quantized by llama.cpp itself (ggml-org/llama.cpp
    # #20824). Load weights without the extra buffer types (plain CPU kernels; repacking changes speed only).
    defaults = module.llama_cpp.llama_model_default_params

    def no_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module.llama_cpp, "llama_model_default_params", no_extra_buffers)
        yield module


@pytest.fixture(scope="module")
def varied_tokenizer(tmp_path_factory):
    """A BPE tokenizer (chat tokens as control symbols) trained on Python's own documentation: code, prose,
    whitespace runs; characters it never saw fall back to bytes."""
    import pydoc_data.topics

    from gpt.tokenizer import TokenizerConfig, train_tokenizer

    lines = [text for text in pydoc_data.topics.topics.values()] + VARIED_STRINGS[5:9]
    root = tmp_path_factory.mktemp("gguf_tok")
    return train_tokenizer(lines, TokenizerConfig(vocab_size=2048), root).path


def _train_briefly(directory, tokenizer_file, steps: int = 60) -> None:
    """A few optimizer steps on Python docs so the logits are peaked like a trained model's (random weights give
    near-ties that any rounding difference flips)."""
    import pydoc_data.topics

    from gpt.model_dir import save_model

    model = load_model(directory).train()
    tok = Tokenizer.load(tokenizer_file)
    ids = torch.tensor(tok.encode("\n\n".join(list(pydoc_data.topics.topics.values())[:40])))
    T = model.config.max_seq_len
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (8,), generator=gen)
        window = torch.stack([ids[s:s + T + 1] for s in starts.tolist()])
        _, loss = model(window[:, :-1], labels=window)
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_model(model.eval(), directory)


REPO = Path(__file__).resolve().parents[1]


def _default_model_dir() -> Path:
    """The pipeline's trained model (`paths.model`, CI runs `make repro` before the slow tests), or a skip."""
    from gpt.model_dir import WEIGHTS_FILE
    from gpt.params import load_params

    directory = REPO / load_params(REPO / "params.yaml").paths.model
    if not (directory / WEIGHTS_FILE).is_file():
        pytest.skip(f"no trained model in {directory} (make repro writes it)")
    return directory


# the presets' llama.cpp twins: llama-style = qwen3-style without QK-norm; qwen3moe / mixtral = hybrid with MoE in
# every layer (with / without QK-norm)
VARIANTS = {"llama-style": ("qwen3-style", {"qk_norm": False}), "qwen3moe": ("hybrid", {"moe_every": 1}),
            "mixtral": ("hybrid", {"moe_every": 1, "qk_norm": False})}


@pytest.fixture(scope="module", params=["default", "tiny", "qwen3-style", "llama-style", "qwen3moe", "mixtral"])
def exported(request, varied_tokenizer, tmp_path_factory):
    """(model dir, f32 gguf, q8_0 gguf): the pipeline's trained model, and a briefly trained small model of each
    llama.cpp graph we write."""
    root = tmp_path_factory.mktemp(f"gguf_{request.param}")
    if request.param == "default":
        src = _default_model_dir()
        return src, export_gguf(src, root / "f32.gguf"), export_gguf(src, root / "q8_0.gguf", "q8_0")
    preset, overrides = VARIANTS.get(request.param, (request.param, {}))
    src = preset_dir(varied_tokenizer, root, preset, **overrides)
    _train_briefly(src, varied_tokenizer)
    return src, export_gguf(src, root / "f32.gguf"), export_gguf(src, root / "q8_0.gguf", "q8_0")


def _llama(llama_cpp, path):
    # logits_all: llama-cpp-python keeps the logits (`scores`) only then; one-token evals compute the same anyway
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=1, logits_all=True,
                           verbose=False)


def _llama_greedy(llm, prompt_ids: list[int], n: int, eos: int) -> list[int]:
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token == eos:
            break
        out.append(token)
        llm.eval([token])
    return out


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_us(llama_cpp, exported):
    src, f32, _ = exported
    tok, llm = Tokenizer.load(src), _llama(llama_cpp, f32)
    strings = VARIED_STRINGS
    if not tok.sp.is_control(tok.piece_to_id("<|end|>")):
        # a tokenizer from before gpt/chat.py (chat tokens user-defined: sentencepiece matches them in text, while
        # llama.cpp forces "<|end|>" to a control token, which plain text never produces)
        strings = [s for s in VARIED_STRINGS if "<|" not in s]
    mismatches = [(s, tok.encode(s), llm.tokenize(s.encode(), add_bos=False, special=False))
                  for s in strings if tok.encode(s) != llm.tokenize(s.encode(), add_bos=False, special=False)]
    assert not mismatches
    assert any(tok.is_byte(i) for s in VARIED_STRINGS for i in tok.encode(s))  # byte fallback was exercised
    for s in VARIED_STRINGS[5:9]:  # and back: llama.cpp's text of our ids is ours (up to the dummy-prefix space)
        assert llm.detokenize(tok.encode(s)).decode().lstrip(" ") == tok.decode(tok.encode(s)).lstrip(" ")


@pytest.mark.slow
def test_llama_cpp_greedy_equals_gpt_generate(llama_cpp, exported):
    from gpt.generate import SamplingSpec, encode_prompt, generate_text
    from gpt.model_dir import load

    src, f32, _ = exported
    loaded, llm = load(src), _llama(llama_cpp, f32)
    spec = SamplingSpec(max_new_tokens=NEW_TOKENS, temperature=0.0)
    for prompt in GREEDY_PROMPTS:
        ours = generate_text(loaded.model, loaded.tokenizer, prompt, spec).token_ids
        ids = encode_prompt(loaded.tokenizer, prompt, loaded.model.config.max_seq_len).ids
        theirs = _llama_greedy(llm, ids, NEW_TOKENS, loaded.tokenizer.eos_id)
        assert theirs == ours, prompt
        assert len(ours) >= 8  # a real continuation, not an immediate EOS


@pytest.mark.slow
def test_llama_cpp_chat_template_gives_our_chat_ids(llama_cpp, exported):
    import jinja2

    src, f32, _ = exported
    tok, llm = Tokenizer.load(src), _llama(llama_cpp, f32)
    if "tokenizer.chat_template" not in llm.metadata:
        pytest.skip(f"{src}: its tokenizer has no control chat tokens (trained before gpt/chat.py): no chat template")
    template = llm.metadata["tokenizer.chat_template"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is  2+2?\n"},
                {"role": "assistant", "content": " Four."}, {"role": "user", "content": "ok?"}]
    # (no special-token text in the content: llama.cpp parses the whole rendered prompt for special tokens, so a
    # typed "<|end|>" becomes the control token there, while gpt.chat keeps it text)
    text = jinja2.Template(template).render(messages=messages, add_generation_prompt=True,
                                            eos_token=tok.id_to_piece(tok.eos_id))
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ChatTemplate(tok).render_prompt(messages)


def _mean_nll(logits: np.ndarray, targets: list[int]) -> float:
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.mean(logz - logits[np.arange(len(targets)), targets]))


@pytest.mark.slow
def test_llama_cpp_q8_0_agrees_closely(llama_cpp, exported, record_property):
    """q8_0 is lossy: report the greedy agreement and the perplexity difference on held-out text."""
    import pydoc_data.topics

    src, f32, q8 = exported
    tok = Tokenizer.load(src)
    text = "\n\n".join(list(pydoc_data.topics.topics.values())[60:64])  # not in _train_briefly's text
    ids = tok.encode(text)[:128]
    paths = load_params(REPO / "params.yaml").paths
    val = REPO / paths.shards / "val"
    if src == REPO / paths.model and (val / "manifest.json").is_file():
        from gpt.data.shards import TokenShards

        ids = TokenShards(val).read(0, 128).tolist()  # the trained model: its validation tokens
    nll = {}
    for name, path in (("f32", f32), ("q8_0", q8)):
        llm = _llama(llama_cpp, path)
        llm.reset()
        llm.eval(ids)
        nll[name] = _mean_nll(np.asarray(llm.scores[:len(ids) - 1]), ids[1:])
    model = load_model(src)
    with torch.no_grad():
        ours = model(torch.tensor([ids[:-1]]))[0][0].numpy()
    nll["ours"] = _mean_nll(ours, ids[1:])
    llm_f32, llm_q8 = _llama(llama_cpp, f32), _llama(llama_cpp, q8)
    same = total = 0
    for prompt in GREEDY_PROMPTS:
        p = tok.encode(prompt)
        a = _llama_greedy(llm_f32, p, NEW_TOKENS, tok.eos_id)
        b = _llama_greedy(llm_q8, p, NEW_TOKENS, tok.eos_id)
        same += sum(x == y for x, y in zip(a, b))
        total += max(len(a), len(b))
    agreement = same / total
    ppl = {k: math.exp(v) for k, v in nll.items()}
    record_property("gguf_q8_0", {"agreement": agreement, "ppl": ppl})
    print(f"\n{src.name}: q8_0 greedy agreement {agreement:.3f}; perplexity ours {ppl['ours']:.3f}, "
          f"llama.cpp f32 {ppl['f32']:.3f}, q8_0 {ppl['q8_0']:.3f}")
    assert abs(ppl["f32"] - ppl["ours"]) / ppl["ours"] < 1e-3
    assert abs(ppl["q8_0"] - ppl["f32"]) / ppl["f32"] < 0.02
    assert agreement >= 0.5
