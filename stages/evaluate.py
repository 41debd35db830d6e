"""`evaluate` stage: the trained model on the validation shards → metrics/eval.json + metrics/samples.md,
and the train stage's curves as metrics/training.png (gpt.plots, matplotlib, offline).

Metrics: mean loss, perplexity, bits-per-byte (and the unigram baseline's, from train-split token frequencies),
token accuracy, decode throughput. Samples: params `evaluate.prompts`, fixed seed, so `git diff` shows changes.
"""

from __future__ import annotations

import json
import logging
import math

import torch

from gpt.atomic import write_text_atomic
from gpt.data.shards import TokenShards
from gpt.errors import run_main
from gpt.eval import (
    bits_per_byte,
    generate_samples,
    samples_markdown,
    score_windows,
    unigram_log_probs,
    unigram_nats,
)
from gpt.inference import prepare_for_inference
from gpt.model_dir import Lineage, load_model, read_lineage
from gpt.params import load_params
from gpt.plots import render_training_plot
from gpt.tokenizer import Tokenizer
from gpt.train.device import resolve_precision, select_device


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params()  # the whole file: a slip in any section fails here, before any work
    paths, cfg = params.paths, params.evaluate
    device = select_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    tokenizer = Tokenizer.load(paths.model)  # the copy beside the weights: the pair that was trained together
    model = load_model(paths.model, device=device)
    lineage = read_lineage(paths.model) or Lineage()
    val = TokenShards(paths.shards / "val", tokenizer_sha256=tokenizer.sha256, vocab_size=tokenizer.vocab_size)
    train = TokenShards(paths.shards / "train", tokenizer_sha256=tokenizer.sha256, vocab_size=tokenizer.vocab_size)
    trained_len = lineage.seq_len  # the training window: learned positions stop there
    seq_len = min(cfg.seq_len or trained_len or model.config.max_seq_len, model.config.max_seq_len)
    autocast = torch.bfloat16 if precision == "bf16" else None
    stats = score_windows(model, val.iter_windows(seq_len, cfg.max_windows), model.config.vocab_size,
                          cfg.batch_size, device, autocast)
    base_nats = unigram_nats(unigram_log_probs(train, model.config.vocab_size), stats.target_counts)
    prepare_for_inference(model)  # after scoring: decode kernels for the samples and the tokens/s metric
    samples, decode_tok_s = generate_samples(model, tokenizer, cfg.prompts, cfg, device)
    bpb = bits_per_byte(stats.nats, stats.tokens, val.num_tokens, val.num_bytes)
    unigram_bpb = bits_per_byte(base_nats, stats.tokens, val.num_tokens, val.num_bytes)
    metrics = {
        "val_loss": stats.mean_loss,
        "perplexity": math.exp(stats.mean_loss),
        "bits_per_byte": bpb,
        "unigram_bits_per_byte": unigram_bpb,
        "bpb_vs_unigram": bpb / unigram_bpb,
        "token_accuracy": stats.correct / stats.tokens,
        "tokens_scored": stats.tokens,
        "windows": stats.windows,
        "seq_len": seq_len,
        "decode_tokens_per_s": decode_tok_s,
        "model_step": lineage.step,
        "parameters": model.num_parameters(),
    }
    write_text_atomic(paths.metrics / "eval.json", json.dumps(metrics, indent=2) + "\n")
    header = f"step {lineage.step}, val bits-per-byte {bpb:.3f} (unigram {unigram_bpb:.3f})"
    write_text_atomic(paths.metrics / "samples.md", samples_markdown(samples, cfg, header))
    render_training_plot(paths.metrics / "train", paths.metrics / "training.png", paths.metrics / "eval.json")
    logging.info("evaluate: loss %.4f, ppl %.2f, %.3f bits/byte (unigram %.3f), accuracy %.3f, decode %.0f tok/s",
                 stats.mean_loss, metrics["perplexity"], bpb, unigram_bpb, metrics["token_accuracy"], decode_tok_s)


if __name__ == "__main__":
    run_main(main)
