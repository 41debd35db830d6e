"""The HTTP server: an OpenAI-compatible completions API, a health route and the web UI, as one FastAPI app.

Routes
  GET  /                 the single-page web UI (gpt/serve/index.html: inline HTML/JS/CSS, works offline)
  GET  /health           status, model name, queue length and the request limits (the UI reads them)
  GET  /v1/models        the one served model, in OpenAI's list format; /v1/models/{id}: that one model
  POST /v1/completions   prompt, max_tokens, temperature, top_p, (top_k), stop, n, seed, stream
                         (`stream: true` → server-sent events in OpenAI's chunk format, then `data: [DONE]`;
                         `stream_options: {"include_usage": true}` adds a usage chunk before [DONE])
  POST /v1/chat/completions  messages → the assistant's next turn, same options (gpt/serve/chat.py)

What a completion is (sampling values, prompt encoding, empty-prompt start token, streamed text, stop strings)
is decided by the generation front door, gpt/generate.py; this module adds HTTP, limits and queueing.
Generations run on worker threads fed by a bounded FIFO queue (engine.py): one at a time with serve.max_batch 1,
else up to max_batch at once, decoded together by one scheduler (continuous batching, batch.py); a full queue
answers 503 with Retry-After. When a client disconnects (streamed or not), its job is cancelled:
dropped if still queued, stopped between two tokens if running.

Every error, from any layer (routing, JSON parsing, validation, limits, auth), is a 4xx/5xx in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` (`error_response`), rendered as ASCII JSON so that no input
(a lone surrogate, say) can break the error itself. Around the routes, plain ASGI middlewares (outermost first):
`HostCheck` (DNS rebinding: a Host header must be an IP literal, localhost or an allowed name), `BearerAuth`
(`/v1/*` needs the API key when one is set) and `BodyReader` (reads the whole body first: 413 over the limit,
chunked or not; 408 when it arrives too slowly; 400 for a JSON body that is not UTF-8). Slow headers and the
connection limit are the HTTP protocol's job (gpt/serve/server.py). Other API modules (gpt/serve/chat.py) reuse
`APIError`, `error_response`, `submit_job`, `collect_job` and `app.state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt.generate import (
    GenerationInputError,
    Prompt,
    SamplingSpec,
    encode_prompt,
    make_generator,
    stream_chat,
    stream_completion,
)
from gpt.model_dir import LoadedModel
from gpt.serve.batch import BatchScheduler
from gpt.serve.chat import add_chat_routes
from gpt.serve.config import ServeConfig
from gpt.serve.engine import Job, QueueFull, Worker
from gpt.serve.schema import SamplingRequest

RETRY_AFTER_SECONDS = 1  # sent with every 503: the queue moves by one generation at a time


class ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message quoting a lone surrogate still encodes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error format: OpenAI's `{"error": {"message", "type", "param", "code"}}`."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    if status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS), **(headers or {})}
    return ASCIIJSONResponse(body, status_code=status, headers=headers)


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with an HTTP status (raise it from any route)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.headers)


class CompletionRequest(SamplingRequest):
    """The subset of OpenAI's completion request we implement; other OpenAI fields are accepted and ignored."""

    # text, or token ids (OpenAI allows both); a list holds one prompt (batches are refused)
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] = ""
    # OpenAI fields we do not implement: rejected when used rather than silently ignored
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


async def _send_error(send: Any, err: APIError) -> None:
    """Answer from an ASGI middleware (before any route ran)."""
    response = err.response()
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class BodyReader:
    """ASGI middleware: read the whole request body before the app sees it, then replay it. 413 when it passes
    `max_bytes` (by Content-Length or while reading a chunked body), 408 when it takes over `timeout` seconds,
    400 when a JSON body is not UTF-8. Later receive() calls (disconnect) go to the server."""

    def __init__(self, app: Any, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        # the rest of the body is never read, so these answers close the connection
        too_big = APIError(413, f"request body over {self.max_bytes} bytes (serve.max_body_bytes)",
                           code="request_too_large", headers={"Connection": "close"})
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _send_error(send, too_big)

        async def read_body() -> bytes | None:  # None: over the limit
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ConnectionResetError
                body += message.get("body", b"")
                if len(body) > self.max_bytes:
                    return None
                if not message.get("more_body", False):
                    return bytes(body)

        try:
            body = await asyncio.wait_for(read_body(), self.timeout)
        except ConnectionResetError:
            return  # the client left before sending its whole request: nobody to answer
        except asyncio.TimeoutError:
            return await _send_error(send, APIError(408, f"request body not received within {self.timeout:g} s",
                                                    code="request_timeout", headers={"Connection": "close"}))
        if body is None:
            return await _send_error(send, too_big)
        if b"json" in headers.get(b"content-type", b"json"):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as err:
                return await _send_error(send, APIError(
                    400, f"request body is not UTF-8 ({err.reason} at byte {err.start}); send JSON as UTF-8",
                    code="invalid_encoding"))
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class BearerAuth:
    """ASGI middleware: `/v1/*` requires `Authorization: Bearer <api_key>` (compared in constant time)."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                which = "missing" if not given else "incorrect"
                return await _send_error(send, APIError(
                    401, f"{which} API key: send the server's key as 'Authorization: Bearer <key>'",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        await self.app(scope, receive, send)


def host_allowed(host_header: str, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header may reach the app: an IP literal (DNS rebinding needs a name), localhost, or a name
    in `allowed` ("*" allows any)."""
    if "*" in allowed:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    host = host.rstrip(".")
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    return host == "localhost" or host.endswith(".localhost") or host in allowed


class HostCheck:
    """ASGI middleware: 400 for a Host header naming a host this server does not answer for. Guards a local
    server against DNS rebinding (a web page whose domain re-resolves to 127.0.0.1 calling the API)."""

    def __init__(self, app: Any, allowed: tuple[str, ...]):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        # Starlette's in-process TestClient (Host "testserver") has no socket, so no browser can be behind it
        if scope["type"] == "http" and (scope.get("client") or ("",))[0] != "testclient":
            host = dict(scope.get("headers") or []).get(b"host")
            if host is not None and not host_allowed(host.decode("latin-1"), self.allowed):
                shown = host.decode("latin-1")[:100]
                return await _send_error(send, APIError(
                    400, f"Host {shown!r} is not served here; start the server with --allow-host "
                         f"{shown.split(':')[0]!r} to accept it", code="host_not_allowed"))
        await self.app(scope, receive, send)


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
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, "prompt: give one prompt (batches of prompts are not supported)", "prompt")
        prompt = prompt[0]
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > cfg.max_stop:
        raise APIError(400, f"stop: up to {cfg.max_stop} non-empty strings", "stop")
    max_tokens = cfg.default_max_tokens if req.max_tokens is None else req.max_tokens
    try:
        spec = SamplingSpec(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                            top_p=req.top_p, seed=req.seed, stop=tuple(stop))
        encoded = (_token_prompt(prompt, loaded) if isinstance(prompt, list)
                   else encode_prompt(loaded.tokenizer, prompt, loaded.max_seq_len))
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


def _token_prompt(ids: list[int], loaded: LoadedModel) -> Prompt:
    """A prompt given as token ids: each must be in the vocabulary; too long is refused by the caller."""
    vocab = int(loaded.tokenizer.vocab_size)
    if not ids:
        raise GenerationInputError("prompt", "an empty list of token ids (send \"\" to start from nothing)")
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise GenerationInputError("prompt", f"token id {bad} is outside the vocabulary 0..{vocab - 1}")
    return Prompt(list(ids))


def submit_job(app: FastAPI, prompt_ids: list[int], spec: SamplingSpec, n: int,
               chat_template: Any = None, show_thinking: bool = True) -> tuple[Job, asyncio.Queue]:
    """Queue a job producing `(choice_index, Delta)` items, then None (or an Exception) on an asyncio queue.
    With a `chat_template` (gpt.chat.ChatTemplate) each choice is an assistant turn (gpt.generate.stream_chat)."""
    loop = asyncio.get_running_loop()
    out: asyncio.Queue = asyncio.Queue()
    loaded: LoadedModel = app.state.loaded
    stats: dict[str, int] = app.state.stats
    model = app.state.generation_model  # the model, or the batching scheduler's stand-in for it

    def put(item: Any) -> None:
        loop.call_soon_threadsafe(out.put_nowait, item)

    def run(cancelled: Any) -> None:
        try:
            device = next(model.parameters()).device
            gen = make_generator(spec.seed, device)  # the n samples are drawn in turn from one seeded sequence
            for index in range(n):
                deltas = (stream_chat(model, chat_template, prompt_ids, spec, gen, cancelled, show_thinking)
                          if chat_template is not None
                          else stream_completion(model, loaded.tokenizer, prompt_ids, spec, gen, cancelled))
                for delta in deltas:
                    put((index, delta))
                    if delta.finish_reason is not None:
                        with app.state.stats_lock:
                            stats["completion_tokens"] += delta.num_tokens
                if cancelled():
                    with app.state.stats_lock:
                        stats["cancelled"] += 1
                    break
            put(None)
        except Exception as err:  # reported to the client, the worker keeps running
            put(err)

    try:
        job = app.state.worker.submit(Job(run))
    except QueueFull as err:
        raise APIError(503, f"{err}; retry after {RETRY_AFTER_SECONDS} s", code="server_busy") from None
    return job, out


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel `job` as soon as the client closes its connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


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


async def collect_job(request: Request, job: Job, out: asyncio.Queue, n: int) -> tuple[list[dict], int]:
    """Wait for a whole (non-streamed) completion; the client disconnecting cancels it (the worker stops
    before its next token), as does this request task being cancelled (server shutdown)."""
    texts, finish, tokens = [""] * n, ["length"] * n, 0
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    try:
        while True:
            try:
                item = await out.get()
            except asyncio.CancelledError:  # the server's drain deadline passed (SIGTERM): answer, don't vanish
                raise APIError(503, "server shutting down: the generation was cancelled", code="shutting_down") \
                    from None
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
        watcher.cancel()
    return [_choice(i, texts[i], finish[i]) for i in range(n)], tokens


def create_app(loaded: LoadedModel, config: ServeConfig | None = None) -> FastAPI:
    """The server app for one loaded model. The worker thread starts here and stops with the app."""
    cfg = config or ServeConfig()
    # batching needs the real model's cache hooks (a stand-in model, as in tests, runs one at a time)
    batching = cfg.max_batch > 1 and hasattr(loaded.model, "new_batch_cache")
    worker = Worker(cfg.max_queue, threads=cfg.max_batch if batching else 1)
    scheduler = BatchScheduler(loaded.model, cfg.max_batch) if batching else None

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()  # after the server's drain deadline: cancels what is still queued or running
        if scheduler is not None:
            scheduler.shutdown()

    # no /docs or /redoc: FastAPI's pages load Swagger/ReDoc from a CDN (blank offline); /openapi.json stays
    app = FastAPI(title="gpt-pipeline", summary="OpenAI-compatible completions for a gpt-pipeline model",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.loaded, app.state.config, app.state.worker = loaded, cfg, worker
    app.state.scheduler = scheduler
    app.state.generation_model = scheduler.model if scheduler is not None else loaded.model
    # counters, written by the worker threads: generated tokens, generations stopped by a disconnect
    app.state.stats, app.state.stats_lock = {"completion_tokens": 0, "cancelled": 0}, threading.Lock()
    app.add_middleware(BodyReader, max_bytes=cfg.max_body_bytes, timeout=cfg.body_timeout)
    if cfg.api_key:
        app.add_middleware(BearerAuth, api_key=cfg.api_key)
    app.add_middleware(HostCheck, allowed=(*cfg.allowed_hosts, cfg.host.lower()))
    started = int(time.time())
    index_html = resources.files("gpt.serve").joinpath("index.html").read_text(encoding="utf-8")
    _add_error_handlers(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.get("/health")
    async def health() -> dict:
        worker: Worker = app.state.worker
        return {"status": "ok", "model": loaded.name, "busy": worker.busy.is_set(), "queued": worker.queued(),
                "running": worker.num_running(),
                "max_seq_len": loaded.max_seq_len, "limits": cfg.limits(), "stats": dict(app.state.stats)}

    card = {"id": loaded.name, "object": "model", "created": started, "owned_by": "gpt-pipeline"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != loaded.name:
            raise APIError(404, f"model {model_id!r} not found; this server serves {loaded.name!r}", "model",
                           "model_not_found")
        return card

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        prompt_ids, spec = _validate(body, loaded, cfg)
        job, out = submit_job(app, prompt_ids, spec, body.n)
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            events = _sse(job, out, cid, loaded.name, len(prompt_ids), include_usage)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        choices, tokens = await collect_job(request, job, out, body.n)
        for c in choices:
            c["finish_reason"] = "stop" if c["finish_reason"] == "cancelled" else c["finish_reason"]
        return JSONResponse(_completion_object(cid, int(time.time()), loaded.name, choices,
                                               _usage(len(prompt_ids), tokens)))

    add_chat_routes(app, submit_job, collect_job, APIError)  # POST /v1/chat/completions (gpt/serve/chat.py)
    return app


def _validation_message(err: RequestValidationError) -> APIError:
    """Pydantic's first complaint as one OpenAI error; `param` names a field, never a character offset."""
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        where = first.get("loc", ("body", "?"))[-1]
        reason = (first.get("ctx") or {}).get("error", "invalid JSON")
        return APIError(400, f"request body is not valid JSON: {reason} (at character {where})", None, "invalid_json")
    fields = [str(p) for p in first.get("loc", ()) if p != "body"]
    # a union (prompt: text or token ids) reports each alternative; name the field and what it accepts
    if fields and fields[0] == "prompt":
        return APIError(400, "prompt: must be a string, a list of one string, or a list of token ids (integers)",
                        "prompt")
    where = ".".join(fields)
    return APIError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", fields[0] if fields else None)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error any layer raises, in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_message(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path} (see /v1/models, /v1/completions, /health)"
        elif err.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        else:
            message = str(err.detail)
        return error_response(err.status_code, message, headers=getattr(err, "headers", None))
