"""Running the app under uvicorn with the limits a server exposed to slow or hostile clients needs.

uvicorn (0.54) has no timeout for a request's headers and no cap on open connections: a client that sends half a
request line holds its connection forever. `GuardedH11Protocol` (uvicorn's h11 protocol plus two checks) answers
408 and closes a connection whose request headers have not all arrived `header_timeout` seconds after it opened
or after the previous response (an idle keep-alive connection is closed by uvicorn's own keep-alive timeout), and
answers 503 + Retry-After and closes any connection beyond `max_connections`. The body's timeout and size limit
are checked in the app (gpt/serve/app.py, BodyReader), where a proper error can be sent.

SIGTERM / Ctrl-C: uvicorn stops accepting, lets running requests finish for `drain_timeout` seconds, then cancels
them (each cancelled request cancels its generation); the app's shutdown then cancels what is left in the queue.
"""

from __future__ import annotations

import asyncio
import errno
import json
import socket
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from gpt.errors import GptError
from gpt.serve.config import ServeConfig


class ServeError(GptError, OSError):
    """The server cannot start (the port is taken, the address is not this machine's)."""


def _raw_error(status: int, reason: bytes, message: str, code: str, extra: list[tuple[bytes, bytes]]) -> bytes:
    """A whole HTTP/1.1 error response in OpenAI's error shape, for answering below the app."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error" if status < 500 else
                                 "server_error", "param": None, "code": code}}).encode()
    head = [b"HTTP/1.1 %d %s" % (status, reason), b"content-type: application/json",
            b"content-length: %d" % len(body), b"connection: close"] + [k + b": " + v for k, v in extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a connection limit (class attributes, set by
    `protocol_for`)."""

    header_timeout: float = 10.0
    max_connections: int = 256
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_raw_error(503, b"Service Unavailable",
                                       f"server busy: {self.max_connections} connections open; retry later",
                                       "server_busy", [(b"retry-after", b"1")]))
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # (part of) a request line / headers: the clock runs
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm()  # the keep-alive timeout (uvicorn's) covers the idle time until the next request
        super().on_response_complete()

    def _arm(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete:  # nothing is being answered on it
                self.transport.write(_raw_error(408, b"Request Timeout",
                                                f"request headers not received within {self.header_timeout:g} s",
                                                "request_timeout", []))
            self.transport.close()


def protocol_for(cfg: ServeConfig) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout": cfg.header_timeout, "max_connections": cfg.max_connections})


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one). A taken port fails here, with one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        hint = " (another server is running there? choose --port, or --port 0 for a free one)" \
            if err.errno == errno.EADDRINUSE else ""
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror or err}{hint}") from None
    sock.set_inheritable(True)
    return sock


def make_server(app: Any, cfg: ServeConfig, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for `app` with this config's timeouts and limits (start it with `serve_on`)."""
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, http=protocol_for(cfg), log_level=log_level,
                            timeout_graceful_shutdown=cfg.drain_timeout, timeout_keep_alive=5)
    return uvicorn.Server(config)


def serve_on(server: uvicorn.Server, sock: socket.socket) -> None:
    """Serve on an already bound socket until SIGINT/SIGTERM (or `server.should_exit`)."""
    server.run(sockets=[sock])
