"""Issue 14's measured result as a test: RL with the configured `rl:` section beats the SFT model on held-out problems.

Uses the pipeline's own chat model (paths.chat_model, written by `make repro`, which CI runs before the slow suite)
and params.yaml's `rl:` section unchanged except the seed: GRPO on three seeds must each score above the chat model's
held-out exact match, and the mean gain must exceed twice the spread between seeds. ~1-3 min on 2 cores.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import pytest
import torch

from gpt.chat import ChatTemplate
from gpt.params import load_params
from gpt.rl.run import run_rl
from gpt.tokenizer import Tokenizer
from gpt.train.init import parent_model

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)


@pytest.mark.slow
def test_grpo_beats_the_sft_model_on_heldout_problems_over_three_seeds(monkeypatch):
    monkeypatch.chdir(ROOT)
    params = load_params(ROOT / "params.yaml")
    directory = ROOT / params.paths.chat_model
    if not (directory / "model.safetensors").is_file():
        pytest.skip(f"no chat model at {directory}: `make repro` builds it (CI runs it before the slow tests)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the rl stage (rollouts are too small to share between threads)
    try:
        parent = parent_model(directory)
        template = ChatTemplate(Tokenizer.load(parent.directory))
        results = [run_rl(parent.load(), template, dataclasses.replace(params.rl, algorithm="grpo", seed=seed),
                          params.sft_data.tasks.heldout_fraction, params.sft_data.salt) for seed in SEEDS]
    finally:
        torch.set_num_threads(threads)
    before = {r.before["exact_match"] for r in results}
    assert len(before) == 1  # the same held-out items and greedy decoding for every seed
    sft = before.pop()
    after = [r.after["exact_match"] for r in results]
    gain, spread = statistics.fmean(after) - sft, statistics.stdev(after)
    assert all(a > sft for a in after), (sft, after)
    assert gain > 2 * spread, (sft, after)
