"""A small pipeline workspace for the init_from and SFT tests: a tokenizer with the chat tokens, token shards, a
params.yaml for a tiny model, and a tiny SFT data directory (train/val/heldout JSONL in the sft-data contract)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from gpt.data.shards import ShardWriter
from gpt.tokenizer import TokenizerConfig, train_tokenizer
from tests.project_params import deep_merge
from tests.project_params import write_params as write_project_params

PARAMS: dict[str, Any] = {
    "paths": {"tokenizer": "data/tokenizer", "shards": "data/shards", "checkpoints": "data/checkpoints",
              "model": "data/model", "metrics": "metrics", "sft_data": "data/sft", "chat_model": "data/chat-model"},
    "model": {"preset": "tiny", "vocab_size": None, "d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
    "train": {"max_steps": 30, "batch_size": 8, "seq_len": 64, "lr": 1.0e-2, "warmup_steps": 5,
              "eval_every": 10, "eval_windows": 8, "checkpoint_every": 10, "precision": "fp32", "device": "cpu",
              "progress": False, "log_every": 1},
    "sft": {"max_steps": 40, "batch_size": 8, "lr": 3.0e-3, "warmup_steps": 4, "eval_every": 20, "eval_windows": 16,
            "checkpoint_every": 20, "samples": 2, "max_new_tokens": 8,
            "eval": {"max_items": 10, "max_new_tokens": 8}},
}
WORDS = "apple river stone cloud green music table window garden yellow paper water light house bread".split()


def topic_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)][:80]


def build_workspace(root: Path) -> Path:
    """Tokenizer (400 pieces + chat tokens) and train/val shards under root/data."""
    texts = topic_texts()
    tok = train_tokenizer((line for t in texts for line in t.splitlines() if line.strip()),
                          TokenizerConfig(vocab_size=400), root / "data/tokenizer")
    for split, docs in (("train", texts[:70]), ("val", texts[70:])):
        writer = ShardWriter(root / "data/shards" / split, split, tok.vocab_size, tok.sha256, shard_tokens=20000)
        for doc in docs:
            writer.add_document(tok.encode(doc, add_eos=True), len(doc.encode("utf-8")))
        writer.close()
    write_sft_data(root / "data/sft")
    return root


def write_params(root: Path, overrides: dict[str, Any] | None = None) -> Path:
    return write_project_params(root, deep_merge(PARAMS, overrides or {}))


def _conversation(rng: random.Random, i: int) -> dict[str, Any]:
    word = rng.choice(WORDS)
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    user, answer = (f"Repeat the word {word}.", word) if i % 2 else (f"What is {a} + {b}?", str(a + b))
    return {"id": f"c{i:04d}", "source": "fixture",
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_sft_data(directory: Path, train: int = 240, val: int = 24) -> Path:
    """Tiny SFT data: 'Repeat the word X.' → X and 'What is a + b?' → the sum; held-out additions."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    rows = [_conversation(rng, i) for i in range(train + val)]
    for name, part in (("train.jsonl", rows[:train]), ("val.jsonl", rows[train:])):
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    heldout = [{"id": f"h{i}", "task": "add", "messages": [{"role": "user", "content": f"What is {i} + 1?"}],
                "answer": str(i + 1)} for i in range(10, 20)]  # never a training sum
    (directory / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout), encoding="utf-8")
    return directory
