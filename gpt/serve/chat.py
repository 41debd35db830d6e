"""POST /v1/chat/completions: OpenAI's chat API over the project's chat format.

    messages (system?, then user/assistant alternating, ending with user), max_tokens (or max_completion_tokens),
    temperature, top_p, (top_k), stop, n, seed, stream (+ stream_options.include_usage)

The conversation is rendered by gpt.chat.ChatTemplate (through the front door, gpt.generate.encode_chat) and each
choice is one assistant turn, ended by `<|end|>` or EOS (gpt.generate.stream_chat). Sampling values, limits,
queueing, disconnects and the error shape are the completions API's (gpt/serve/app.py): `add_chat_routes` is called
by `create_app` with the app's job functions and error type, so this module never imports the app module (no import
circle). A conversation longer than the context is refused (400, code context_length_exceeded), as OpenAI does;
`gpt chat` trims instead.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from gpt.chat import ChatFormatError, ChatTemplate
from gpt.generate import GenerationInputError, SamplingSpec, encode_chat
from gpt.model_dir import LoadedModel
from gpt.serve.config import ServeConfig
from gpt.serve.schema import SamplingRequest

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message


class ChatRequest(SamplingRequest):
    """The subset of OpenAI's chat completion request we implement; other fields are accepted and ignored."""

    messages: Any = None  # checked by gpt.chat.parse_messages, so an error names the message and field
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    show_thinking: bool = False  # include the reply's <think>…</think> part (between those markers) in content
    # OpenAI fields we do not implement: rejected when used rather than silently ignored
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


def _plain_messages(raw: Any) -> Any:
    """OpenAI's message variants → {role, content} with string content: text parts joined, "developer" → system.
    Anything else is left for parse_messages to name."""
    if not isinstance(raw, list):
        return raw
    out = []
    for message in raw:
        if isinstance(message, dict):
            message = dict(message)
            message["role"] = ROLE_ALIASES.get(message.get("role"), message.get("role"))
            content = message.get("content")
            if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                                 and isinstance(p.get("text"), str) for p in content):
                message["content"] = "".join(p["text"] for p in content)
        out.append(message)
    return out


def validate_chat(req: ChatRequest, loaded: LoadedModel, template: ChatTemplate | None, cfg: ServeConfig,
                  error: Callable[..., Exception]) -> tuple[list[int], SamplingSpec]:
    """Check a chat request like the completions API checks a prompt; returns the prompt ids and sampling spec.
    `error(status, message, param, code)` makes the exception the app turns into an OpenAI error."""
    if req.model not in (None, "", loaded.name):
        raise error(404, f"model {req.model!r} not found; this server serves {loaded.name!r}", "model",
                    "model_not_found")
    if template is None:
        raise error(400, f"model {loaded.name!r} has no chat format: its tokenizer lacks the chat tokens "
                         "(use /v1/completions)", "model", "model_not_chat")
    if req.logprobs or req.top_logprobs:
        raise error(400, "logprobs: not supported by this server", "logprobs")
    if req.tools:
        raise error(400, "tools: not supported by this server", "tools")
    if req.response_format not in (None, {"type": "text"}):
        raise error(400, "response_format: only {\"type\": \"text\"} is supported", "response_format")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > cfg.max_stop:
        raise error(400, f"stop: up to {cfg.max_stop} non-empty strings", "stop")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = cfg.default_max_tokens if max_tokens is None else max_tokens
    try:
        spec = SamplingSpec(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                            top_p=req.top_p, seed=req.seed, stop=tuple(stop))
        prompt = encode_chat(template, _plain_messages(req.messages))
    except GenerationInputError as err:
        param = name if err.field == "max_new_tokens" else err.field
        raise error(400, f"{param}: {err.reason}", param) from None
    if max_tokens > cfg.max_tokens:
        raise error(400, f"{name}: {max_tokens} is outside 1..{cfg.max_tokens}", name)
    if not 1 <= req.n <= cfg.max_n:
        raise error(400, f"n: {req.n} is outside 1..{cfg.max_n}", "n")
    limit = min(cfg.max_prompt_tokens, loaded.max_seq_len - 1)
    if len(prompt.ids) > limit:
        raise error(400, f"messages: the conversation is {len(prompt.ids)} tokens, the limit is {limit}",
                    "messages", "context_length_exceeded")
    return prompt.ids, spec


def _chat_object(kind: str, cid: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    body: dict[str, Any] = {"id": cid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _finish(reason: str | None) -> str | None:
    return "stop" if reason == "cancelled" else reason  # OpenAI has no "cancelled"


async def _chat_events(job: Any, out: Any, cid: str, model: str, prompt_tokens: int,
                       include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chat chunk format: per choice a first delta with the role, content deltas,
    a last empty delta with the finish reason; then usage (if asked) and [DONE]. Cancelling this cancels the job."""
    created, completion_tokens = int(time.time()), 0

    def event(choices: list[dict], usage: dict | None = None) -> str:
        return f"data: {json.dumps(_chat_object('chat.completion.chunk', cid, created, model, choices, usage))}\n\n"

    def choice(index: int, delta: dict, finish: str | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    try:
        started: set[int] = set()
        while (item := await out.get()) is not None:
            if isinstance(item, Exception):
                err = {"error": {"message": f"generation failed: {item}", "type": "server_error"}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            index, delta = item
            if index not in started:
                started.add(index)
                yield event([choice(index, {"role": "assistant", "content": ""})])
            if delta.text:
                yield event([choice(index, {"content": delta.text})])
            if delta.finish_reason is not None:
                completion_tokens += delta.num_tokens
                yield event([choice(index, {}, _finish(delta.finish_reason))])
        if include_usage:
            yield event([], _usage(prompt_tokens, completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op when finished; stops the generation when the client went away


def add_chat_routes(app: FastAPI, submit_job: Callable[..., Any], collect_job: Callable[..., Any],
                    error: Callable[..., Exception]) -> None:
    """Add POST /v1/chat/completions to the app made by gpt.serve.app.create_app, using its job functions
    (`submit_job(app, prompt_ids, spec, n, chat_template=...)`, `collect_job(request, job, out, n)`) and error type."""
    loaded: LoadedModel = app.state.loaded
    cfg: ServeConfig = app.state.config
    try:
        template: ChatTemplate | None = ChatTemplate(loaded.tokenizer)
    except ChatFormatError:  # e.g. an imported Hugging Face model: completions only
        template = None
    app.state.chat_template = template

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
        prompt_ids, spec = validate_chat(body, loaded, template, cfg, error)
        job, out = submit_job(app, prompt_ids, spec, body.n, chat_template=template,
                              show_thinking=body.show_thinking)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            events = _chat_events(job, out, cid, loaded.name, len(prompt_ids), include_usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        choices, tokens = await collect_job(request, job, out, body.n)
        messages = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                     "logprobs": None, "finish_reason": _finish(c["finish_reason"])} for c in choices]
        return JSONResponse(_chat_object("chat.completion", cid, int(time.time()), loaded.name, messages,
                                         _usage(len(prompt_ids), tokens)))
