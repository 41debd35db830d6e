"""Serving hardening against a real uvicorn (gpt.serve.server, as `gpt serve` runs it) on a free 127.0.0.1 port:
disconnects honoured for non-streamed requests, every bad input a 4xx in OpenAI's error shape, API key and Host
checks, slow and surplus connections cut, Retry-After, 50 concurrent OpenAI clients, `/v1/models/{id}`, no CDN
docs, and the `gpt serve` process itself (real port for --port 0, busy port, --device cuda, SIGTERM drain)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gpt.model_dir import load
from gpt.serve.app import create_app
from gpt.serve.config import ServeConfig
from gpt.serve.server import bind_socket, make_server

PROMPT = "the cat saw"
ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running(app, cfg: ServeConfig):
    """`app` served the way `gpt serve` serves it (timeouts, connection limit) on a free port; yields its URL."""
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(app, cfg, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.time() + 10
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(tiny_model_dir, name="tiny")


@pytest.fixture(scope="module")
def server(loaded):
    app = create_app(loaded, ServeConfig(max_tokens=100_000, max_body_bytes=4096))
    with running(app, app.state.config) as url:
        yield url, app


def raw_request(url: str, data: bytes, wait: float = 10.0) -> bytes:
    """Send raw bytes on a new connection; return everything the server sends until it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def http_post(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body)),
            "Connection": "close", **(headers or {})}
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode() + body


def wait_idle(app, cancelled_before: int, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and (app.state.worker.busy.is_set()
                                      or app.state.stats["cancelled"] == cancelled_before):
        time.sleep(0.02)


def assert_openai_error(response: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "any":
        assert error["param"] == param
    return error


# ---------------------------------------------------------------- disconnects
def test_non_streamed_request_stops_when_its_client_leaves(server):
    url, app = server
    before = app.state.stats["cancelled"]
    body = json.dumps({"prompt": PROMPT, "max_tokens": 50_000, "temperature": 0}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(http_post("/v1/completions", body))
        deadline = time.time() + 5
        while not app.state.worker.busy.is_set() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
    left = time.time()
    wait_idle(app, before)
    assert app.state.stats["cancelled"] == before + 1, "generation went on after the client left"
    assert not app.state.worker.busy.is_set() and time.time() - left < 2
    assert httpx.get(url + "/health").json()["busy"] is False


# ---------------------------------------------------------------- bad input → 4xx in OpenAI's shape
@pytest.mark.parametrize("body, status, param, words", [
    ('{"prompt": "\\ud800 x", "max_tokens": 2}', 400, "prompt", "U+D800"),
    ('{"prompt": "x", "model": "\\udfff"}', 404, "model", "not found"),
    ('{"prompt": "x", "stop": ["\\ud800"], "max_tokens": 2}', 200, None, ""),
    ('{"prompt": "x", "seed": 9223372036854775808}', 400, "seed", "2^63"),
    ('{"prompt": "x", "seed": 9223372036854775808, "stream": true}', 400, "seed", "2^63"),
    ('{"prompt": "x", "seed": 1180591620717411303424}', 400, "seed", "2^63"),
    ('{"prompt": [99999]}', 400, "prompt", "vocabulary"),
    ('{"prompt": [-1]}', 400, "prompt", "vocabulary"),
    ('{"prompt": []}', 400, "prompt", "empty"),
    ('{"prompt": [[1, 2], [3]]}', 400, "prompt", "batches"),
    ('{"prompt": [1, "a"]}', 400, "prompt", "token ids"),
    ('{"prompt": {"a": 1}}', 400, "prompt", "token ids"),
    ('{"prompt": [true]}', 400, "prompt", "token ids"),
    ('{not json', 400, None, "not valid JSON"),
    ('{"prompt": "x",}', 400, None, "not valid JSON"),
    ('[1, 2]', 400, None, ""),
    ('', 400, None, ""),
    ('{"prompt": "x", "max_tokens": 1e400}', 400, "max_tokens", ""),
])
def test_bad_bodies_get_openai_errors(server, body, status, param, words):
    url, _ = server
    r = httpx.post(url + "/v1/completions", content=body.encode(), headers={"content-type": "application/json"})
    if status == 200:
        assert r.status_code == 200, r.text
        return
    error = assert_openai_error(r, status, param)
    assert words in error["message"]
    assert r.headers["content-type"] == "application/json"
    assert httpx.get(url + "/health").status_code == 200


def test_token_id_prompts_equal_text_prompts(server, loaded):
    url, _ = server
    ids = loaded.tokenizer.encode(PROMPT)
    by_text = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0}).json()
    for prompt in (ids, [ids]):
        by_ids = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert by_ids.status_code == 200, by_ids.text
        assert by_ids.json()["choices"] == by_text["choices"] and by_ids.json()["usage"] == by_text["usage"]
    too_long = httpx.post(url + "/v1/completions", json={"prompt": [5] * 200})
    assert assert_openai_error(too_long, 400, "prompt")["code"] == "context_length_exceeded"


def test_routing_and_encoding_errors_use_the_openai_shape(server):
    url, _ = server
    assert "no route" in assert_openai_error(httpx.get(url + "/v1/nothing"), 404)["message"]
    assert_openai_error(httpx.get(url + "/v1/completions"), 405)
    assert_openai_error(httpx.delete(url + "/health"), 405)
    latin1 = '{"prompt": "caf\xe9"}'.encode("latin-1")
    error = assert_openai_error(httpx.post(url + "/v1/completions", content=latin1,
                                           headers={"content-type": "application/json"}), 400, None)
    assert "UTF-8" in error["message"]


def test_malformed_json_param_is_not_a_character_offset(server):
    url, _ = server
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "x", oops}',
                   headers={"content-type": "application/json"})
    assert assert_openai_error(r, 400)["param"] is None


def test_oversized_chunked_body_gets_413(server):
    url, _ = server

    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "transfer-encoding" in r.request.headers  # chunked: no Content-Length to check up front
    assert "4096" in assert_openai_error(r, 413)["message"]
    r = httpx.post(url + "/v1/completions", json={"prompt": "x" * 5000})
    assert_openai_error(r, 413)


def test_malformed_http_is_refused_and_the_server_stays_up(server):
    url, _ = server
    assert raw_request(url, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert raw_request(url, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n"
                       ).startswith(b"HTTP/1.1 400")
    assert httpx.get(url + "/health").status_code == 200


# ---------------------------------------------------------------- routes
def test_models_retrieve_and_no_cdn_docs(server):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    for page in ("/docs", "/redoc"):
        assert_openai_error(httpx.get(url + page), 404)
    assert httpx.get(url + "/openapi.json").json()["info"]["title"] == "gpt-pipeline"


# ---------------------------------------------------------------- exposure: API key, Host header
def test_api_key_is_required_on_v1(loaded):
    import openai

    app = create_app(loaded, ServeConfig(api_key="s3cret"))
    with running(app, app.state.config) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(url + "/v1/models", headers=headers)
            assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200  # not under /v1: the UI and probes still load
        assert httpx.get(url + "/").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt=PROMPT, max_tokens=3).choices[0].text is not None


def test_foreign_host_headers_are_refused(loaded):
    app = create_app(loaded, ServeConfig(allowed_hosts=("model.internal",)))
    with running(app, app.state.config) as url:
        port = url.rsplit(":", 1)[1]
        refused = httpx.get(url + "/v1/models", headers={"Host": f"evil.example:{port}"})
        assert "--allow-host" in assert_openai_error(refused, 400)["message"]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "10.1.2.3", f"model.internal:{port}"):
            assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host
    app = create_app(loaded, ServeConfig(allowed_hosts=("*",)))
    with running(app, app.state.config) as url:
        assert httpx.get(url + "/v1/models", headers={"Host": "evil.example"}).status_code == 200


# ---------------------------------------------------------------- slow and surplus clients
def test_half_sent_requests_are_timed_out(loaded):
    app = create_app(loaded, ServeConfig(header_timeout=0.5, body_timeout=0.5))
    with running(app, app.state.config) as url:
        start = time.time()
        answers = []
        threads = [threading.Thread(target=lambda d=d: answers.append(raw_request(url, d))) for d in (
            b"",  # connects, sends nothing
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",  # half the headers
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"pro",  # half a body
        )]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert time.time() - start < 5 and len(answers) == 3
        assert sorted(a.split(b"\r\n")[0] for a in answers) == [b"HTTP/1.1 408 Request Timeout"] * 3
        assert httpx.get(url + "/health").status_code == 200


def test_connections_beyond_the_limit_get_503(loaded):
    app = create_app(loaded, ServeConfig(max_connections=3, header_timeout=3))
    with running(app, app.state.config) as url:
        host, port = url.removeprefix("http://").split(":")
        held = [socket.create_connection((host, int(port))) for _ in range(3)]
        time.sleep(0.2)
        try:
            answer = raw_request(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", wait=5)
            assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower()
        finally:
            for s in held:
                s.close()
        time.sleep(0.2)
        assert httpx.get(url + "/health").status_code == 200


# ---------------------------------------------------------------- load
def test_full_queue_answers_503_with_retry_after(loaded):
    # one at a time (max_batch 1): the second request waits; tests/test_serve_batching.py has the batched case
    app = create_app(loaded, ServeConfig(max_queue=1, max_batch=1, max_tokens=100_000))
    with running(app, app.state.config) as url:
        body = {"prompt": PROMPT, "max_tokens": 50_000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()  # (keep the iterator: a dropped one closes the response)
            next(lines)  # running
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as second:
                deadline = time.time() + 5
                while app.state.worker.queued() < 1 and time.time() < deadline:
                    time.sleep(0.01)
                third = httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
                assert assert_openai_error(third, 503)["code"] == "server_busy"
                assert third.headers["retry-after"] == "1"
                assert second.status_code == 200


def default_model_dir(tiny_model_dir, root: Path) -> Path:
    """A random model of params.yaml's default shape (the model section) with the tiny tokenizer's vocabulary."""
    import shutil

    import torch

    from gpt.model import DecoderOnlyTransformer
    from gpt.model_dir import save_model
    from gpt.params import Params
    from gpt.tokenizer import Tokenizer

    torch.manual_seed(0)
    config = Params().model.resolve(Tokenizer.load(tiny_model_dir).vocab_size)
    out = save_model(DecoderOnlyTransformer(config).eval(), root / "default")
    shutil.copy(tiny_model_dir / "tokenizer.model", out / "tokenizer.model")
    return out


def test_fifty_concurrent_openai_clients_all_succeed(tiny_model_dir, tmp_path):
    import openai

    app = create_app(load(default_model_dir(tiny_model_dir, tmp_path), name="default"), ServeConfig())
    with running(app, app.state.config) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused")  # the client's defaults (2 retries)
        results, errors = [], []

        def one(i: int) -> None:
            try:
                done = client.completions.create(model="default", prompt=f"Day {i}:", max_tokens=16, seed=i)
                results.append(done.usage.completion_tokens)
            except Exception as err:  # collected: the assertion below reports them
                errors.append(repr(err))

        start = time.time()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        elapsed = time.time() - start
        assert not errors, errors[:3]
        assert len(results) == 50
        print(f"50 concurrent clients: all succeeded in {elapsed:.1f} s ({sum(results)} tokens)")


# ---------------------------------------------------------------- the `gpt serve` process
def gpt(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("GPT_API_KEY", None)
    return subprocess.Popen([sys.executable, "-m", "gpt.cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"{needle!r} not printed; stderr: {''.join(seen)}")


def test_serve_port_0_prints_the_real_port_and_sigterm_drains_with_a_deadline(tiny_model_dir):
    proc = gpt("serve", "-c", str(tiny_model_dir), "--port", "0", "--max-tokens", "100000", "--drain-timeout", "1")
    try:
        line = wait_for_line(proc, " on http://")
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert port != 0
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == tiny_model_dir.name
        body = {"prompt": PROMPT, "max_tokens": 50_000, "temperature": 0}  # runs for minutes unless cancelled
        statuses = []
        clients = [threading.Thread(target=lambda: statuses.append(
            _status(lambda: httpx.post(url + "/v1/completions", json=body, timeout=60)))) for _ in range(3)]
        for t in clients:
            t.start()
        time.sleep(1.0)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        drained = time.time() - sent
        for t in clients:
            t.join(10)
        print(f"SIGTERM with 3 long generations: exited in {drained:.2f} s (drain timeout 1 s)")
        assert drained < 6 and proc.returncode in (0, -signal.SIGTERM)
        assert sorted(statuses) == ["503"] * 3  # told, not dropped: cancelled at the deadline
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _status(call) -> str:
    try:
        return str(call().status_code)
    except httpx.HTTPError as err:
        return type(err).__name__


def test_busy_port_fails_with_one_line_before_serving(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        proc = gpt("serve", "-c", str(tiny_model_dir), "--port", str(taken.getsockname()[1]))
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().count("\n") == 0 and "serving" not in err
    assert err.startswith("gpt serve: error: cannot listen on 127.0.0.1:") and "in use" in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["serve", "generate"])
def test_device_cuda_without_cuda_is_one_line(tiny_model_dir, command):
    args = [command, "-c", str(tiny_model_dir), "--device", "cuda", "--port", "0"] if command == "serve" else \
        [command, "x", "-c", str(tiny_model_dir), "--device", "cuda"]
    proc = gpt(*args)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.strip().count("\n") == 0, err
    assert "CUDA is not available" in err and "--device cpu" in err


def test_non_loopback_bind_without_key_warns(tiny_model_dir):
    proc = gpt("serve", "-c", str(tiny_model_dir), "--host", "0.0.0.0", "--port", "0")
    try:
        line = wait_for_line(proc, "warning")
        assert "without an API key" in line and "GPT_API_KEY" in line
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
