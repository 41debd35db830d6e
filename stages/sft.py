"""`sft` stage: the pretrained model (paths.model) + SFT conversations (paths.sft_data) → the chat model.

    python -m stages.sft

Trains with the pretraining loop on packed conversations, loss on assistant tokens only (gpt/sft/train.py), full
weights or LoRA adapters (`sft.lora`). Outputs: paths.chat_model/ (merged weights + tokenizer + lineage naming the
parent's weights hash, + adapter.safetensors with LoRA), paths.metrics/sft/ (DVCLive curves: assistant-token val loss
and accuracy), paths.metrics/sft.json (before/after, packing, LoRA sizes), paths.metrics/sft_samples.md.
Checkpoints (resume state) go to paths.checkpoints/sft/; an interrupted run resumes like the train stage.
"""

from __future__ import annotations

import logging
import sys

from gpt.atomic import write_json_atomic, write_text_atomic
from gpt.chat import ChatTemplate
from gpt.errors import run_main
from gpt.params import load_params
from gpt.sft.chat_eval import conversation_samples
from gpt.sft.data import read_conversations, split_path
from gpt.sft.train import CHECKPOINT_SUBDIR, fine_tune, write_chat_model
from gpt.tokenizer import Tokenizer
from gpt.train.checkpoints import remove_leftovers
from gpt.train.init import parent_model
from gpt.train.loop import TrainingInterrupted


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params()
    paths, cfg = params.paths, params.sft
    parent = parent_model(paths.model, key="paths.model")
    tokenizer = Tokenizer.load(paths.model)
    train_cfg = cfg.train_config(params.train)
    remove_leftovers(paths.chat_model)
    try:
        result = fine_tune(parent, tokenizer, paths.sft_data, cfg, train_cfg, paths.checkpoints / CHECKPOINT_SUBDIR,
                           paths.metrics / "sft")
    except TrainingInterrupted as stop:
        print(f"sft: {stop}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    if not result.is_main:
        return
    write_chat_model(result, parent, paths.chat_model, cfg, train_cfg, paths.sft_data)
    samples = list(read_conversations(split_path(paths.sft_data, "val")))[:cfg.samples]
    write_text_atomic(paths.metrics / "sft_samples.md",
                      conversation_samples(result.model, ChatTemplate(tokenizer), samples, cfg.max_new_tokens))
    run = result.train
    write_json_atomic(paths.metrics / "sft.json", {
        "val": {"before": result.before, "after": result.after},
        "packing": result.packing,
        "lora": result.lora,
        "train": {"steps": run.step, "resumed_from": run.resumed_from, "seconds": round(run.train_seconds, 2),
                  "tokens_per_s": round(run.tokens_per_second)},
    })
    crop = result.packing["train"]["cropped_fraction"]
    print(f"sft: {run.step} steps, assistant-token val loss {result.before['loss']:.3f} → {result.after['loss']:.3f}, "
          f"accuracy {result.before['accuracy']:.3f} → {result.after['accuracy']:.3f}, "
          f"{run.tokens_per_second:,.0f} tok/s, cropped {crop:.2%} of train tokens → {paths.chat_model}")


if __name__ == "__main__":
    run_main(main)
