"""Evaluating a model as a chat model: held-out checkable tasks, and sample conversations.

`heldout_scores` runs two measurements on `heldout.jsonl` rows (tasks never trained on, gpt/sft/tasks.py):
- assistant-token loss and next-token accuracy of the reference answers (each conversation alone in its row, so no
  conversation sees another), through `gpt.train.step.labeled_validation` like the SFT validation;
- exact match: the model answers greedily (`gpt.generate.generate_chat`: `ChatTemplate.render_prompt`, stop at
  `<|end|>` or EOS) and `gpt.sft.tasks.check_answer` grades the text.
The `chat_eval` stage applies it to the pretrained and the chat model, so `dvc metrics diff` shows what SFT changed.
`conversation_samples` writes whole conversations answered by a model (metrics/sft_samples.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from gpt.chat import ChatTemplate
from gpt.generate import GenerationInputError, SamplingSpec, generate_chat
from gpt.sft.packing import pad_conversations
from gpt.sft.tasks import check_answer
from gpt.train.device import Precision
from gpt.train.step import labeled_validation


def select_items(rows: list[dict[str, Any]], max_items: int) -> list[dict[str, Any]]:
    """At most `max_items` rows taken round-robin across tasks (in file order within a task), so every task counts."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    queues = [by_task[task] for task in sorted(by_task)]
    chosen: list[dict[str, Any]] = []
    for depth in range(max((len(q) for q in queues), default=0)):
        chosen += [q[depth] for q in queues if depth < len(q)]
    return chosen[:max_items]


def greedy_reply(model: nn.Module, template: ChatTemplate, messages: list[Mapping[str, Any]],
                 max_new_tokens: int) -> str:
    return generate_chat(model, template, list(messages), SamplingSpec(max_new_tokens, temperature=0.0)).text


def _pad_id(template: ChatTemplate) -> int:
    pad = getattr(template.tokenizer, "pad_id", -1)
    return pad if isinstance(pad, int) and pad >= 0 else template.start_id


def heldout_scores(model: nn.Module, template: ChatTemplate, rows: list[dict[str, Any]],
                   max_new_tokens: int, batch_size: int = 32) -> dict[str, Any]:
    """{"assistant_loss", "assistant_token_accuracy", "exact_match", "items", "skipped_too_long",
    "per_task": {task: exact match}}. A row whose question and answer do not fit the model's context is skipped
    and counted (a small-context model with a small vocabulary can meet one)."""
    limit = int(model.config.max_seq_len) + 1  # a window of T + 1 tokens scores T positions
    references, kept = [], []
    for row in rows:
        reference = {"messages": [*row["messages"], {"role": "assistant", "content": row["answer"]}]}
        if len(template.render(reference["messages"])[0]) <= limit:
            references.append(reference)
            kept.append(row)
    skipped, rows = len(rows) - len(kept), kept
    if not rows:
        raise ValueError(f"no held-out item fits the model's context of {limit - 1} tokens")
    windows = pad_conversations(references, template, _pad_id(template))
    device = next(model.parameters()).device
    scores = labeled_validation(model, windows.to(device), Precision("fp32", device.type), batch_size)
    right, total = Counter(), Counter()
    for row in rows:
        reply = greedy_reply(model, template, row["messages"], max_new_tokens)
        total[row["task"]] += 1
        right[row["task"]] += check_answer(row["task"], reply, row["answer"])
    return {
        "assistant_loss": scores["loss"],
        "assistant_token_accuracy": scores["accuracy"],
        "exact_match": sum(right.values()) / max(1, len(rows)),
        "items": len(rows),
        "skipped_too_long": skipped,
        "per_task": {task: right[task] / total[task] for task in sorted(total)},
    }


def conversation_samples(model: nn.Module, template: ChatTemplate, conversations: Iterable[Mapping[str, Any]],
                         max_new_tokens: int) -> str:
    """Markdown: each conversation up to its last user turn, then the model's greedy reply and the reference."""
    parts = ["# SFT samples: validation conversations answered by the chat model (greedy)\n"]
    for n, row in enumerate(conversations, start=1):
        messages = list(row["messages"])
        prompt, reference = messages[:-1], messages[-1]["content"]
        try:
            reply = greedy_reply(model, template, prompt, max_new_tokens)
        except GenerationInputError as err:  # a prompt longer than the context
            reply = f"(not generated: {err})"
        parts.append(f"## {n}. `{row.get('id', n)}` ({row.get('source', '?')})\n")
        parts += [f"**{m['role']}:** {m['content']}\n" for m in prompt]
        parts.append(f"**assistant (chat model):** {reply}\n")
        parts.append(f"**assistant (reference):** {reference}\n")
    return "\n".join(parts)
