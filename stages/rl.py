"""`rl` stage: the chat model (paths.chat_model) → RL with verifiable rewards on checkable tasks → paths.rl_model.

    python -m stages.rl

GRPO or PPO (`rl.algorithm`) on training-side problems of `rl.tasks` (gpt/rl/run.py). Outputs: paths.rl_model/
(weights + tokenizer + lineage naming the parent's weights hash), paths.metrics/rl/ (DVCLive per step: reward,
correctness, format rate, KL, entropy, completion length, clip fraction, held-out exact match),
paths.metrics/rl.json (held-out exact match before vs after), paths.metrics/rl_samples.md.
"""

from __future__ import annotations

import logging

import torch

from gpt.atomic import write_json_atomic, write_text_atomic
from gpt.chat import ChatTemplate
from gpt.config import to_dict
from gpt.errors import run_main
from gpt.model_dir import TOKENIZER_FILE, Lineage, write_model_dir
from gpt.params import load_params
from gpt.rl.run import run_rl, samples_markdown
from gpt.tokenizer import Tokenizer
from gpt.train.init import parent_model
from gpt.train.metrics import TrainLogger


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params()
    # Rollouts decode a few dozen rows one token at a time: tensors too small to share between threads. Measured on
    # this 2-core box: 13 s with one thread against 96 s with two (OpenMP threads waiting on each other).
    torch.set_num_threads(1)
    paths, cfg, split = params.paths, params.rl, params.sft_data
    parent = parent_model(paths.chat_model, key="paths.chat_model")
    tokenizer = Tokenizer.load(parent.directory)
    template = ChatTemplate(tokenizer)
    logger = TrainLogger(paths.metrics / "rl")
    try:
        result = run_rl(parent.load(), template, cfg, split.tasks.heldout_fraction, split.salt, logger.log)
        logger.summary({"heldout_exact_match_before": result.before["exact_match"],
                        "heldout_exact_match_after": result.after["exact_match"]})
    finally:
        logger.close()
    last = result.history[-1]
    lineage = Lineage(tokenizer_sha256=tokenizer.sha256, step=cfg.steps,
                      params={"model": parent.config.to_dict(), "rl": to_dict(cfg)},
                      extra={"parent": parent.record(), "kind": "rl",
                             "heldout_exact_match": result.after["exact_match"]})
    write_model_dir(result.model, paths.rl_model, parent.directory / TOKENIZER_FILE, lineage)
    write_text_atomic(paths.metrics / "rl_samples.md", samples_markdown(result.samples))
    mean = {k: sum(h[k] for h in result.history) / len(result.history)
            for k in ("reward", "correct", "format_rate", "completion_length")}
    write_json_atomic(paths.metrics / "rl.json", {
        "heldout": {"before": result.before, "after": result.after},
        "evals": [{"step": e["step"], "exact_match": e["exact_match"]} for e in result.evals],
        "train": {"algorithm": cfg.algorithm, "steps": cfg.steps, "seconds": round(result.seconds, 2),
                  "mean": mean, "last": {k: last[k] for k in ("reward", "correct", "format_rate")}},
    })
    print(f"rl: {cfg.algorithm} {cfg.steps} steps in {result.seconds:.1f} s, reward {result.history[0]['reward']:.3f}"
          f" → {last['reward']:.3f}, held-out exact match {result.before['exact_match']:.3f} → "
          f"{result.after['exact_match']:.3f} → {paths.rl_model}")


if __name__ == "__main__":
    run_main(main)
