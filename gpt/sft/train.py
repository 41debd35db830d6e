"""Supervised fine-tuning: the pretrained model (`paths.model`) + SFT conversations → the chat model.

The `sft` stage's work, reusing the pretraining loop (gpt/train/loop.py: AdamW/Muon, the lr schedule, verified
checkpoints with exact resume, Ctrl-C/SIGTERM saves) with a different batch source: conversations rendered by
`gpt.chat.ChatTemplate`, packed into windows (gpt/sft/packing.py) whose labels score only assistant tokens. Optional
LoRA (gpt/sft/lora.py) freezes the base and trains adapters, merged into the weights at the end.

`sft:` params (`SftConfig`) hold what differs from pretraining (steps, batch, lr and schedule, evaluation cadence,
LoRA); every other training knob (optimizer, betas, grad_clip, precision, device, ...) comes from `train:`.
Checkpoints go to `paths.checkpoints/sft/` (the pretraining run's manager ignores the folder); their run identity
holds the parent model's weights hash, the SFT files' hashes, the LoRA config and this package's source, so a
changed parent, dataset or code never resumes an old run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gpt.chat import ChatTemplate
from gpt.config import ConfigError, to_dict
from gpt.model_dir import Lineage, write_model_dir
from gpt.sft.data import read_conversations, split_path
from gpt.sft.lora import (
    ADAPTER_FILE,
    LoraConfig,
    adapter_state_dict,
    apply_lora,
    merge_lora,
    optimizer_state_bytes,
    parameter_counts,
    save_adapter,
)
from gpt.sft.packing import PackedConversations, pack_conversations
from gpt.tokenizer import TOKENIZER_FILE, Tokenizer
from gpt.train.config import Schedule, TrainConfig
from gpt.train.device import Precision, seed_everything
from gpt.train.init import ParentModel
from gpt.train.loop import TrainResult, train
from gpt.train.step import LabeledWindows, labeled_validation

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "sft"  # under paths.checkpoints


@dataclasses.dataclass(frozen=True)
class ChatEvalConfig:
    """`sft.eval:` the chat evaluation on held-out checkable tasks (gpt/sft/chat_eval.py)."""

    max_items: int = 100  # held-out rows, taken round-robin across tasks
    max_new_tokens: int = 24  # held-out answers are short; a longer reply is wrong anyway

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"sft.eval: max_items and max_new_tokens must be >= 1, got {self.max_items} and "
                              f"{self.max_new_tokens}")


@dataclasses.dataclass(frozen=True)
class SftConfig:
    """params.yaml `sft:` — fine-tuning paths.model into paths.chat_model."""

    optimizer: Literal["adamw", "muon"] = "adamw"  # independent of train.optimizer
    max_steps: int = 150
    batch_size: int = 16
    seq_len: int | None = None  # window length; null = train.seq_len
    lr: float = 1.0e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: Schedule = "cosine"
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_windows: int = 64
    checkpoint_every: int = 50
    seed: int = 1337
    samples: int = 4  # validation conversations answered by the chat model in metrics/sft_samples.md
    max_new_tokens: int = 64
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    eval: ChatEvalConfig = dataclasses.field(default_factory=ChatEvalConfig)

    def __post_init__(self) -> None:
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"sft.seq_len: must be >= 1 or null, got {self.seq_len}")
        if self.samples < 0 or self.max_new_tokens < 1:
            raise ConfigError("sft.samples must be >= 0 and sft.max_new_tokens >= 1")

    def train_config(self, base: TrainConfig) -> TrainConfig:
        """`train:` with this section's keys put in (TrainConfig checks them again, naming train.<key>)."""
        keys = ("optimizer", "max_steps", "batch_size", "lr", "min_lr_ratio", "warmup_steps", "schedule", "weight_decay",
                "eval_every", "eval_windows", "checkpoint_every", "seed")
        try:
            return dataclasses.replace(base, init_from=None, tokens_per_step=None, seq_len=self.seq_len or base.seq_len,
                                       **{k: getattr(self, k) for k in keys})
        except ConfigError as err:
            raise ConfigError(f"sft: {err}".replace("train.", "sft.")) from None


@dataclasses.dataclass
class SftResult:
    model: nn.Module  # the merged (plain) model, float32 on the CPU
    train: TrainResult
    before: dict[str, float]  # assistant-token val loss/accuracy of the parent
    after: dict[str, float]  # ... and of the fine-tuned model
    packing: dict[str, Any]  # per split: PackStats.to_dict()
    lora: dict[str, Any] | None  # parameter counts, optimizer state bytes, layers (None: full fine-tuning)
    adapters: dict[str, torch.Tensor] | None
    is_main: bool = True  # rank 0 (under torchrun only it writes outputs)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_sha256() -> str:
    """sha256 of the SFT code (this package and the chat format): a change makes old SFT checkpoints another run's."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")) + [Path(__file__).parent.parent / "chat.py"]:
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def load_split(data_dir: Path, split: str, template: ChatTemplate, seq_len: int,
               pad_id: int) -> PackedConversations:
    path = split_path(data_dir, split)
    windows, labels, stats = pack_conversations(read_conversations(path), template, seq_len, pad_id)
    if stats.windows == 0:
        raise ConfigError(f"{path}: no conversation with an assistant turn to train on (re-run the sft_data stage)")
    return PackedConversations(windows, labels, stats)


def score(model: nn.Module, windows: LabeledWindows, batch_size: int) -> dict[str, float]:
    """Assistant-token loss and accuracy in float32 on the model's device."""
    device = next(model.parameters()).device
    return labeled_validation(model, windows.to(device), Precision("fp32", device.type), batch_size)


def fine_tune(parent: ParentModel, tokenizer: Tokenizer, data_dir: Path, cfg: SftConfig, train_cfg: TrainConfig,
              checkpoint_dir: Path, live_dir: Path | None) -> SftResult:
    """Pack the SFT data, train the parent (or LoRA adapters on it) with assistant-only loss, merge."""
    if train_cfg.seq_len > parent.config.max_seq_len:
        raise ConfigError(f"sft.seq_len: {train_cfg.seq_len} exceeds the model's max_seq_len {parent.config.max_seq_len}")
    template = ChatTemplate(tokenizer)
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else template.start_id
    data = {split: load_split(data_dir, split, template, train_cfg.seq_len, pad_id) for split in ("train", "val")}
    seed_everything(train_cfg.seed)  # LoRA's A matrices are drawn at random
    model = parent.load()
    before = score(model, data["val"].all_windows(), train_cfg.batch_size)
    lora = None
    if cfg.lora.enabled:
        layers = apply_lora(model, cfg.lora)
        lora = {**parameter_counts(model), "layers": len(layers)}
    identity_inputs = {
        "parent": parent.record(), "tokenizer_sha256": tokenizer.sha256, "source_sha256": source_sha256(),
        "sft_train_sha256": file_sha256(split_path(data_dir, "train")),
        "sft_val_sha256": file_sha256(split_path(data_dir, "val")), "lora": to_dict(cfg.lora),
    }
    result, run = train(model, train_cfg, data["train"], data["val"], checkpoint_dir, parent.config.to_dict(),
                        identity_inputs, live_dir=live_dir)
    after = score(run.model, data["val"].all_windows(), train_cfg.batch_size)
    trained = run.model.float().cpu()
    adapters = None
    if lora is not None:
        lora["optimizer_state_bytes"] = optimizer_state_bytes(run.optimizer)
        adapters = {k: v.clone() for k, v in adapter_state_dict(trained).items()}
        merge_lora(trained)
    packing = {split: source.stats.to_dict() for split, source in data.items()}
    return SftResult(trained.eval(), result, before, after, packing, lora, adapters, run.info.is_main)


def write_chat_model(result: SftResult, parent: ParentModel, directory: Path, cfg: SftConfig,
                     train_cfg: TrainConfig, data_dir: Path) -> Path:
    """The chat model directory: merged weights (a plain model for every consumer), the parent's tokenizer,
    lineage naming the parent's weights hash, and with LoRA the adapter file beside the weights."""
    lineage = Lineage(
        tokenizer_sha256=Tokenizer.load(parent.directory / TOKENIZER_FILE).sha256,
        train_manifest_sha256=file_sha256(split_path(data_dir, "train")),
        val_manifest_sha256=file_sha256(split_path(data_dir, "val")),
        step=result.train.step, val_loss=result.after["loss"], tokens_seen=result.train.tokens_seen,
        seq_len=train_cfg.seq_len, checkpoint=result.train.last_checkpoint,
        best_checkpoint=result.train.best_checkpoint,
        params={"model": parent.config.to_dict(), "sft": to_dict(cfg), "train": to_dict(train_cfg)},
        extra={"parent": parent.record(), "kind": "chat", "val_accuracy": result.after["accuracy"],
               "lora": ({**to_dict(cfg.lora), "adapter": ADAPTER_FILE} if result.adapters is not None else None)},
    )

    def add_adapter(tmp: Path) -> None:
        if result.adapters is not None:
            save_adapter(result.adapters, tmp / ADAPTER_FILE, cfg.lora)

    return write_model_dir(result.model, directory, parent.directory / TOKENIZER_FILE, lineage, add_adapter)
