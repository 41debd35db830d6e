"""The chat format: conversations ↔ token ids over the reserved special tokens, with the assistant-only loss mask.

A conversation renders as

    <eos> [<|system|> system text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> <|user|> ...

- It starts with EOS because that is where every pretraining document starts (the tokenize stage ends each document
  with EOS; gpt.generate uses EOS as the start of an empty prompt for the same reason).
- The role and end tokens are sentencepiece *control* symbols (gpt/tokenizer.py): inserted here by id, never produced
  by encoding text, so message content that spells "<|end|>" stays text and cannot forge a turn.
- Each message's content is encoded on its own (sentencepiece's dummy-prefix space included), so the ids of a turn
  do not depend on its neighbours: rendering a prefix of a conversation gives a prefix of the ids.
- `render` returns a loss mask that is 1 exactly on assistant content tokens and the `<|end|>` that closes them
  (the model must learn to stop), 0 elsewhere. `render_prompt` ends with `<|assistant|>`; generation stops at
  `<|end|>` (`stop_ids`).

Every consumer — SFT data packing, `gpt chat`, `/v1/chat/completions`, the web UI's chat mode, the HF export's chat
template (`to_jinja`) — goes through `ChatTemplate`, so there is one definition of the format.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from gpt.errors import GptError

ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
CHAT_TOKENS = (*ROLE_TOKENS.values(), END_TOKEN)
THINK_TOKENS = ("<think>", "</think>")  # an assistant reply may reason inside these before its answer (issue 14)


class ChatFormatError(GptError, ValueError):
    """A conversation that cannot be rendered. `reason` is a short code for counting skipped rows by reason."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str


def parse_messages(raw: Any, *, require_assistant_last: bool = False) -> list[Message]:
    """Validate an OpenAI/HF-style `[{"role", "content"}, ...]` list.

    Rules: a non-empty list of mappings; roles from ROLES; content a string; a system message only first; user and
    assistant alternate starting with user; assistant content not empty. Raises ChatFormatError with a reason
    code (unknown_role, bad_message, empty_assistant, bad_order, empty) naming the message index."""
    if not isinstance(raw, list) or not raw:
        raise ChatFormatError("messages: expected a non-empty list of {role, content}", "empty")
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not isinstance(item.get("content"), str) or "role" not in item:
            raise ChatFormatError(f"messages[{i}]: expected {{role, content}} with string content", "bad_message")
        role = item["role"]
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role: {role!r} is not one of {list(ROLES)}", "unknown_role")
        messages.append(Message(role, item["content"]))
    body = messages[1:] if messages[0].role == "system" else messages
    for i, message in enumerate(body, start=len(messages) - len(body)):
        expected = "user" if (i - (len(messages) - len(body))) % 2 == 0 else "assistant"
        if message.role != expected:
            raise ChatFormatError(f"messages[{i}].role: expected {expected!r} here (system first, then user and "
                                  f"assistant alternating), got {message.role!r}", "bad_order")
        if message.role == "assistant" and not message.content.strip():
            raise ChatFormatError(f"messages[{i}]: empty assistant message", "empty_assistant")
    if not body:
        raise ChatFormatError("messages: no user message", "empty")
    if require_assistant_last and body[-1].role != "assistant":
        raise ChatFormatError("messages: a training conversation must end with an assistant message",
                              "no_assistant")
    return messages


class ChatTemplate:
    """Render conversations for one tokenizer (ours or an HF one with the same special pieces)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        ids = {}
        for piece in CHAT_TOKENS:
            i = tokenizer.piece_to_id(piece) if hasattr(tokenizer, "piece_to_id") else -1
            if i is None or i < 0 or (hasattr(tokenizer, "id_to_piece") and tokenizer.id_to_piece(i) != piece):
                raise ChatFormatError(f"the tokenizer has no {piece!r} piece: chat needs a tokenizer trained with "
                                      f"tokenizer.special_tokens {list(CHAT_TOKENS)}", "no_chat_tokens")
            ids[piece] = i
        self.role_ids = {role: ids[tok] for role, tok in ROLE_TOKENS.items()}
        self.end_id = ids[END_TOKEN]
        self.start_id = tokenizer.eos_id if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 \
            else tokenizer.bos_id

    @property
    def stop_ids(self) -> list[int]:
        """Generation of an assistant turn ends at one of these."""
        return [self.end_id]

    def _turn(self, message: Message) -> tuple[list[int], list[int]]:
        content = self.tokenizer.encode(message.content)
        ids = [self.role_ids[message.role], *content, self.end_id]
        trained = 1 if message.role == "assistant" else 0
        return ids, [0] + [trained] * (len(content) + 1)  # the role token is given, content + <|end|> learned

    def render(self, messages: Iterable[Message | Mapping[str, Any]]) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a whole conversation; mask is 1 on assistant content and its closing <|end|>."""
        ids, mask = [self.start_id], [0]
        for message in _as_messages(messages):
            turn_ids, turn_mask = self._turn(message)
            ids += turn_ids
            mask += turn_mask
        return ids, mask

    def render_prompt(self, messages: Iterable[Message | Mapping[str, Any]]) -> list[int]:
        """Ids that ask for the next assistant turn: the conversation so far, then `<|assistant|>`."""
        ids, _ = self.render(messages)
        return ids + [self.role_ids["assistant"]]

    def to_jinja(self) -> str:
        """The same format as a Hugging Face chat template (tokenizer_config.json `chat_template`): with the
        exported tokenizer, `apply_chat_template(messages, add_generation_prompt=True)` gives `render_prompt`'s ids
        and `return_assistant_tokens_mask=True` gives `render`'s mask ({% generation %} marks what is learned).
        The pieces are written as literals so transformers' `sanitize_control_tokens` recognises them."""
        piece = {name: json.dumps(self.tokenizer.id_to_piece(i)) for name, i in
                 (("start", self.start_id), ("end", self.end_id), *self.role_ids.items())}
        turns = "".join(
            f"{{%- {'if' if i == 0 else 'elif'} message['role'] == '{role}' -%}}{{{{- {piece[role]} -}}}}"
            + ("{%- generation -%}{{- message['content'] + " + piece["end"] + " -}}{%- endgeneration -%}"
               if role == "assistant" else "{{- message['content'] + " + piece["end"] + " -}}")
            for i, role in enumerate(ROLES))
        return ("{{- " + piece["start"] + " -}}{%- for message in messages -%}" + turns
                + "{%- else -%}{{- raise_exception('unknown role: ' + message['role']) -}}{%- endif -%}"
                + "{%- endfor -%}{%- if add_generation_prompt -%}{{- " + piece["assistant"] + " -}}{%- endif -%}")


def _as_messages(messages: Iterable[Message | Mapping[str, Any]]) -> list[Message]:
    return [m if isinstance(m, Message) else Message(str(m["role"]), str(m["content"])) for m in messages]


@dataclasses.dataclass
class ReplyParts:
    """An assistant reply's ids split at its `<think>…</think>` block (control symbols: they decode to "")."""

    thinking: list[int]  # inside the block (empty without one)
    answer: list[int]  # after `</think>`, or the whole reply without a block
    well_formed: bool  # no block, or exactly one `<think>` at the start closed by one `</think>`


def think_ids(tokenizer: Any) -> tuple[int, int] | None:
    """(`<think>` id, `</think>` id), or None for a tokenizer trained without them (older models)."""
    if not hasattr(tokenizer, "piece_to_id"):
        return None
    ids = tuple(tokenizer.piece_to_id(p) for p in THINK_TOKENS)
    if any(i is None or i < 0 or (hasattr(tokenizer, "id_to_piece") and tokenizer.id_to_piece(i) != p)
           for i, p in zip(ids, THINK_TOKENS)):
        return None
    return ids  # type: ignore[return-value]


def split_reply(ids: Iterable[int], think: tuple[int, int] | None) -> ReplyParts:
    """Split a reply (without its closing `<|end|>`) into thinking and answer ids."""
    ids = list(ids)
    if think is None:
        return ReplyParts([], ids, True)
    open_id, close_id = think
    opens, closes = ids.count(open_id), ids.count(close_id)
    if opens == 0 and closes == 0:
        return ReplyParts([], ids, True)
    if close_id not in ids:  # an unclosed block: all thinking, no answer
        start = ids.index(open_id) + 1
        return ReplyParts(ids[start:], [], False)
    end = ids.index(close_id)
    start = ids.index(open_id) + 1 if open_id in ids[:end] else 0
    well_formed = opens == 1 and closes == 1 and ids[0] == open_id
    return ReplyParts(ids[start:end], ids[end + 1:], well_formed)
