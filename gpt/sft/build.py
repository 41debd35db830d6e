"""The `sft_data` stage's work: the user's conversation files + docstring Q&A + generated tasks → `paths.sft_data`.

Everything is deterministic in the params (seeded generators, sorted file lists, ids that are content hashes,
files sorted by id), so the same params and inputs give byte-identical files. Conversations split into train/val
by a hash of their id (`gpt.sft.data.assign_split`); held-out task problems are decided by a hash of the problem
(`gpt.sft.tasks.is_heldout`) and never reach train/val in any phrasing.
"""

from __future__ import annotations

import glob as globlib
import random
from collections import Counter
from pathlib import Path
from typing import Any

from gpt.atomic import atomic_directory, remove_stale_temps
from gpt.data.corpus import read_corpus
from gpt.sft import docqa
from gpt.sft.config import ConversationSource, SftDataConfig
from gpt.sft.data import (
    HELDOUT_FILE,
    SPLIT_FILES,
    SftDataError,
    assign_split,
    conversation_id,
    hash_fraction,
    read_conversation_file,
    write_jsonl_atomic,
)
from gpt.sft.tasks import iter_problems

Conversation = tuple[str, list[dict[str, str]]]  # (source, messages)

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are an assistant that knows the Python standard library.",
)


def source_files(source: ConversationSource, conversations_dir: Path) -> list[Path]:
    """The files a source's glob names (relative to `conversations_dir` unless absolute), sorted."""
    pattern = source.glob if Path(source.glob).is_absolute() else str(conversations_dir / source.glob)
    return sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).is_file())


def read_user_sources(cfg: SftDataConfig, conversations_dir: Path, skipped: Counter) -> list[Conversation]:
    """Every configured source's valid conversations; a source that yields none fails, naming it."""
    conversations: list[Conversation] = []
    for i, source in enumerate(cfg.sources):
        what = f"sft_data.sources[{i}] ({source.glob!r} under {conversations_dir})"
        files = source_files(source, conversations_dir)
        if not files:
            raise SftDataError(f"{what}: no file matched; put .jsonl/.json conversation files there or fix the glob")
        found, problems = 0, Counter()
        for path in files:
            label = path.relative_to(conversations_dir) if path.is_relative_to(conversations_dir) else path
            for messages in read_conversation_file(path, source.format, cfg.max_chars, problems):
                conversations.append((f"file:{label}", messages))
                found += 1
        skipped.update(problems)
        if not found:
            raise SftDataError(f"{what}: {len(files)} file(s) but no usable conversation; skipped by reason "
                               f"{dict(sorted(problems.items()))} (rows must be {{messages: [...]}} or "
                               f"{{instruction, input, output}} and end with an assistant turn)")
    return conversations


def docqa_conversations(cfg: SftDataConfig, cleaned_dir: Path, counts: Counter) -> list[Conversation]:
    """Questions about the train split's documented names, at most `docqa.max_items`, chosen by a seeded hash."""
    entries: dict[str, tuple[docqa.DocEntry, str]] = {}
    for batch in read_corpus(cleaned_dir, split="train", columns=["text", "source"]):
        for text, source in zip(batch.column("text").to_pylist(), batch.column("source").to_pylist(), strict=True):
            module = docqa.module_of(source)
            if module is None:
                continue
            for entry in docqa.doc_entries(text, module):
                if not docqa.is_public(entry.name) or entry.name in entries:
                    continue
                answer = docqa.summary(entry.doc, cfg.docqa.max_answer_chars)
                if answer is None:
                    counts["docqa_no_summary"] += 1
                    continue
                entries[entry.name] = (entry, answer)
    counts["docqa_candidates"] = len(entries)
    chosen = sorted(entries, key=lambda name: hash_fraction(name, f"docqa:{cfg.seed}"))[: cfg.docqa.max_items]
    conversations = []
    for name in sorted(chosen):
        entry, answer = entries[name]
        choice = int(hash_fraction(name, f"question:{cfg.seed}") * 1000)
        conversations.append(("docqa", [{"role": "user", "content": docqa.question(entry, choice)},
                                        {"role": "assistant", "content": answer}]))
    return conversations


def task_conversations(cfg: SftDataConfig) -> list[Conversation]:
    t = cfg.tasks
    problems = iter_problems(t.names, t.per_task, cfg.seed, heldout=False, heldout_fraction=t.heldout_fraction,
                             salt=cfg.salt)
    return [(f"task:{p.task}", [{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.answer}])
            for p in problems]


def heldout_rows(cfg: SftDataConfig) -> list[dict[str, Any]]:
    t = cfg.tasks
    rows = []
    for p in iter_problems(t.names, t.heldout_per_task, cfg.seed, heldout=True, heldout_fraction=t.heldout_fraction,
                           salt=cfg.salt):
        messages = [{"role": "user", "content": p.prompt}]
        rows.append({"id": conversation_id(messages), "task": p.task, "messages": messages, "answer": p.answer})
    return sorted(rows, key=lambda row: row["id"])


def vary(conversations: list[Conversation], cfg: SftDataConfig) -> list[Conversation]:
    """Seeded: a fraction of the generated exchanges join the next one as a second turn; a fraction get a system
    message. So the model also sees multi-turn and system-prompted chats, as `gpt chat` will show it."""
    rng = random.Random(f"vary:{cfg.seed}")
    order = list(conversations)
    rng.shuffle(order)
    varied: list[Conversation] = []
    i = 0
    while i < len(order):
        source, messages = order[i]
        if i + 1 < len(order) and rng.random() < cfg.multi_turn_fraction:
            messages = messages + order[i + 1][1]
            i += 1
        if rng.random() < cfg.system_fraction:
            messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
        varied.append((source, messages))
        i += 1
    return varied


def build_sft_data(cfg: SftDataConfig, cleaned_dir: Path, conversations_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write train.jsonl, val.jsonl and heldout.jsonl into `out_dir` (atomically, as one directory); return metrics."""
    skipped, counts = Counter(), Counter()
    user = read_user_sources(cfg, conversations_dir, skipped)
    generated = docqa_conversations(cfg, cleaned_dir, counts) if cfg.docqa.enabled else []
    generated += task_conversations(cfg)
    splits: dict[str, dict[str, dict[str, Any]]] = {"train": {}, "val": {}}
    by_source: Counter = Counter()
    multi_turn = 0
    for source, messages in user + vary(generated, cfg):
        if not source.startswith("file:") and sum(len(m["content"]) for m in messages) > cfg.max_chars:
            skipped["too_long"] += 1
            continue
        conv_id = conversation_id(messages)
        split = assign_split(conv_id, cfg.val_fraction, cfg.salt)
        if conv_id in splits[split]:
            skipped["duplicate"] += 1
            continue
        splits[split][conv_id] = {"id": conv_id, "source": source, "messages": messages}
        by_source[source] += 1
        multi_turn += sum(m["role"] == "user" for m in messages) > 1
    heldout = heldout_rows(cfg)
    remove_stale_temps(out_dir.parent, out_dir.name)
    with atomic_directory(out_dir) as tmp:
        for split, rows in splits.items():
            write_jsonl_atomic(tmp / SPLIT_FILES[split], [rows[k] for k in sorted(rows)])
        write_jsonl_atomic(tmp / HELDOUT_FILE, heldout)
    return {
        "conversations": {split: len(rows) for split, rows in splits.items()},
        "heldout": len(heldout),
        "heldout_by_task": dict(sorted(Counter(row["task"] for row in heldout).items())),
        "by_source": dict(sorted(by_source.items())),
        "multi_turn": multi_turn,
        "with_system": sum(rows[k]["messages"][0]["role"] == "system" for rows in splits.values() for k in rows),
        "docqa_candidates": counts["docqa_candidates"],
        "docqa_no_summary": counts["docqa_no_summary"],
        "skipped": dict(sorted(skipped.items())),
        "too_long_policy": "skip",
        "max_chars": cfg.max_chars,
    }
