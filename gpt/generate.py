"""The one generation front door: prompt text → token ids → KV-cached sampling → streamed text.

Everything that turns a prompt into text goes through here — `gpt generate` (gpt/cli.py), the server
(gpt/serve/app.py, which adds only queueing and HTTP) and evaluation samples (gpt/eval.py) — so they agree on:

- which sampling values are valid: `SamplingSpec` is the only place they are checked. A bad value raises
  `GenerationInputError` whose `field` names it; each caller spells the field its own way in the one-line message
  (`--top-p` on the command line, `top_p` in the API, `evaluate.top_p` in params.yaml);
- how a prompt becomes token ids: `encode_prompt` (an empty prompt starts from `start_token_id`, a prompt longer
  than the context keeps its last tokens, text that is not valid Unicode is refused);
- how token ids become text: `TextStream` decodes incrementally and emits only *stable* text — it holds back an
  incomplete UTF-8 character (byte-fallback pieces decode to U+FFFD until its last byte arrives) and a tail that
  could still grow into a stop string, and cuts exactly at the first stop string;
- the stream itself: `stream_completion` drives `model.stream` (gpt/model/generation.py: prefill once, then one
  cached step per token) and yields `Delta`s (text, completion tokens so far, and on the last one the finish
  reason "stop" | "length" | "cancelled"); `generate_text` collects one whole `Completion`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from gpt.errors import GptError

REPLACEMENT_CHAR = "\ufffd"
SEED_LIMIT = 2**63  # seeds are signed 64-bit integers everywhere they travel (torch, JSON clients, numpy)
# Below this a temperature is greedy in all but name, and far below it float32 logits / temperature overflow to
# inf and sampling fails; 0 is the way to ask for greedy decoding.
MIN_TEMPERATURE = 1e-6
FINISH_REASONS = ("stop", "length", "cancelled")


class GenerationInputError(GptError, ValueError):
    """A sampling value or a prompt that generation cannot use. `field` names it (`temperature`, `top_k`, `top_p`,
    `max_new_tokens`, `seed`, `stop`, `prompt`), `reason` says what is wrong; callers re-spell the field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """How to sample one completion; checked on construction. temperature 0 = greedy (top_k/top_p are unused)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None  # sample from the k most likely tokens
    top_p: float | None = None  # nucleus sampling: the smallest set of tokens holding this much probability
    seed: int | None = None  # None = seeded from the clock
    stop: tuple[str, ...] = ()  # the completion ends before the first of these strings

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise GenerationInputError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if not _is_number(t) or t < 0:
            raise GenerationInputError("temperature", f"must be >= 0 (0 = greedy), got {t!r}")
        if 0 < t < MIN_TEMPERATURE:
            raise GenerationInputError("temperature", f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {t!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise GenerationInputError("top_k", f"must be >= 1 (or unset), got {self.top_k!r}")
        if self.top_p is not None and (not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0):
            raise GenerationInputError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < SEED_LIMIT):
            raise GenerationInputError("seed", f"must be an integer in 0..2^63-1, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) for s in stop):
            raise GenerationInputError("stop", f"stop strings must be strings, got {list(stop)!r}")
        if any(not s for s in stop):
            raise GenerationInputError("stop", "stop strings must be non-empty")
        object.__setattr__(self, "stop", stop)

    def model_kwargs(self) -> dict[str, Any]:
        """The sampling arguments of `model.stream` / `model.generate`."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p}


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded from `seed` (from the clock when None)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else time.time_ns() % SEED_LIMIT)
    return gen


# ---------------------------------------------------------------- prompt → token ids
def start_token_id(tokenizer: Any) -> int:
    """The token an empty prompt starts from: EOS (BOS only for a tokenizer without EOS).

    Why EOS and not BOS: the tokenize stage ends every document with EOS and never writes BOS
    (gpt/data/tokenize.py), so during training "a new document begins" is always the position after an EOS, while
    BOS never occurs and its embedding is untrained. Starting from EOS asks the model exactly what it learned: the
    first tokens of a document. (GPT-2-style tokenizers imported from Hugging Face have BOS = EOS anyway.)
    """
    for token_id in (getattr(tokenizer, "eos_id", -1), getattr(tokenizer, "bos_id", -1)):
        if isinstance(token_id, int) and token_id >= 0:
            return token_id
    raise GenerationInputError("prompt", "is empty and the tokenizer has neither an EOS nor a BOS token to start "
                                         "from; give some text")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt as the model sees it: `ids` fit the context with room for a new token; `num_dropped` leading
    tokens were cut to get there (callers that refuse long prompts check it)."""

    ids: list[int]
    num_dropped: int = 0

    @property
    def num_tokens(self) -> int:
        """The prompt's length before any truncation."""
        return len(self.ids) + self.num_dropped


def encode_prompt(tokenizer: Any, text: str, max_seq_len: int) -> Prompt:
    """Prompt text → token ids: empty → [start_token_id]; over `max_seq_len - 1` tokens → the last ones."""
    if not isinstance(text, str):
        raise GenerationInputError("prompt", f"must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates: JSON "\ud800", or undecodable bytes in argv
        bad = text[err.start]
        raise GenerationInputError(
            "prompt", f"is not valid Unicode text (lone surrogate U+{ord(bad):04X} at character {err.start})"
        ) from None
    ids = list(tokenizer.encode(text)) or [start_token_id(tokenizer)]
    keep = max(1, max_seq_len - 1)
    if len(ids) > keep:
        return Prompt(ids[-keep:], len(ids) - keep)
    return Prompt(ids)


# ---------------------------------------------------------------- token ids → text
@dataclasses.dataclass
class Delta:
    """A piece of streamed output. `finish_reason` ("stop" | "length" | "cancelled") is set on the last one."""

    text: str
    num_tokens: int  # completion tokens produced so far (a stop-ending EOS is not counted)
    finish_reason: str | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)  # tokens produced since the previous delta


class TextStream:
    """Turns completion token ids into stable text deltas, cutting at the first stop string.

    Each step decodes only a window of recent tokens (after a few tokens of context, which keep the window's
    leading space: sentencepiece drops the "▁" of the first piece of a decoded sequence), so a step costs the same
    at token 5,000 as at token 5; the text before the window is fixed once it reads the same decoded on its own.
    """

    WINDOW = 32  # tokens; once the window holds twice as many, all but the last WINDOW are fixed

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        self._context = list(prompt_ids[-4:])  # the tokens decoded in front of the window
        self._start = 0  # self.ids[self._start:] is the window
        self._fixed = ""  # the text of self.ids[:self._start]

    def _decode_after(self, context: list[int], ids: list[int]) -> str:
        """The text of `ids` as it reads after the `context` tokens."""
        if not context:
            return self.tokenizer.decode(ids)
        head, full = self.tokenizer.decode(context), self.tokenizer.decode(context + ids)
        return full[len(head):] if full.startswith(head) else self.tokenizer.decode(ids)

    def _decode(self) -> str:
        window = self.ids[self._start:]
        text = self._fixed + self._decode_after(self._context, window)
        if len(window) >= 2 * self.WINDOW:  # fix the window's first part when it decodes alone to the same text
            done = window[:-self.WINDOW]  # (a cut inside a multi-byte character fails; the next token moves it)
            piece = self._decode_after(self._context, done)
            if not piece.endswith(REPLACEMENT_CHAR) and text.startswith(piece, len(self._fixed)):
                self._fixed += piece
                self._context = (self._context + done)[-4:]
                self._start += len(done)
        return text

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the newly stable text (sets `stopped` when a stop string appeared)."""
        self.ids.extend(token_ids)
        self.text = self._decode()
        cut = self._stop_index()
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self._emit(len(self.text))
        safe = len(self.text)
        # an incomplete UTF-8 character is at most 3 bytes, each decoded as U+FFFD until the last one arrives
        while safe > max(self.emitted, len(self.text) - 3) and self.text[safe - 1] == REPLACEMENT_CHAR:
            safe -= 1
        if self.stop:  # keep back a tail that may be the beginning of a stop string
            longest = max(len(s) for s in self.stop)
            for k in range(min(longest - 1, safe - self.emitted), 0, -1):
                tail = self.text[safe - k:safe]
                if any(s.startswith(tail) for s in self.stop):
                    safe -= k
                    break
        return self._emit(safe)

    def _stop_index(self) -> int | None:
        # search from a little before what was emitted: a stop string can straddle the boundary
        start = max(0, self.emitted - max((len(s) for s in self.stop), default=0))
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out

    def flush(self) -> str:
        """The held-back rest, at the end of the completion."""
        return self._emit(len(self.text))


# ---------------------------------------------------------------- the stream
def _token_ids(step: Any) -> list[int]:
    """The model's stream yields the new token(s) of one step (tensor [1, k], [k] or an int); flatten them."""
    if isinstance(step, torch.Tensor):
        return [int(t) for t in step.reshape(-1).tolist()]
    if isinstance(step, int):
        return [step]
    return [int(t) for t in step]


def _eos_id(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_id", None)
    return eos if isinstance(eos, int) and eos >= 0 else None


def stream_completion(model: Any, tokenizer: Any, prompt_ids: Sequence[int], spec: SamplingSpec,
                      generator: torch.Generator | None = None,
                      cancelled: Callable[[], bool] = lambda: False,
                      stop_ids: Sequence[int] | None = None, continues_prompt: bool = True) -> Iterator[Delta]:
    """Generate one completion of `prompt_ids` (from `encode_prompt`), yielding text deltas; the last delta carries
    the finish reason. `generator` defaults to one seeded from `spec.seed`; pass one to draw several samples from
    one seeded sequence. `cancelled` is polled between tokens (a server's client went away). `stop_ids`: the tokens
    that end the completion without being part of it (default: the tokenizer's EOS; a chat turn adds `<|end|>`).
    `continues_prompt=False`: the completion is a text of its own, decoded without the prompt in front (a chat
    turn: its content is encoded alone, and its first piece's dummy-prefix space is not part of the text)."""
    device = next(model.parameters()).device
    generator = generator if generator is not None else make_generator(spec.seed, device)
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    eos = _eos_id(tokenizer)
    stops = set(stop_ids) if stop_ids is not None else ({eos} if eos is not None else set())
    text = TextStream(tokenizer, prompt_ids if continues_prompt else [], spec.stop)
    finish, pending, sent = "length", "", 0

    def new_ids() -> list[int]:
        nonlocal sent
        ids, sent = text.ids[sent:], len(text.ids)
        return ids
    # a model may have more embedding rows than its tokenizer has pieces (a padded vocab): never sample those ids
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    limit = {"vocab_limit": tokenizer.vocab_size} if model_vocab and tokenizer.vocab_size < model_vocab else {}
    steps = model.stream(input_ids, eos_token_id=sorted(stops) or None, generator=generator,
                         **limit, **spec.model_kwargs())
    try:
        with torch.inference_mode():
            for step in steps:
                if cancelled():
                    finish = "cancelled"
                    break
                ids = _token_ids(step)
                hit = next((k for k, token in enumerate(ids) if token in stops), None)
                if hit is not None:
                    ids = ids[:hit]
                    finish = "stop"
                delta = text.push(ids) if ids else ""
                if text.stopped:
                    finish = "stop"
                if finish == "stop" or len(text.ids) >= spec.max_new_tokens:
                    pending = delta
                    break
                if delta:
                    yield Delta(delta, len(text.ids), token_ids=new_ids())
    finally:
        close = getattr(steps, "close", None)
        if close is not None:
            close()
    tail = "" if finish == "cancelled" else pending + text.flush()
    yield Delta(tail, len(text.ids), finish, new_ids())


@dataclasses.dataclass(frozen=True)
class Completion:
    """One whole completion: the generated text (without the prompt), why it ended, and token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    token_ids: list[int]  # the completion's tokens (without a final EOS)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def generate_text(model: Any, tokenizer: Any, prompt: str, spec: SamplingSpec,
                  generator: torch.Generator | None = None) -> Completion:
    """Complete `prompt` in one call (the streamed deltas joined)."""
    encoded = encode_prompt(tokenizer, prompt, int(model.config.max_seq_len))
    return collect(stream_completion(model, tokenizer, encoded.ids, spec, generator), len(encoded.ids))


def collect(deltas: Iterator[Delta], prompt_tokens: int) -> Completion:
    """A whole completion from its streamed deltas (text joined, ids concatenated, the last finish reason)."""
    pieces, finish, ids = [], "length", []
    for delta in deltas:
        pieces.append(delta.text)
        ids += delta.token_ids
        finish = delta.finish_reason or finish
    return Completion("".join(pieces), finish, prompt_tokens, ids)


# ---------------------------------------------------------------- chat turns
# A chat turn is a completion of the conversation rendered by gpt.chat.ChatTemplate (the one definition of the chat
# format) that ends at `<|end|>` (or EOS). `gpt chat`, /v1/chat/completions and the web UI's chat mode come here.
@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """A conversation rendered to ask for the next assistant turn: `ids` = ChatTemplate.render_prompt(messages);
    `num_dropped` earliest messages were left out to fit the context (`trim_chat`)."""

    ids: list[int]
    messages: list[Any]  # gpt.chat.Message, as rendered
    num_dropped: int = 0


def _chat_messages(raw: Any) -> list[Any]:
    """Validated messages (gpt.chat.parse_messages); a bad one is a GenerationInputError naming it."""
    from gpt.chat import ChatFormatError, Message, parse_messages

    if isinstance(raw, list):  # Message objects (a ChatPrompt's) as well as {role, content} mappings
        raw = [dataclasses.asdict(m) if isinstance(m, Message) else m for m in raw]
    try:
        messages = parse_messages(raw)
    except ChatFormatError as err:
        field, _, reason = str(err).partition(": ")
        raise GenerationInputError(field, reason) from None
    if messages[-1].role != "user":
        raise GenerationInputError("messages", "the last message must be the user's (the assistant answers it)")
    for i, message in enumerate(messages):
        try:
            message.content.encode("utf-8")
        except UnicodeEncodeError as err:
            raise GenerationInputError(f"messages[{i}].content", f"is not valid Unicode text (lone surrogate "
                                       f"U+{ord(message.content[err.start]):04X})") from None
    return messages


def encode_chat(template: Any, messages: Any) -> ChatPrompt:
    """Validate `messages` (a list of {role, content}, ending with the user's) and render the prompt of the next
    assistant turn. Callers that must refuse long conversations compare `len(ids)` with their limit."""
    checked = _chat_messages(messages)
    return ChatPrompt(template.render_prompt(checked), checked)


def trim_chat(template: Any, messages: Any, max_prompt_tokens: int) -> ChatPrompt:
    """Like `encode_chat`, but drop the oldest user/assistant exchanges (the system message and the last user
    message stay) until the prompt has at most `max_prompt_tokens` tokens. Even the last message alone too
    long → GenerationInputError("messages")."""
    checked = _chat_messages(messages)
    system, body = (checked[:1], checked[1:]) if checked[0].role == "system" else ([], checked)
    for dropped in range(0, len(body), 2):  # body alternates user, assistant, ..., user
        ids = template.render_prompt(system + body[dropped:])
        if len(ids) <= max_prompt_tokens:
            return ChatPrompt(ids, system + body[dropped:], dropped)
    raise GenerationInputError("messages", f"the last message needs {len(ids)} tokens with the system prompt; "
                                           f"the context leaves room for {max_prompt_tokens}")


def chat_stop_ids(template: Any) -> list[int]:
    """A chat turn ends at `<|end|>`; EOS (where documents end) ends it too."""
    eos = _eos_id(template.tokenizer)
    return [*template.stop_ids, *([eos] if eos is not None else [])]


def stream_chat(model: Any, template: Any, prompt_ids: Sequence[int], spec: SamplingSpec,
                generator: torch.Generator | None = None,
                cancelled: Callable[[], bool] = lambda: False, show_thinking: bool = True) -> Iterator[Delta]:
    """Stream the assistant's turn after `prompt_ids` (from `encode_chat`/`trim_chat`) as `stream_completion` does,
    ending (finish reason "stop") at `<|end|>` or EOS, which are not part of the text. A `<think>…</think>` part
    (control symbols: they decode to "") is shown between those literal markers, or left out with
    show_thinking=False."""
    deltas = stream_completion(model, template.tokenizer, prompt_ids, spec, generator, cancelled,
                               stop_ids=chat_stop_ids(template), continues_prompt=False)
    from gpt.chat import think_ids

    think = think_ids(template.tokenizer)
    return deltas if think is None else mark_thinking(deltas, think, show_thinking)


def mark_thinking(deltas: Iterator[Delta], think: tuple[int, int], show: bool) -> Iterator[Delta]:
    """Deltas with the thinking part marked ("<think>" … "</think>") or dropped, by the deltas' token ids.
    (A delta's text can lag its tokens by a held-back character or two; the cut is at delta boundaries.)"""
    open_id, close_id = think
    inside = False
    for delta in deltas:
        text = delta.text
        for token in delta.token_ids:
            if token == open_id and not inside:
                inside = True
                text = text + "<think>" if show else ""
            elif token == close_id and inside:
                inside = False
                text = text + "</think>" if show else ""
            elif inside and not show:
                text = ""
        yield dataclasses.replace(delta, text=text)


def generate_chat(model: Any, template: Any, messages: Any, spec: SamplingSpec,
                  generator: torch.Generator | None = None) -> Completion:
    """The assistant's next turn in one call; a conversation over the context is refused (see `trim_chat`)."""
    prompt = encode_chat(template, messages)
    limit = int(model.config.max_seq_len) - 1
    if len(prompt.ids) > limit:
        raise GenerationInputError("messages", f"{len(prompt.ids)} tokens, the context holds {limit}")
    return collect(stream_chat(model, template, prompt.ids, spec, generator), len(prompt.ids))
