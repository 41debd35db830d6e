"""Hugging Face directories: `export_hf` turns one of our model directories (gpt.model_dir) into a directory that
`transformers` loads offline with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`;
`import_hf` turns a local GPT-2, Llama, Qwen3, Mixtral or Qwen3-MoE directory into one of our model directories
(for `gpt generate`/`serve`/`info`).

Weights go through gpt.hf (the model <-> transformers conversions): `hf_architecture` picks the transformers class
that computes exactly what a config computes, `to_hf`/`from_hf` map the weights; this module adds the files around
them. The HF side's file names are transformers' own constants; ours are gpt.model_dir's and gpt.tokenizer's. Import loads
through transformers itself (safetensors only) because its MoE checkpoints are saved per expert
(`block_sparse_moe.experts.N.w1`), a layout transformers converts on load.

The tokenizer: our sentencepiece BPE model becomes a `tokenizers` BPE with byte fallback in `tokenizer.json`,
built here from the model file itself. SentencePiece's `.model` is a protobuf; we read the few fields we need
(pieces with score and type, normalizer flags, byte_fallback) with a small wire-format reader rather than adding
protobuf as a dependency. The pipeline mirrors what SentencePiece does when encoding:
  normalize: (charsmap) → (strip/squeeze spaces) → " " → "▁" → dummy "▁" prefix
  model:     BPE whose merges are ranked by the merged piece's score (SentencePiece BPE merges the pair whose
             result scores highest), byte fallback to <0xNN> pieces for characters outside the vocabulary
  specials:  user-defined pieces (e.g. <|user|>) are isolated and never merged; <s> </s> <pad> are special.
tests/test_export.py checks ids equal ours on non-ASCII, byte-fallback, whitespace and special-token strings.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt.atomic import write_json_atomic
from gpt.errors import GptError
from gpt.model_dir import (
    Lineage,
    check_model_dir,
    create_new_dir,
    load_model,
    quantization_info,
    read_lineage,
    save_model,
    write_lineage,
)
from gpt.tokenizer import (
    HF_SPECIAL_TOKENS_FILE,
    HF_TOKENIZER_CONFIG_FILE,
    HF_TOKENIZER_FILE,
    TOKENIZER_FILE,
    Tokenizer,
)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class ExportError(GptError, ValueError):
    """Export/import is not possible (wrong architecture, missing or pickled files); names the file or value."""


# ---------------------------------------------------------------- sentencepiece model file → tokenizer.json
@dataclass
class SpmModel:
    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = 1  # 1 unigram, 2 bpe
    byte_fallback: bool = False
    unk_id: int = 0
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    precompiled_charsmap: bytes = b""


def _fields(buf: bytes):
    """Yield (field_number, value) of one protobuf message; length-delimited values as bytes."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result

    while pos < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 1:
            yield number, buf[pos:pos + 8]
            pos += 8
        elif wire == 2:
            length = varint()
            yield number, buf[pos:pos + length]
            pos += length
        elif wire == 5:
            yield number, buf[pos:pos + 4]
            pos += 4
        else:
            raise ExportError(f"not a sentencepiece model (protobuf wire type {wire})")


def read_spm_model(model_bytes: bytes) -> SpmModel:
    """The fields of sentencepiece's ModelProto that a converter needs (field numbers: sentencepiece_model.proto)."""
    spm = SpmModel()
    for number, value in _fields(model_bytes):
        if number == 1:  # SentencePiece piece = 1 {piece = 1, score = 2, type = 3}
            piece, score, kind = "", 0.0, NORMAL
            for n, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            spm.pieces.append((piece, score, kind))
        elif number == 2:  # TrainerSpec: model_type = 3, unk_id = 40, byte_fallback = 35
            for n, v in _fields(value):
                if n == 3:
                    spm.model_type = v
                elif n == 35:
                    spm.byte_fallback = bool(v)
                elif n == 40:
                    spm.unk_id = v
        elif number == 3:  # NormalizerSpec: charsmap = 2, add_dummy_prefix = 3, remove_extra_ws = 4, escape_ws = 5
            for n, v in _fields(value):
                if n == 2:
                    spm.precompiled_charsmap = v
                elif n == 3:
                    spm.add_dummy_prefix = bool(v)
                elif n == 4:
                    spm.remove_extra_whitespaces = bool(v)
                elif n == 5:
                    spm.escape_whitespaces = bool(v)
    if not spm.pieces:
        raise ExportError("not a sentencepiece model (no pieces)")
    return spm


def _bpe_merges(spm: SpmModel) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best-scoring merged piece first."""
    normal = {p: (score, i) for i, (p, score, kind) in enumerate(spm.pieces) if kind == NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def build_hf_tokenizer(model_bytes: bytes) -> Any:
    """A `tokenizers.Tokenizer` that encodes and decodes like the sentencepiece model in `model_bytes`."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTok
    from tokenizers.models import BPE, Unigram

    spm = read_spm_model(model_bytes)
    unk = spm.pieces[spm.unk_id][0]
    user_defined = [p for p, _, kind in spm.pieces if kind == USER_DEFINED]
    if spm.model_type == 2:
        vocab = {p: i for i, (p, _, _) in enumerate(spm.pieces)}
        model = BPE(vocab=vocab, merges=_bpe_merges(spm), unk_token=unk, fuse_unk=True,
                    byte_fallback=spm.byte_fallback, ignore_merges=bool(user_defined))
    elif spm.model_type == 1:
        model = Unigram([(p, s) for p, s, _ in spm.pieces], unk_id=spm.unk_id, byte_fallback=spm.byte_fallback)
    else:
        raise ExportError(f"sentencepiece model type {spm.model_type} is not supported (only BPE and unigram)")
    tok = HFTok(model)
    norms: list[Any] = []
    if spm.precompiled_charsmap:
        norms.append(normalizers.Precompiled(spm.precompiled_charsmap))
    if spm.remove_extra_whitespaces:  # sentencepiece squeezes and strips spaces only, not other whitespace
        norms += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spm.escape_whitespaces:
        norms.append(normalizers.Replace(" ", "▁"))
    if spm.add_dummy_prefix:  # Metaspace skips its prefix when the text already starts with "▁"; spm doesn't
        norms.append(normalizers.Replace(Regex(r"\A▁"), "▁▁"))
    tok.normalizer = normalizers.Sequence(norms)
    pre: list[Any] = []
    if spm.add_dummy_prefix:
        pre.append(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False))
    if user_defined:  # spm matches user-defined pieces whole, before and instead of any merge
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if pre:
        tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    decs: list[Any] = [decoders.Replace("▁", " ")]
    if spm.byte_fallback:
        decs.append(decoders.ByteFallback())
    decs.append(decoders.Fuse())
    if spm.add_dummy_prefix:
        decs.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(decs)
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False)
                            for p, _, kind in spm.pieces if kind == CONTROL])
    return tok


def _special_tokens(spm_tokenizer: Any) -> dict[str, str]:
    names = {}
    for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("unk_token", "unk_id"),
                      ("pad_token", "pad_id")):
        i = getattr(spm_tokenizer, attr, -1)
        if isinstance(i, int) and i >= 0:
            names[key] = spm_tokenizer.id_to_piece(i)
    return names


def _chat_template(spm_tokenizer: Any) -> str | None:
    """gpt.chat's format as a Jinja chat template; None for a tokenizer without the chat tokens."""
    from gpt.chat import ChatFormatError, ChatTemplate

    try:
        return ChatTemplate(spm_tokenizer).to_jinja()
    except ChatFormatError:
        return None


# ---------------------------------------------------------------- directories
_EXPORTABLE = ("GPT-2 blocks (layernorm, learned positions, gelu) -> GPT-2; rope+rmsnorm+swiglu -> Llama, "
               "with qk_norm -> Qwen3; MoE without a shared expert -> Mixtral, with qk_norm -> Qwen3-MoE")


def exportable_presets() -> list[str]:
    """The model presets that have a transformers twin (as decided by gpt.hf.hf_architecture)."""
    from gpt.hf import hf_architecture
    from gpt.model import PRESETS, ModelConfig

    names = []
    for name in sorted(PRESETS):
        try:
            hf_architecture(ModelConfig.from_preset(name))
        except ValueError:
            continue
        names.append(name)
    return names


def export_hf(src: str | Path, out: str | Path) -> Path:
    """Write `out`: config.json + model.safetensors of the matching transformers causal LM (GPT-2, Llama, Qwen3,
    Mixtral or Qwen3-MoE) + tokenizer.json and its configs."""
    from transformers import PreTrainedTokenizerFast

    from gpt.hf import hf_architecture, to_hf

    src = check_model_dir(src)
    if quantization_info(src) is not None:
        raise ExportError(f"{src} is a quantized copy; export the fp32 model directory instead")
    if not (src / TOKENIZER_FILE).is_file():
        raise ExportError(f"missing {src / TOKENIZER_FILE} (the sentencepiece model to convert)")
    spm_tok = Tokenizer.load(src / TOKENIZER_FILE)
    model = load_model(src)
    try:
        hf_architecture(model.config)
    except ValueError as err:
        raise ExportError(f"{src}: cannot export to Hugging Face: {err}. Exportable: {_EXPORTABLE} "
                          f"(presets: {', '.join(exportable_presets())})") from None
    hf_model = to_hf(model, bos_token_id=spm_tok.bos_id, eos_token_id=spm_tok.eos_id)
    # Special-token strings in text are matched as the special tokens (transformers' default): the chat template
    # writes "<|user|>", "</s>"... as text, so apply_chat_template needs that. Plain text that must stay text (as
    # sentencepiece keeps it) is encoded with split_special_tokens=True; untrusted chat content with
    # apply_chat_template(..., sanitize_control_tokens=True).
    fast = PreTrainedTokenizerFast(tokenizer_object=build_hf_tokenizer(spm_tok.model_bytes),
                                   model_max_length=model.config.max_seq_len, split_special_tokens=False,
                                   chat_template=_chat_template(spm_tok),
                                   **_special_tokens(spm_tok))

    lineage = read_lineage(src)
    with create_new_dir(out, ExportError) as tmp:
        hf_model.save_pretrained(tmp)
        fast.save_pretrained(tmp, save_jinja_files=False)  # chat_template in tokenizer_config.json (4.x reads it)
        _portable_tokenizer_config(tmp / HF_TOKENIZER_CONFIG_FILE)
        if lineage is not None:
            write_lineage(tmp, lineage)
    return Path(out)


def _portable_tokenizer_config(path: Path) -> None:
    """Make tokenizer_config.json load in every supported transformers (>= 4.45): name the class 4.x knows
    (transformers 5 writes "TokenizersBackend", which 4.x cannot find) and say the model takes no token_type_ids
    (4.x's PreTrainedTokenizerFast returns them by default, and GPT-2 adds them as embeddings: garbage output)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_input_names"] = ["input_ids", "attention_mask"]
    write_json_atomic(path, config)


def _check_safetensors(src: Path) -> None:
    """Refuse a directory without safetensors weights before transformers looks at it (it would unpickle *.bin)."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    if (src / SAFE_WEIGHTS_NAME).is_file() or (src / SAFE_WEIGHTS_INDEX_NAME).is_file():
        return
    if any(src.glob("*.bin")) or any(src.glob("*.pt")):
        raise ExportError(f"{src} has only pickled weights (*.bin/*.pt); we never unpickle. Convert them to "
                          f"{SAFE_WEIGHTS_NAME} first (transformers: save_pretrained(..., safe_serialization=True))")
    raise ExportError(f"missing {src / SAFE_WEIGHTS_NAME}")


HF_VOCAB_FILE, HF_MERGES_FILE = "vocab.json", "merges.txt"  # a GPT-2-style byte-level BPE without tokenizer.json


def _copy_hf_tokenizer(src: Path, dst: Path) -> None:
    """Keep a sentencepiece model if there is one; else tokenizer.json; else build it from vocab.json+merges.txt."""
    if (src / TOKENIZER_FILE).is_file():
        shutil.copyfile(src / TOKENIZER_FILE, dst / TOKENIZER_FILE)
        return
    if (src / HF_TOKENIZER_FILE).is_file():
        shutil.copyfile(src / HF_TOKENIZER_FILE, dst / HF_TOKENIZER_FILE)
    elif (src / HF_VOCAB_FILE).is_file() and (src / HF_MERGES_FILE).is_file():
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, pre_tokenizers
        from tokenizers.models import BPE

        tok = HFTok(BPE.from_file(str(src / HF_VOCAB_FILE), str(src / HF_MERGES_FILE)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.save(str(dst / HF_TOKENIZER_FILE))
    else:
        raise ExportError(f"no tokenizer in {src} ({TOKENIZER_FILE}, {HF_TOKENIZER_FILE} or "
                          f"{HF_VOCAB_FILE} + {HF_MERGES_FILE})")
    for name in (HF_TOKENIZER_CONFIG_FILE, HF_SPECIAL_TOKENS_FILE):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _load_hf_model(src: Path) -> Any:
    """The transformers causal LM in `src` (local files and safetensors only), in float32; every tensor present."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import CONFIG_NAME

    from gpt.hf import HF_CLASSES

    if not (src / CONFIG_NAME).is_file():
        raise ExportError(f"missing {src / CONFIG_NAME} (is {src} a Hugging Face model directory?)")
    model_type = json.loads((src / CONFIG_NAME).read_text(encoding="utf-8")).get("model_type")
    if model_type not in HF_CLASSES:
        raise ExportError(f"{src / CONFIG_NAME}: model_type {model_type!r}; supported: {', '.join(HF_CLASSES)}")
    _check_safetensors(src)
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(
            src, local_files_only=True, use_safetensors=True, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ExportError(f"{src}: transformers cannot load it: {err}") from None
    missing = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
    if missing:
        raise ExportError(f"{src}: weights lack or mis-shape {len(missing)} tensor(s), e.g. {missing[0]}")
    return hf_model.eval()


def import_hf(src: str | Path, out: str | Path) -> Path:
    """A local Hugging Face GPT-2 / Llama / Qwen3 / Mixtral / Qwen3-MoE directory → our model directory
    (weights, config, tokenizer, lineage)."""
    from gpt.hf import from_hf
    from gpt.model import DecoderOnlyTransformer

    src = Path(src)
    hf_model = _load_hf_model(src)
    try:
        converted = from_hf(hf_model)
    except ValueError as err:
        raise ExportError(f"{src}: {err}") from None
    # inference copies carry no dropout (transformers configs default to e.g. GPT-2's 0.1)
    model = DecoderOnlyTransformer(converted.config.replace(dropout=0.0))
    model.load_state_dict(converted.state_dict())
    origin = {"imported_from": str(src.resolve()), "format": f"hf-{hf_model.config.model_type}"}
    with create_new_dir(out, ExportError) as tmp:
        save_model(model.eval(), tmp, metadata=origin)
        _copy_hf_tokenizer(src, tmp)
        write_lineage(tmp, Lineage(extra=origin))
    return Path(out)
