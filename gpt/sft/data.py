"""The SFT data directory (`paths.sft_data`) and the conversation files users bring: read, validate, write.

The directory holds three JSONL files, one JSON object per line, sorted by id:

    train.jsonl, val.jsonl   {"id": str, "source": str, "messages": [{"role", "content"}, ...]}
    heldout.jsonl            {"id": str, "task": str, "messages": [{"role", "content"}, ...], "answer": str}

Conversations in train/val are already validated (`gpt.chat.parse_messages(require_assistant_last=True)`), so the
SFT stage reads them with `read_conversations` and renders them with `gpt.chat.ChatTemplate` without checking
again. Held-out rows end with the user's turn; `gpt.sft.tasks.check_answer` grades a completion of them.

Input formats a user's file may use, detected per row (or forced with the source's `format`):

- OpenAI / Hugging Face messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
- Alpaca: `{"instruction": str, "input": str (optional), "output": str, "system": str (optional)}` → one user turn
  (instruction, then a blank line and the input when there is one) answered by `output`.

Files are `.jsonl` (one row a line) or `.json` (one array of rows). A row that cannot be used is skipped and counted
by reason (`bad_json`, `not_utf8`, `not_an_object`, `unknown_format`, the `gpt.chat` reasons `unknown_role`,
`bad_message`, `bad_order`, `empty_assistant`, `no_assistant`, `empty`, and `empty_user`, `too_long`, `duplicate`).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gpt.atomic import write_text_atomic
from gpt.chat import ChatFormatError, parse_messages
from gpt.errors import GptError

TRAIN_FILE = "train.jsonl"
VAL_FILE = "val.jsonl"
HELDOUT_FILE = "heldout.jsonl"
SPLIT_FILES = {"train": TRAIN_FILE, "val": VAL_FILE}
FORMATS = ("auto", "messages", "alpaca")


class SftDataError(GptError, ValueError):
    """An SFT data file or source is missing, unreadable or gave no usable conversation."""


class RowError(ValueError):
    """One input row that cannot become a training conversation; `reason` is the count key."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------------------
# reading the stage's output (what the SFT stage and the chat evaluation call)

def _read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise SftDataError(f"SFT data file not found: {path} (run the sft_data stage: dvc repro sft_data)")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SftDataError(f"{path}:{number}: not valid JSON ({err.msg}); rerun the sft_data stage") from err
            yield row


def read_conversations(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of train.jsonl / val.jsonl: {"id", "source", "messages": [{"role", "content"}, ...]}."""
    yield from _read_jsonl(path)


def read_heldout(path: str | Path) -> list[dict[str, Any]]:
    """Rows of heldout.jsonl: {"id", "task", "messages" (ending with the user's turn), "answer"}."""
    return list(_read_jsonl(path))


def split_path(directory: str | Path, split: str) -> Path:
    """`paths.sft_data`/train.jsonl or val.jsonl."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {sorted(SPLIT_FILES)}, got {split!r}")
    return Path(directory) / SPLIT_FILES[split]


# ---------------------------------------------------------------------------------------------------------------
# ids, splits and writing

def conversation_id(messages: Iterable[dict[str, str]]) -> str:
    """Content hash of a conversation (roles and texts), so the same conversation always gets the same id."""
    canonical = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def hash_fraction(text: str, salt: str) -> float:
    """A stable number in [0, 1) drawn from `salt:text` (splits and held-out membership use it)."""
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(conversation_id_: str, val_fraction: float, salt: str) -> str:
    """"val" for a fixed fraction of conversations, decided by the id alone: adding rows never moves old ones."""
    return "val" if hash_fraction(conversation_id_, salt) < val_fraction else "train"


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """One compact JSON object per line (keys sorted, UTF-8 kept), written atomically."""
    lines = [json.dumps(row, ensure_ascii=False, sort_keys=True, separators=(",", ":")) for row in rows]
    return write_text_atomic(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------------------------
# user files: OpenAI/HF messages and Alpaca rows

def row_messages(row: Any, fmt: str = "auto") -> list[dict[str, str]]:
    """One input row → validated messages ending with an assistant turn; RowError(reason) when it cannot be used."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}", "not_an_object")
    if fmt == "auto":
        fmt = "messages" if "messages" in row else "alpaca" if "instruction" in row and "output" in row else ""
    if fmt == "messages":
        raw = row.get("messages")
    elif fmt == "alpaca":
        raw = _alpaca_messages(row)
    else:
        raise RowError(f"neither a {{messages}} row nor an {{instruction, output}} row; keys {sorted(row)}",
                       "unknown_format")
    try:
        messages = parse_messages(raw, require_assistant_last=True)
    except ChatFormatError as err:
        raise RowError(str(err), err.reason) from err
    if any(m.role == "user" and not m.content.strip() for m in messages):
        raise RowError("a user message is empty", "empty_user")
    return [{"role": m.role, "content": m.content} for m in messages]


def _alpaca_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    fields = {k: row.get(k, "") for k in ("instruction", "input", "output", "system")}
    for key, value in fields.items():
        if value is None:
            fields[key] = ""
        elif not isinstance(value, str):
            raise RowError(f"alpaca field {key!r} must be a string, got {type(value).__name__}", "bad_message")
    instruction, extra = fields["instruction"].strip(), fields["input"].strip()
    user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    messages = [{"role": "system", "content": fields["system"]}] if fields["system"].strip() else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]


def iter_file_rows(path: Path, skipped: Counter) -> Iterator[Any]:
    """Decoded JSON values of a .jsonl file (or of a .json array); undecodable lines counted in `skipped`."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            skipped["not_utf8"] += 1
            return
        except json.JSONDecodeError:
            skipped["bad_json"] += 1
            return
        yield from (data if isinstance(data, list) else [data])
        return
    with open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                yield json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                skipped["not_utf8"] += 1
            except json.JSONDecodeError:
                skipped["bad_json"] += 1


def read_conversation_file(path: Path, fmt: str, max_chars: int, skipped: Counter) -> Iterator[list[dict[str, str]]]:
    """Validated conversations of one user file; every unusable row counted by reason in `skipped`.

    A conversation whose messages hold more than `max_chars` characters is skipped (`too_long`), not cropped:
    cropping would cut the assistant's answer, the part the model learns from."""
    for row in iter_file_rows(path, skipped):
        try:
            messages = row_messages(row, fmt)
        except RowError as err:
            skipped[err.reason] += 1
            continue
        if sum(len(m["content"]) for m in messages) > max_chars:
            skipped["too_long"] += 1
            continue
        yield messages
