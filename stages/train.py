"""`train` stage: params (model, train) + tokenizer + shards → checkpoints, the trained model, training curves.

    python -m stages.train                              # one process (CPU or one GPU)
    torchrun --nproc_per_node=2 -m stages.train         # DDP: gloo on CPU, NCCL on GPUs

With `train.init_from: <model dir>` training continues from that model (its weights, config and tokenizer;
the lineage records its weights' sha256) instead of a random initialisation.
Re-running after an interruption resumes from the latest checkpoint in paths.checkpoints (gpt/train/resume.py);
Ctrl-C or SIGTERM saves a checkpoint at the current step first. paths.checkpoints is resume state, not a DVC output.
Outputs: paths.model/ (what evaluate, the CLI and the server load),
paths.metrics/train/ (DVCLive curves + metrics.json).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from gpt.config import ConfigError, PathsConfig, to_dict
from gpt.data.shards import TokenShards
from gpt.errors import run_main
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.model_dir import Lineage, write_model_dir
from gpt.params import ModelParams, load_params
from gpt.tokenizer import TOKENIZER_FILE, Tokenizer
from gpt.train.checkpoints import remove_leftovers
from gpt.train.config import TrainConfig
from gpt.train.device import seed_everything
from gpt.train.distributed import shutdown
from gpt.train.init import check_parent_tokenizer, parent_model, parent_model_config
from gpt.train.loop import TrainingInterrupted, train


def resolve_model_config(model_params: ModelParams, tokenizer: Tokenizer, cfg: TrainConfig) -> ModelConfig:
    """The model config for this tokenizer; vocab_size null = the tokenizer's, smaller is an error."""
    config = model_params.resolve(tokenizer.vocab_size)
    if config.vocab_size < tokenizer.vocab_size:  # resolve checks too; keep the promise here
        raise ConfigError(f"model.vocab_size: {config.vocab_size} < tokenizer vocab {tokenizer.vocab_size}")
    if cfg.seq_len > config.max_seq_len:
        raise ConfigError(f"train.seq_len: {cfg.seq_len} exceeds model.max_seq_len {config.max_seq_len}")
    return config


def load_data(paths: PathsConfig, tokenizer: Tokenizer) -> tuple[TokenShards, TokenShards]:
    return tuple(TokenShards(paths.shards / split, tokenizer_sha256=tokenizer.sha256,
                             vocab_size=tokenizer.vocab_size) for split in ("train", "val"))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params()  # the whole file: a slip in any section (evaluate too) fails before training
    paths, cfg = params.paths, params.train
    tokenizer = Tokenizer.load(paths.tokenizer)
    parent = parent_model(cfg.init_from) if cfg.init_from else None  # continue from a model (gpt/train/init.py)
    if parent is not None:
        check_parent_tokenizer(parent, tokenizer)
        model_config = parent_model_config(parent, params.model.to_section(), tokenizer.vocab_size, cfg.seq_len)
    else:
        model_config = resolve_model_config(params.model, tokenizer, cfg)
    train_data, val_data = load_data(paths, tokenizer)
    lineage = {"tokenizer_sha256": tokenizer.sha256, "train_manifest_sha256": train_data.manifest_sha256,
               "val_manifest_sha256": val_data.manifest_sha256}
    extra = {"init_from": parent.record()} if parent is not None else {}
    remove_leftovers(paths.model)  # temp dirs of an export killed mid-write
    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = parent.load() if parent is not None else DecoderOnlyTransformer(model_config)
    try:
        result, run = train(model, cfg, train_data, val_data, paths.checkpoints, model_config.to_dict(),
                            {**lineage, **extra}, live_dir=paths.metrics / "train", tokenizer_dir=paths.tokenizer)
    except TrainingInterrupted as stop:  # Ctrl-C / SIGTERM: saved at the current step; one line, 128 + signal
        print(f"train: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    try:
        if run.info.is_main:
            write_model_dir(run.model.float(), paths.model, Path(paths.tokenizer) / TOKENIZER_FILE, Lineage(
                **lineage, step=result.step, val_loss=result.val_loss, tokens_seen=result.tokens_seen,
                seq_len=cfg.seq_len, checkpoint=result.last_checkpoint, best_checkpoint=result.best_checkpoint,
                params={"model": model_config.to_dict(), "train": to_dict(params.train)}, extra=extra,
            ))
            logging.info("train: step %d, val loss %.4f, %.0f tok/s, MFU %.1f%% → %s", result.step,
                         result.val_loss, result.tokens_per_second, 100 * result.mfu, paths.model)
    finally:
        shutdown(run.info)


if __name__ == "__main__":
    run_main(main)
