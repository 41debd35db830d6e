"""The server: OpenAI-style completions (plain, streamed, n>1, stop strings, seeds), limits → 4xx, the FIFO
worker, concurrent requests, client disconnects, and the `openai` client against a real uvicorn server."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from gpt.generate import SamplingSpec, TextStream, stream_completion
from gpt.model_dir import load
from gpt.serve.app import create_app
from gpt.serve.config import ServeConfig
from gpt.serve.engine import Job, QueueFull, Worker
from tests.conftest import live_server

PROMPT = "the cat saw"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(tiny_model_dir, name="tiny")


@pytest.fixture(scope="module")
def client(loaded):
    cfg = ServeConfig(max_tokens=64, max_n=3, max_prompt_tokens=40, max_body_bytes=4096)
    with TestClient(create_app(loaded, cfg)) as c:
        yield c


def complete(client, **body):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return response.json()


def sse_chunks(lines) -> list:
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def greedy_reference(loaded, prompt: str, max_tokens: int) -> str:
    """Greedy completion straight from the model, decoded the way a reader sees it after the prompt."""
    tok = loaded.tokenizer
    ids = tok.encode(prompt)
    out = loaded.model.generate(torch.tensor([ids]), max_tokens, temperature=0.0, eos_token_id=tok.eos_id)
    new = out[0, len(ids):].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    full, head = tok.decode(ids + new), tok.decode(ids)
    assert full.startswith(head)
    return full[len(head):]


def test_greedy_completion_equals_model_generate(client, loaded):
    body = complete(client, max_tokens=20, temperature=0)
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    (choice,) = body["choices"]
    assert choice["text"] == greedy_reference(loaded, PROMPT, 20)
    assert body["usage"]["prompt_tokens"] == len(loaded.tokenizer.encode(PROMPT))
    assert body["usage"]["completion_tokens"] <= 20
    assert choice["finish_reason"] in ("length", "stop")


def test_stream_concatenates_to_the_same_text(client):
    plain = complete(client, max_tokens=24, temperature=1.0, seed=7)
    with client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 24,
                                                        "temperature": 1.0, "seed": 7, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(list(r.iter_lines()))
    text_chunks = [c for c in chunks if c["choices"]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == plain["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == plain["usage"]  # the include_usage chunk


def test_seed_reproducible_and_n_samples(client):
    a = complete(client, max_tokens=16, temperature=1.0, seed=3, n=3)
    b = complete(client, max_tokens=16, temperature=1.0, seed=3, n=3)
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert a["choices"] == b["choices"]
    texts = [c["text"] for c in a["choices"]]
    assert len(set(texts)) > 1  # one generator drawn from in turn: the samples differ
    assert complete(client, max_tokens=16, temperature=1.0, seed=4)["choices"][0]["text"] != texts[0]


def test_stop_string_cuts_the_text(client, loaded):
    full = complete(client, max_tokens=40, temperature=0)["choices"][0]["text"]
    start = next(i for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())
    stop = full[start:start + 2]
    body = complete(client, max_tokens=40, temperature=0, stop=[stop])
    assert body["choices"][0]["text"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_text_stream_holds_back_partial_stop_strings():
    class CharTok:  # ids are character codes
        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    stream = TextStream(CharTok(), [], ("END",))
    pieces = [stream.push([ord(c)]) for c in "abcENxEND"]
    assert "".join(pieces) == "abcENx" and stream.stopped
    assert pieces[3:5] == ["", ""]  # "E", "EN" could still become "END"


def test_text_stream_holds_back_only_a_possible_partial_character():
    class ByteTok:  # ids are bytes; invalid UTF-8 decodes to U+FFFD per byte
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(ByteTok(), [], ())
    euro = list("€".encode())  # 3 bytes
    assert [stream.push([b]) for b in euro] == ["", "", "€"]
    junk = [stream.push([0xFF]) for _ in range(5)]  # never valid: at most 3 are held back
    assert "".join(junk) == "\ufffd" * 2 and stream.flush() == "\ufffd" * 3


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"max_tokens": 65}, 400, "max_tokens"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"n": 4}, 400, "n"),
        ({"temperature": -1}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "the cat " * 40}, 400, "prompt"),
        ({"prompt": ["a", "b"]}, 400, "prompt"),
        ({"max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "gpt-4"}, 404, "model"),
        ({"logprobs": 2}, 400, "logprobs"),
        ({"echo": True}, 400, "echo"),
    ],
)
def test_invalid_requests_get_4xx_with_a_message(client, body, status, param):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, **body})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_malformed_and_oversized_bodies(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": "x" * 5000})
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]


def test_models_health_and_ui(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["limits"]["max_tokens"] == 64
    page = client.get("/")
    assert page.status_code == 200 and "<textarea" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline


def test_worker_is_fifo_bounded_and_skips_cancelled_jobs():
    worker, order, gate = Worker(max_queue=2), [], threading.Event()
    worker.submit(Job(lambda cancelled: (gate.wait(5), order.append("first"))))
    time.sleep(0.1)  # the worker is now blocked inside the first job
    skipped = worker.submit(Job(lambda cancelled: order.append("skipped")))
    worker.submit(Job(lambda cancelled: order.append("second")))
    with pytest.raises(QueueFull):
        worker.submit(Job(lambda cancelled: order.append("rejected")))
    skipped.cancel()
    gate.set()
    deadline = time.time() + 5
    while worker.queued() and time.time() < deadline:
        time.sleep(0.01)
    done = threading.Event()
    worker.submit(Job(lambda cancelled: done.set()))
    assert done.wait(5)
    assert order == ["first", "second"]
    worker.shutdown()


def test_engine_stops_when_cancelled(loaded):
    calls = {"n": 0}

    def cancelled():
        calls["n"] += 1
        return calls["n"] > 3

    spec = SamplingSpec(max_new_tokens=50, temperature=1.0, seed=0)
    deltas = list(stream_completion(loaded.model, loaded.tokenizer, loaded.tokenizer.encode(PROMPT), spec,
                                    None, cancelled))
    assert deltas[-1].finish_reason == "cancelled" and deltas[-1].num_tokens == 3


# ---- a real server on a free port: concurrency, disconnects, the openai client ----
@pytest.fixture(scope="module")
def server(loaded):
    app = create_app(loaded, ServeConfig(max_tokens=100_000, max_n=3))
    with live_server(app) as url:
        yield url, app


def test_two_simultaneous_requests_are_both_correct(server):
    url, _ = server
    bodies = [{"model": "tiny", "prompt": p, "max_tokens": 30, "temperature": 1.0, "seed": s, "stream": stream}
              for p, s, stream in [("the cat saw", 1, True), ("a dog by the river", 2, False)]]

    def run(body):
        if body["stream"]:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                chunks = sse_chunks(list(r.iter_lines()))
            return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    alone = [run(b) for b in bodies]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(bodies[i]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results[0], results[1]] == alone


def test_client_disconnect_stops_generation(server):
    url, app = server
    before = app.state.stats["cancelled"]
    # greedy: the tiny model's greedy loop never reaches EOS, so only the disconnect can end it early
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 50_000, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # got the first chunk; leaving the block closes the connection
    deadline = time.time() + 10
    while time.time() < deadline and (app.state.worker.busy.is_set() or app.state.stats["cancelled"] == before):
        time.sleep(0.05)
    assert app.state.stats["cancelled"] == before + 1
    assert not app.state.worker.busy.is_set()
    health = httpx.get(url + "/health").json()
    assert health["busy"] is False


def test_openai_client_library(server, loaded):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    done = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert done.choices[0].text == greedy_reference(loaded, PROMPT, 12)
    assert done.usage.completion_tokens <= 12
    pieces = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == done.choices[0].text
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10**6)


def test_serve_config_rejects_bad_values():
    from gpt.config import ConfigError

    with pytest.raises(ConfigError, match="serve.port"):
        ServeConfig(port=70000)
    with pytest.raises(ConfigError, match="serve.max_n"):
        ServeConfig(max_n=0)
    with pytest.raises(ConfigError, match="serve.default_max_tokens"):
        ServeConfig(max_tokens=8, default_max_tokens=64)
