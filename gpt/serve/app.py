"""The HTTP server: an OpenAI-compatible completions API, a health route and the web UI, as one FastAPI app.

Routes
  GET  /                 the single-page web UI (gpt/serve/index.html: inline HTML/JS/CSS, works offline)
  GET  /health           status, model name, queue length and the request limits (the UI reads them)
  GET  /v1/models        the one served model, in OpenAI's list format
  POST /v1/completions   prompt, max_tokens, temperature, top_p, (top_k), stop, n, seed, stream
                         (`stream: true` → server-sent events in OpenAI's chunk format, then `data: [DONE]`;
                         `stream_options: {"include_usage": true}` adds a usage chunk before [DONE])

What a completion is (sampling values, prompt encoding, empty-prompt start token, streamed text, stop strings)
is decided by the generation front door, gpt/generate.py; this module adds HTTP, limits and queueing.
Generations run one at a time on a single worker thread fed by a bounded FIFO queue (see engine.py for why);
a full queue answers 503. When a client disconnects, its job is cancelled: dropped if still queued, stopped
between two tokens if running. Invalid requests get 400 (413 for an oversized body, 404 for an unknown model)
with an OpenAI-style `{"error": {"message", "type", "param", "code"}}` body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from gpt.generate import GenerationInputError, SamplingSpec, encode_prompt, make_generator, stream_completion
from gpt.model_dir import LoadedModel
from gpt.serve.config import ServeConfig
from gpt.serve.engine import Job, QueueFull, Worker


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completion request we implement; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # OpenAI fields we do not implement: rejected when used rather than silently ignored
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class BodySizeLimit:
    """ASGI middleware: 413 for request bodies over `max_bytes` (by Content-Length, or counted while read)."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send)
        seen = 0

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise APIError(413, f"request body over {self.max_bytes} bytes")
            return message

        try:
            await self.app(scope, counted_receive, send)
        except APIError as err:
            await err.response()(scope, receive, send)

    async def _reject(self, scope: dict, receive: Any, send: Any) -> None:
        err = APIError(413, f"request body over {self.max_bytes} bytes (serve.max_body_bytes)")
        await err.response()(scope, receive, send)


# The front door names fields as gpt.generate does; the API spells one of them OpenAI's way.
API_PARAM = {"max_new_tokens": "max_tokens"}


def _validate(req: CompletionRequest, loaded: LoadedModel, cfg: ServeConfig) -> tuple[list[int], SamplingSpec]:
    """Check a request: sampling values and the prompt through the front door (gpt.generate), then this
    server's limits. Returns the prompt's token ids and the sampling spec."""
    if req.model not in (None, "", loaded.name):
        raise APIError(404, f"model {req.model!r} not found; this server serves {loaded.name!r}", "model",
                       "model_not_found")
    for name, unused in (("logprobs", None), ("echo", False), ("suffix", None)):
        if getattr(req, name) not in (unused, 0, ""):
            raise APIError(400, f"{name}: not supported by this server", name)
    if req.best_of not in (None, 1, req.n):
        raise APIError(400, "best_of: not supported by this server (use n)", "best_of")
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "prompt: give one string (batches of prompts are not supported)", "prompt")
        prompt = prompt[0]
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > cfg.max_stop:
        raise APIError(400, f"stop: up to {cfg.max_stop} non-empty strings", "stop")
    max_tokens = cfg.default_max_tokens if req.max_tokens is None else req.max_tokens
    try:
        spec = SamplingSpec(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                            top_p=req.top_p, seed=req.seed, stop=tuple(stop))
        encoded = encode_prompt(loaded.tokenizer, prompt, loaded.max_seq_len)
    except GenerationInputError as err:
        param = API_PARAM.get(err.field, err.field)
        raise APIError(400, f"{param}: {err.reason}", param) from None
    if max_tokens > cfg.max_tokens:
        raise APIError(400, f"max_tokens: {max_tokens} is outside 1..{cfg.max_tokens}", "max_tokens")
    if not 1 <= req.n <= cfg.max_n:
        raise APIError(400, f"n: {req.n} is outside 1..{cfg.max_n}", "n")
    limit = min(cfg.max_prompt_tokens, loaded.max_seq_len - 1)
    if encoded.num_tokens > limit:
        raise APIError(400, f"prompt: {encoded.num_tokens} tokens, the limit is {limit}", "prompt",
                       "context_length_exceeded")
    return encoded.ids, spec


def _submit(app: FastAPI, prompt_ids: list[int], spec: SamplingSpec, n: int) -> tuple[Job, asyncio.Queue]:
    """Queue a job producing `(choice_index, Delta)` items, then None (or an Exception) on an asyncio queue."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()
    loaded: LoadedModel = app.state.loaded
    stats: dict[str, int] = app.state.stats

    def put(item: Any) -> None:
        loop.call_soon_threadsafe(out.put_nowait, item)

    def run(cancelled: Any) -> None:
        try:
            device = next(loaded.model.parameters()).device
            gen = make_generator(spec.seed, device)  # the n samples are drawn in turn from one seeded sequence
            for index in range(n):
                for delta in stream_completion(loaded.model, loaded.tokenizer, prompt_ids, spec, gen, cancelled):
                    put((index, delta))
                    if delta.finish_reason is not None:
                        stats["completion_tokens"] += delta.num_tokens
                if cancelled():
                    stats["cancelled"] += 1
                    break
            put(None)
        except Exception as err:  # reported to the client, the worker keeps running
            put(err)

    try:
        job = app.state.worker.submit(Job(run))
    except QueueFull as err:
        raise APIError(503, str(err), code="server_busy") from None
    return job, out


def _completion_object(cid: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    body: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created, "model": model,
                            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def _choice(index: int, text: str, finish: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _sse(job: Job, out: asyncio.Queue, cid: str, model: str, prompt_tokens: int,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's completion chunk format. Cancelling this generator cancels the job."""
    created, completion_tokens = int(time.time()), 0
    try:
        while (item := await out.get()) is not None:
            if isinstance(item, Exception):
                err = {"error": {"message": f"generation failed: {item}", "type": "server_error"}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            index, delta = item
            if delta.finish_reason is not None:
                completion_tokens += delta.num_tokens
            if delta.text or delta.finish_reason:
                finish = delta.finish_reason if delta.finish_reason != "cancelled" else "stop"
                chunk = _completion_object(cid, created, model, [_choice(index, delta.text, finish)], None)
                yield f"data: {json.dumps(chunk)}\n\n"
        if include_usage:
            chunk = _completion_object(cid, created, model, [], _usage(prompt_tokens, completion_tokens))
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op when finished; stops the generation when the client went away


async def _collect(request: Request, job: Job, out: asyncio.Queue, n: int) -> tuple[list[dict], int]:
    """Wait for a whole (non-streamed) completion, cancelling it if the client disconnects meanwhile."""
    texts, finish, tokens = [""] * n, ["length"] * n, 0
    try:
        while True:
            try:
                item = await asyncio.wait_for(out.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected") from None
                continue
            if item is None:
                break
            if isinstance(item, Exception):
                raise APIError(500, f"generation failed: {item}")
            index, delta = item
            texts[index] += delta.text
            if delta.finish_reason is not None:
                finish[index], tokens = delta.finish_reason, tokens + delta.num_tokens
    finally:
        job.cancel()
    return [_choice(i, texts[i], finish[i]) for i in range(n)], tokens


def create_app(loaded: LoadedModel, config: ServeConfig | None = None) -> FastAPI:
    """The server app for one loaded model. The worker thread starts here and stops with the app."""
    cfg = config or ServeConfig()
    worker = Worker(cfg.max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    app = FastAPI(title="gpt-pipeline", summary="OpenAI-compatible completions for a gpt-pipeline model",
                  lifespan=lifespan)
    app.state.loaded, app.state.config, app.state.worker = loaded, cfg, worker
    # counters, written only by the worker thread: generated tokens, generations stopped by a disconnect
    app.state.stats = {"completion_tokens": 0, "cancelled": 0}
    app.add_middleware(BodySizeLimit, max_bytes=cfg.max_body_bytes)
    started = int(time.time())
    index_html = resources.files("gpt.serve").joinpath("index.html").read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None).response()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.get("/health")
    async def health() -> dict:
        worker: Worker = app.state.worker
        return {"status": "ok", "model": loaded.name, "busy": worker.busy.is_set(), "queued": worker.queued(),
                "max_seq_len": loaded.max_seq_len, "limits": cfg.limits(), "stats": dict(app.state.stats)}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": loaded.name, "object": "model", "created": started, "owned_by": "gpt-pipeline"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        prompt_ids, spec = _validate(body, loaded, cfg)
        job, out = _submit(app, prompt_ids, spec, body.n)
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            events = _sse(job, out, cid, loaded.name, len(prompt_ids), include_usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        choices, tokens = await _collect(request, job, out, body.n)
        for c in choices:
            c["finish_reason"] = "stop" if c["finish_reason"] == "cancelled" else c["finish_reason"]
        return JSONResponse(_completion_object(cid, int(time.time()), loaded.name, choices,
                                               _usage(len(prompt_ids), tokens)))

    return app
