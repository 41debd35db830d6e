"""Continuous batching (gpt/serve/batch.py, BatchKVCache in gpt/model/cache.py): a request's output does not depend
on what else is running. Equivalences: a batched forward over rows of different lengths == each row alone; N
concurrent sequences (greedy and seeded, different lengths and settings) == each alone through `model.stream`, for
a GPT-2 and a Qwen3-style model; a sequence joining mid-decode, one sliding past the context, and one cancelled
(its slot freed at once) leave the others unchanged; through real uvicorn and the `openai` client, concurrent
streams equal the one-at-a-time server's; the bounded queue still answers 503."""

from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest
import torch

from gpt.inference import prepare_for_inference
from gpt.model import DecoderOnlyTransformer, ModelConfig
from gpt.model_dir import load
from gpt.serve.app import create_app
from gpt.serve.batch import BatchScheduler
from gpt.serve.config import ServeConfig
from tests.conftest import live_server


@contextlib.contextmanager
def scheduling(model, max_batch: int):
    """A BatchScheduler over `model` with `max_batch` slots, shut down however the test ends."""
    scheduler = BatchScheduler(model, max_batch=max_batch)
    try:
        yield scheduler
    finally:
        scheduler.shutdown()


VOCAB, EOS = 97, 3
SMALL = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=40)


def tiny_model(preset: str) -> DecoderOnlyTransformer:
    torch.manual_seed(0)
    extra = {"n_kv_heads": 2} if preset == "qwen3-style" else {}
    return prepare_for_inference(DecoderOnlyTransformer(ModelConfig.from_preset(preset, **SMALL, **extra)).eval())


@pytest.fixture(scope="module", params=["tiny", "qwen3-style"])
def model(request):
    return tiny_model(request.param)


def alone(model, prompt: list[int], n: int, temperature: float = 0.0, seed: int | None = None,
          eos: int | None = None, **kw) -> list[int]:
    """The one-at-a-time path: `model.stream` of a batch of one."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return [int(t) for t in model.stream(torch.tensor([prompt]), n, temperature=temperature, eos_token_id=eos,
                                         generator=gen, **kw)]


def batched(scheduler: BatchScheduler, prompt: list[int], n: int, temperature: float = 0.0,
            seed: int | None = None, eos: int | None = None, **kw) -> list[int]:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return list(scheduler.model.stream(torch.tensor([prompt]), n, temperature=temperature, eos_token_id=eos,
                                       generator=gen, **kw))


def run_concurrently(fns) -> list:
    results: list = [None] * len(fns)
    threads = [threading.Thread(target=lambda i=i, f=f: results.__setitem__(i, f())) for i, f in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def prompts(k: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)]


# ---------------------------------------------------------------- the cache
def test_batched_forward_over_rows_of_different_lengths_equals_each_row_alone(model):
    """Rows at lengths 7, 2, 5 (different positions, different attention spans) decode one token together."""
    cache = model.new_batch_cache(4)
    seqs = prompts(3)
    with torch.inference_mode():
        for i, ids in enumerate(seqs):  # prefill each into its slot through the batch-1 view
            view = cache.row(i)
            model.hidden_states(torch.tensor([ids]), cache=view)
            cache.set_length(i, view.length)
        nxt = torch.tensor([[5], [6], [7]])
        together = model.lm_head(model.hidden_states(nxt, cache=cache)[:, -1])
        for i, ids in enumerate(seqs):
            full = model(torch.tensor([ids + [int(nxt[i])]]))[0][0, -1]
            torch.testing.assert_close(together[i], full, atol=1e-5, rtol=1e-4)
            assert cache.lengths[i] == len(ids) + 1
        cache.move(2, 0)  # compaction: slot 2's sequence now lives in slot 0
        assert cache.lengths[0] == len(seqs[2]) + 1
        again = model.lm_head(model.hidden_states(torch.tensor([[9]]), cache=cache.row(0))[:, -1])
        torch.testing.assert_close(again[0], model(torch.tensor([seqs[2] + [7, 9]]))[0][0, -1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the scheduler
def test_concurrent_sequences_equal_each_alone(model):
    """Six sequences at once (greedy and seeded top-k/top-p, different max_tokens, an EOS) == each alone."""
    settings = [dict(n=20), dict(n=7), dict(n=25, temperature=0.9, seed=11, top_k=20),
                dict(n=16, temperature=1.2, seed=5, top_p=0.8), dict(n=12, eos=EOS), dict(n=30, temperature=0.7,
                                                                                           seed=2**62)]
    ps = prompts(len(settings))
    expected = [alone(model, p, **s) for p, s in zip(ps, settings)]
    with scheduling(model, 4) as scheduler:  # six requests, four slots: two wait for a free slot
        got = run_concurrently([lambda p=p, s=s: batched(scheduler, p, **s) for p, s in zip(ps, settings)])
        assert got == expected
        assert scheduler.steps < sum(len(e) for e in expected) - len(expected)  # steps were shared
        assert scheduler.active == 0


def test_every_forward_runs_on_the_one_model_thread(model):
    """Requests on four threads, the model's work on one (libgomp keeps one spinning pool: batch.py's doc)."""
    threads: set[int] = set()
    hook = model.blocks[0].register_forward_pre_hook(lambda *_: threads.add(threading.get_ident()))
    try:
        with scheduling(model, 4) as scheduler:
            run_concurrently([lambda p=p: batched(scheduler, p, 6) for p in prompts(4)])
            batched(scheduler, prompts(1)[0], 3)  # and a lone one later
    finally:
        hook.remove()
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_no_openmp_pool_runs_the_block_single_threaded_then_restores():
    from gpt.serve.engine import no_openmp_pool

    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with no_openmp_pool():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        seen = []
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert seen == [2]  # a thread started later gets the restored count
    finally:
        torch.set_num_threads(original)


def test_a_sequence_joining_mid_decode_gets_its_own_tokens(model):
    first, second = prompts(2)
    with scheduling(model, 3) as scheduler:
        stream = scheduler.model.stream(torch.tensor([first]), 30, temperature=0.0)
        head = [next(stream) for _ in range(10)]  # decoding alone for 10 steps
        joined = batched(scheduler, second, 12)  # joins, runs alongside, leaves
        rest = list(stream)
        assert head + rest == alone(model, first, 30)
        assert joined == alone(model, second, 12)


def test_sliding_past_the_context_matches_the_one_at_a_time_window(model):
    """max_seq_len 40: 60 new tokens slide the window (re-encode the last 20) as model.stream does."""
    a, b = prompts(2)
    with scheduling(model, 2) as scheduler:
        got = run_concurrently([lambda: batched(scheduler, a, 60), lambda: batched(scheduler, b, 45)])
        assert got == [alone(model, a, 60), alone(model, b, 45)]


def test_a_closed_stream_frees_its_slot_at_once(model):
    a, b = prompts(2)
    with scheduling(model, 2) as scheduler:
        long = scheduler.model.stream(torch.tensor([a]), 1000, temperature=0.0)
        next(long)
        other = scheduler.model.stream(torch.tensor([b]), 25, temperature=0.0)
        got = [next(other) for _ in range(5)]
        assert scheduler.active == 2
        long.close()  # the client went away
        deadline = time.time() + 5
        while scheduler.active != 1 and time.time() < deadline:
            time.sleep(0.005)
        assert scheduler.active == 1
        assert got + list(other) == alone(model, b, 25)  # the survivor moved to slot 0 undisturbed
        assert scheduler.active == 0


# ---------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(tiny_model_dir, name="tiny")


TEXTS = ["the cat saw", "Day 3: the", "birds", "a story about rivers and trees", "the model reads"]


def openai_streams(url: str, bodies: list[dict]) -> list[str]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def one(body: dict) -> str:
        return "".join(c.choices[0].text for c in client.completions.create(model="tiny", stream=True, **body))

    return run_concurrently([lambda b=b: one(b) for b in bodies])


def test_concurrent_openai_streams_equal_the_one_at_a_time_server(loaded):
    bodies = [dict(prompt=t, max_tokens=20 + 5 * i, temperature=0 if i % 2 else 0.8, seed=i) for i, t in
              enumerate(TEXTS)]
    results = {}
    for max_batch in (1, 4):
        app = create_app(loaded, ServeConfig(max_batch=max_batch, max_tokens=64))
        with live_server(app) as url:
            results[max_batch] = openai_streams(url, bodies)
            assert httpx.get(url + "/health").json()["limits"]["max_batch"] == max_batch
        if max_batch > 1:
            assert app.state.scheduler.steps > 0
    assert results[4] == results[1]
    assert all(results[1])


def test_chat_turns_batched_equal_one_at_a_time(loaded):
    from fastapi.testclient import TestClient

    body = lambda i: {"messages": [{"role": "user", "content": TEXTS[i]}], "max_tokens": 24,  # noqa: E731
                      "temperature": 0.0 if i % 2 else 1.0, "seed": i, "n": 2}
    replies = {}
    for max_batch in (1, 3):
        with TestClient(create_app(loaded, ServeConfig(max_batch=max_batch))) as client:
            answers = run_concurrently([lambda i=i: client.post("/v1/chat/completions", json=body(i))
                                        for i in range(4)])
            replies[max_batch] = [[c["message"]["content"] for c in a.json()["choices"]] for a in answers]
    assert replies[3] == replies[1]


def test_full_queue_answers_503_while_the_batch_runs(loaded):
    app = create_app(loaded, ServeConfig(max_batch=2, max_queue=1, max_tokens=100_000))
    body = {"prompt": "the", "max_tokens": 50_000, "temperature": 0, "stream": True}
    with live_server(app) as url:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as one, \
                httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as two:
            lines = [one.iter_lines(), two.iter_lines()]
            for stream_lines in lines:
                next(stream_lines)  # both running, side by side
            assert app.state.scheduler.active == 2
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as third:
                deadline = time.time() + 5
                while app.state.worker.queued() < 1 and time.time() < deadline:
                    time.sleep(0.01)
                fourth = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert fourth.status_code == 503 and fourth.json()["error"]["code"] == "server_busy"
                assert third.status_code == 200
        deadline = time.time() + 15  # the clients left: every slot is free again
        while (app.state.scheduler.active or app.state.worker.busy.is_set()) and time.time() < deadline:
            time.sleep(0.02)
        state = (app.state.scheduler.active, app.state.worker.num_running(), app.state.worker.queued())
        assert state == (0, 0, 0)


def test_worker_threads_run_jobs_side_by_side_and_the_queue_stays_bounded():
    from gpt.serve.engine import Job, QueueFull, Worker

    worker, gate, started = Worker(max_queue=1, threads=2), threading.Event(), []
    try:
        for name in ("a", "b"):
            worker.submit(Job(lambda cancelled, name=name: (started.append(name), gate.wait(5))))
        deadline = time.time() + 5
        while len(started) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert sorted(started) == ["a", "b"] and worker.num_running() == 2 and worker.busy.is_set()
        worker.submit(Job(lambda cancelled: started.append("c")))  # waits for a free thread
        with pytest.raises(QueueFull):
            worker.submit(Job(lambda cancelled: started.append("rejected")))
        gate.set()
        while (worker.busy.is_set() or worker.queued()) and time.time() < deadline:
            time.sleep(0.01)
        assert sorted(started) == ["a", "b", "c"] and not worker.busy.is_set()
    finally:
        gate.set()
        worker.shutdown()


def test_max_batch_must_be_positive():
    from gpt.config import ConfigError

    with pytest.raises(ConfigError, match="serve.max_batch"):
        ServeConfig(max_batch=0)
