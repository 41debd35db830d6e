"""GGUF export: one of our model directories → a single `.gguf` file that llama.cpp (llama-cli, llama-server,
llama-cpp-python), Ollama and LM Studio load.

The file is written with the `gguf` package (llama.cpp's own Python writer, PyPI `gguf`; the `gguf` extra), not by
hand. What goes in it:

- **Architecture.** llama.cpp has a fixed graph per architecture name, so a config is mapped to the one that
  computes the same function (`gguf_architecture`): GPT-2 blocks → `gpt2`; RoPE + RMSNorm + SwiGLU → `llama`,
  with QK-norm → `qwen3`; MoE in every layer with renormalised top-k and no shared expert → `llama` (Mixtral layout)
  or `qwen3moe`. Other configs (a shared expert, alternating dense/MoE layers, Switch gating) are refused.
- **Tensors** in llama.cpp's names and layouts (`_gpt2_tensors`, `_rope_tensors`): our fused [q|k|v] projection
  is kept fused for gpt2 and split for llama/qwen3; llama's RoPE pairs channel 2i with 2i+1 while ours (like HF's)
  pairs i with i + head_dim/2, so for `llama` the q/k output rows are permuted into interleaved order (qwen3's
  RoPE is the "neox" kind, the same as ours: no permutation). A GPT-2 model without biases gets zero biases
  (llama.cpp's gpt2 graph requires them; adding zero is exact). Tied embeddings are written once.
- **Vocabulary** (`_add_vocabulary`): our sentencepiece BPE pieces, scores and types (normal/control/byte/unknown,
  the same numbering in both), tokenizer model `llama` (llama.cpp's SentencePiece-BPE tokenizer), BOS/EOS/UNK/PAD,
  EOT = `<|end|>`, add_bos/add_eos false (our prompts carry no BOS), and the chat template (`CHAT_TEMPLATE`).
- **Precision** (`--dtype`): f32, f16, bf16, q8_0, q4_0 for the matrices; norms, biases, the position table and
  an MoE router stay f32. Quantized types need rows that are a multiple of 32 long; other matrices fall back to f16.

Known difference: llama.cpp's gpt2 graph uses the tanh approximation of GELU (`ggml_gelu`), so a model trained with
exact GELU (`activation: gelu`, the tiny preset) differs by at most ~1e-3 per activation there (tests/test_gguf.py
measures the effect on greedy decoding).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gpt.chat import END_TOKEN, ROLE_TOKENS
from gpt.errors import GptError
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.model.moe import MoE

if TYPE_CHECKING:
    from gpt.tokenizer import Tokenizer

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # q8_0 and q4_0 quantize blocks of 32 values along a row

# sentencepiece piece types (sentencepiece_model.proto) — llama.cpp's token types use the same numbers
SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED, SPM_UNUSED, SPM_BYTE = 1, 2, 3, 4, 5, 6

# Jinja rendering of gpt/chat.py's format for llama.cpp / LM Studio ("tokenizer.chat_template"). llama.cpp matches
# the control tokens in the rendered text and prefixes text that follows a special token with a space, which is
# sentencepiece's dummy prefix that ChatTemplate gets by encoding each message on its own: the ids are the same
# (tests/test_gguf.py checks it in llama.cpp).
CHAT_TEMPLATE = (
    "{{ eos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '" + ROLE_TOKENS["system"] + "' }}"
    "{% elif message['role'] == 'user' %}{{ '" + ROLE_TOKENS["user"] + "' }}"
    "{% else %}{{ '" + ROLE_TOKENS["assistant"] + "' }}{% endif %}"
    "{{ message['content'] }}{{ '" + END_TOKEN + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ROLE_TOKENS["assistant"] + "' }}{% endif %}"
)


class GgufExportError(GptError, ValueError):
    """The model cannot be written as GGUF (architecture, tokenizer, dtype); the message says why and what works."""


# ---------------------------------------------------------------- architecture
def gguf_architecture(config: ModelConfig) -> str:
    """The llama.cpp architecture computing what `config` computes, or GgufExportError saying why none does."""
    if config.position == "learned":
        problems = _problems([
            (config.norm == "layernorm", "norm must be layernorm"),
            (config.mlp == "gelu", "mlp must be gelu"),
            (config.activation in ("gelu", "gelu_tanh"), "activation must be gelu or gelu_tanh"),
            (config.kv_heads == config.n_heads and config.head_dim is None,
             "attention must be multi-head with head_dim = d_model / n_heads"),
            (not config.qk_norm, "qk_norm must be off"),
            (config.moe_n_experts == 0, "no MoE layers"),
        ])
        if problems:
            raise GgufExportError(f"learned positions mean llama.cpp's gpt2 graph, which needs: {problems}")
        return "gpt2"
    problems = _problems([
        (config.norm == "rmsnorm", "norm must be rmsnorm"),
        (config.mlp == "swiglu", "mlp must be swiglu"),
        (not config.bias, "bias must be false (llama.cpp's qwen3/MoE graphs have no MLP biases)"),
    ])
    if config.moe_n_experts:
        problems += _problems([
            (config.moe_every == 1, "MoE must be in every layer (moe_every 1)"),
            (not config.moe_shared_expert, "no shared expert"),
            (config.moe_norm_topk, "top-k weights must be renormalised (moe_norm_topk true)"),
            (config.moe_capacity_factor is None, "no capacity-based token dropping"),
        ])
    if problems:
        raise GgufExportError(f"RoPE models map to llama.cpp's llama/qwen3 graphs, which need: {problems}")
    if config.moe_n_experts:
        return "qwen3moe" if config.qk_norm else "llama"
    return "qwen3" if config.qk_norm else "llama"


def _problems(checks: list[tuple[bool, str]]) -> str:
    return "; ".join(msg for ok, msg in checks if not ok)


# ---------------------------------------------------------------- tensors (numpy, PyTorch (out, in) layout)
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _interleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection (n_heads*hd, ...) from "rotate half" order (i, i+hd/2 paired) to llama.cpp's
    interleaved order (2i, 2i+1 paired), per head."""
    hd = w.shape[0] // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, hd // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _gpt2_tensors(model: DecoderOnlyTransformer) -> dict[str, np.ndarray]:
    cfg = model.config

    def bias(linear_or_norm: Any, size: int) -> np.ndarray:
        b = linear_or_norm.bias
        return _np(b) if b is not None else np.zeros(size, dtype=np.float32)

    out = {"token_embd.weight": _np(model.tok_embeddings.weight),
           "position_embd.weight": _np(model.positions.wpe.weight),
           "output_norm.weight": _np(model.final_norm.weight),
           "output_norm.bias": bias(model.final_norm, cfg.d_model)}
    for i, block in enumerate(model.blocks):
        parts = {"attn_norm": block.attn_norm, "attn_qkv": block.attn.qkv, "attn_output": block.attn.out,
                 "ffn_norm": block.mlp_norm, "ffn_up": block.mlp.fc, "ffn_down": block.mlp.proj}
        for name, module in parts.items():
            out[f"blk.{i}.{name}.weight"] = _np(module.weight)
            out[f"blk.{i}.{name}.bias"] = bias(module, module.weight.shape[0])
    return out


def _rope_tensors(model: DecoderOnlyTransformer, arch: str) -> dict[str, np.ndarray]:
    cfg = model.config
    hd, nh, nkv = cfg.resolved_head_dim, cfg.n_heads, cfg.kv_heads
    out = {"token_embd.weight": _np(model.tok_embeddings.weight), "output_norm.weight": _np(model.final_norm.weight)}
    for i, block in enumerate(model.blocks):
        p = f"blk.{i}."
        q, k, v = np.split(_np(block.attn.qkv.weight), [nh * hd, (nh + nkv) * hd])  # [q | k | v] along out
        if arch == "llama":
            q, k = _interleave_rope_rows(q, nh), _interleave_rope_rows(k, nkv)
        out |= {p + "attn_norm.weight": _np(block.attn_norm.weight), p + "attn_q.weight": q,
                p + "attn_k.weight": k, p + "attn_v.weight": v, p + "attn_output.weight": _np(block.attn.out.weight),
                p + "ffn_norm.weight": _np(block.mlp_norm.weight)}
        if cfg.qk_norm:
            out[p + "attn_q_norm.weight"] = _np(block.attn.q_norm.weight)
            out[p + "attn_k_norm.weight"] = _np(block.attn.k_norm.weight)
        if isinstance(block.mlp, MoE):
            gate_up = _np(block.mlp.experts_gate_up)  # (E, C, 2H): x @ W, [gate | up] along the last dim
            gate, up = np.split(gate_up, 2, axis=-1)
            out |= {p + "ffn_gate_inp.weight": _np(block.mlp.router.weight),  # (E, C)
                    p + "ffn_gate_exps.weight": np.ascontiguousarray(gate.swapaxes(1, 2)),  # (E, H, C)
                    p + "ffn_up_exps.weight": np.ascontiguousarray(up.swapaxes(1, 2)),
                    p + "ffn_down_exps.weight": np.ascontiguousarray(_np(block.mlp.experts_proj).swapaxes(1, 2))}
        else:
            gate, up = np.split(_np(block.mlp.gate_up.weight), 2)  # [gate | up] along out
            out |= {p + "ffn_gate.weight": gate, p + "ffn_up.weight": up,
                    p + "ffn_down.weight": _np(block.mlp.proj.weight)}
    return out


def gguf_tensors(model: DecoderOnlyTransformer, arch: str) -> dict[str, np.ndarray]:
    """llama.cpp tensor name → float32 array (numpy shape = PyTorch's (out, in); GGUF stores dims reversed).
    `output.weight` only for untied embeddings (llama.cpp reuses token_embd otherwise)."""
    tensors = _gpt2_tensors(model) if arch == "gpt2" else _rope_tensors(model, arch)
    if not model.config.tie_embeddings:
        tensors["output.weight"] = _np(model.lm_head.weight)
    return {name: np.ascontiguousarray(t) for name, t in tensors.items()}


def _encode_tensor(name: str, data: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(array to write, raw GGML type or None) for one tensor at the requested precision."""
    from gguf import GGMLQuantizationType, quants

    keep_f32 = data.ndim == 1 or name.startswith("position_embd") or ".ffn_gate_inp." in name
    if dtype == "f32" or keep_f32:
        return data.astype(np.float32), None
    if dtype in ("q8_0", "q4_0") and data.shape[-1] % QUANT_BLOCK:
        dtype = "f16"  # rows not a whole number of blocks: as llama.cpp's converter does
    if dtype == "f16":
        return data.astype(np.float16), None
    qtype = {"bf16": GGMLQuantizationType.BF16, "q8_0": GGMLQuantizationType.Q8_0,
             "q4_0": GGMLQuantizationType.Q4_0}[dtype]
    return quants.quantize(data, qtype), qtype


# ---------------------------------------------------------------- vocabulary
def _add_vocabulary(writer: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Pieces, scores, types and special ids of our sentencepiece model; padded with unused pieces up to the
    model's vocab_size (a padded embedding)."""
    from gguf import TokenType

    from gpt.hf_dir import read_spm_model

    spm = read_spm_model(tokenizer.model_bytes)
    if spm.model_type != 2:
        raise GgufExportError("GGUF export needs a sentencepiece BPE tokenizer (llama.cpp's SentencePiece "
                              f"tokenizer merges BPE-style); this one is model type {spm.model_type} (unigram)")
    if spm.remove_extra_whitespaces or spm.precompiled_charsmap:
        raise GgufExportError("the tokenizer normalizes text (remove_extra_whitespaces or a character map), which "
                              "llama.cpp's SentencePiece tokenizer does not do: token ids would differ")
    pieces = [p for p, _, _ in spm.pieces]
    scores = [float(s) for _, s, _ in spm.pieces]
    types = [kind if kind in (SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED, SPM_UNUSED, SPM_BYTE)
             else SPM_NORMAL for _, _, kind in spm.pieces]
    if len(pieces) > vocab_size:
        raise GgufExportError(f"the tokenizer has {len(pieces)} pieces but the model only {vocab_size} embeddings")
    for i in range(len(pieces), vocab_size):
        pieces.append(f"<unused{i}>")
        scores.append(-1e9)
        types.append(int(TokenType.UNUSED))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for add, token_id in ((writer.add_bos_token_id, tokenizer.bos_id), (writer.add_eos_token_id, tokenizer.eos_id),
                          (writer.add_unk_token_id, tokenizer.unk_id), (writer.add_pad_token_id, tokenizer.pad_id)):
        if token_id >= 0:
            add(token_id)
    writer.add_add_bos_token(False)  # gpt.generate encodes prompts without BOS (an empty prompt starts at EOS)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(spm.add_dummy_prefix)
    if all(tokenizer.piece_to_id(t) > 0 and types[tokenizer.piece_to_id(t)] == SPM_CONTROL
           for t in (*ROLE_TOKENS.values(), END_TOKEN)):
        writer.add_eot_token_id(tokenizer.piece_to_id(END_TOKEN))  # llama.cpp ends a chat turn there
        writer.add_chat_template(CHAT_TEMPLATE)


# ---------------------------------------------------------------- hyperparameters
def _add_hparams(writer: Any, config: ModelConfig, arch: str) -> None:
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    # every layer of an exported MoE is MoE; llama's (Mixtral) graph sizes its experts by feed_forward_length
    writer.add_feed_forward_length(config.resolved_moe_d_ff if config.moe_n_experts else config.resolved_d_ff)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_heads)
    writer.add_vocab_size(config.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(config.layer_norm_eps)
        return
    writer.add_layer_norm_rms_eps(config.layer_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.resolved_head_dim)
    writer.add_key_length(config.resolved_head_dim)
    writer.add_value_length(config.resolved_head_dim)
    if config.moe_n_experts:
        writer.add_expert_count(config.moe_n_experts)
        writer.add_expert_used_count(config.moe_top_k)
        writer.add_expert_feed_forward_length(config.resolved_moe_d_ff)


def _file_type(dtype: str) -> int:
    from gguf import LlamaFileType

    return int({"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
                "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0}[dtype])


# ---------------------------------------------------------------- the file
def write_gguf(model: DecoderOnlyTransformer, tokenizer: Tokenizer, path: str | Path, dtype: str = "f32",
               name: str = "gpt-pipeline") -> Path:
    """Write `model` + `tokenizer` to the GGUF file `path` (atomically) at precision `dtype` (GGUF_DTYPES)."""
    try:
        import gguf
    except ImportError:
        raise GgufExportError("GGUF export needs the `gguf` package: pip install 'gpt-pipeline[gguf]' "
                              "(or pip install gguf)") from None
    from gpt.atomic import write_atomic

    if dtype not in GGUF_DTYPES:
        raise GgufExportError(f"--dtype {dtype!r}: choose one of {', '.join(GGUF_DTYPES)}")
    arch = gguf_architecture(model.config)
    tensors = gguf_tensors(model, arch)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name)
        writer.add_file_type(_file_type(dtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, model.config, arch)
        _add_vocabulary(writer, tokenizer, model.config.vocab_size)
        for tensor_name, data in tensors.items():
            array, raw_dtype = _encode_tensor(tensor_name, data, dtype)
            writer.add_tensor(tensor_name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_atomic(path, write)


def export_gguf(src: str | Path, out: str | Path, dtype: str = "f32") -> Path:
    """Model directory `src` → the GGUF file `out` (must not exist). Quantized copies are refused: export the
    full-precision directory and choose `dtype` here."""
    from gpt.model_dir import check_model_dir, load_model, quantization_info
    from gpt.tokenizer import TOKENIZER_FILE, Tokenizer

    src, out = check_model_dir(src), Path(out)
    if quantization_info(src) is not None:
        raise GgufExportError(f"{src} is a quantized copy; export the full-precision model directory instead "
                              f"(--dtype {'|'.join(GGUF_DTYPES)} chooses the GGUF precision)")
    if not (src / TOKENIZER_FILE).is_file():
        raise GgufExportError(f"missing {src / TOKENIZER_FILE}: GGUF export needs the sentencepiece tokenizer")
    if out.exists():
        raise GgufExportError(f"output file already exists: {out} (choose a new --out)")
    model = load_model(src, dtype=torch.float32)
    return write_gguf(model, Tokenizer.load(src / TOKENIZER_FILE), out, dtype, name=src.resolve().name)
