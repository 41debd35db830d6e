"""POST /v1/chat/completions through the official `openai` client against a real uvicorn: replies equal the front
door's (gpt.generate.generate_chat) streamed or not, with n, stop, max_tokens, temperature, top_p, seed and usage;
a turn ends at <|end|>; bad conversations are 400s naming the param, in OpenAI's error shape."""

from __future__ import annotations

import dataclasses
import json
import types

import httpx
import openai
import pytest
import torch

from gpt.chat import ChatTemplate
from gpt.generate import SamplingSpec, generate_chat, stream_chat
from gpt.model_dir import LoadedModel, load
from gpt.serve.app import create_app
from gpt.serve.config import ServeConfig
from tests.conftest import live_server

USER = [{"role": "user", "content": "the cat saw"}]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat saw"},
                {"role": "assistant", "content": "the dog"}, {"role": "user", "content": "and then?"}]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(tiny_model_dir, name="tiny")


@pytest.fixture(scope="module")
def template(loaded):
    return ChatTemplate(loaded.tokenizer)


@pytest.fixture(scope="module")
def server(loaded):
    app = create_app(loaded, ServeConfig(max_tokens=256, max_n=3))
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def expected(loaded, template, messages, **spec) -> tuple[str, str, int]:
    done = generate_chat(loaded.model, template, messages, SamplingSpec(**spec))
    return done.text, done.finish_reason, done.completion_tokens


def test_a_reply_equals_the_front_doors(client, loaded, template):
    for messages in (USER, CONVERSATION):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        text, finish, tokens = expected(loaded, template, messages, max_new_tokens=12, temperature=0.0)
        choice = reply.choices[0]
        assert reply.object == "chat.completion" and reply.model == "tiny"
        assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, finish)
        assert reply.usage.prompt_tokens == len(template.render_prompt(messages))
        assert reply.usage.completion_tokens == tokens and reply.usage.total_tokens == reply.usage.prompt_tokens + tokens


def test_streamed_reply_equals_the_whole_one(client, loaded, template):
    kwargs = {"model": "tiny", "messages": CONVERSATION, "max_tokens": 16, "temperature": 0.9, "top_p": 0.9,
              "seed": 7}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content and finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    sampled, _, _ = expected(loaded, template, CONVERSATION, max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    assert text == sampled  # the seed reproduces the front door's sample


def test_n_seed_and_stop(client, loaded, template):
    kwargs = {"model": "tiny", "messages": USER, "max_tokens": 24, "temperature": 1.0, "seed": 3}
    two = client.chat.completions.create(**kwargs, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == client.chat.completions.create(**kwargs).choices[0].message.content
    text = two.choices[0].message.content
    stop = text.strip()[2:4]
    assert stop.strip()
    cut = client.chat.completions.create(**kwargs, stop=[stop]).choices[0]
    assert (cut.message.content, cut.finish_reason) == (text[:text.index(stop)], "stop")


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}, "messages[1].role"),
    ({"messages": USER, "temperature": -1}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "max_tokens": 100_000}, "max_tokens"),
    ({"messages": USER, "n": 9}, "n"),
    ({"messages": USER, "seed": 2**64}, "seed"),
    ({"messages": [{"role": "user", "content": "the cat saw " * 40}]}, "messages"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
])
def test_bad_requests_are_400_naming_the_param(server, body, param):
    payload = json.dumps({"model": "tiny", **body})  # ASCII JSON: "\ud800" travels as a lone surrogate escape
    response = httpx.post(server + "/v1/chat/completions", content=payload,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"].startswith(param)


def test_openai_client_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "the cat saw " * 40}])
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=USER)


# ---------------------------------------------------------------- a turn ends at <|end|>
class ScriptedModel(torch.nn.Module):
    """Yields a fixed token sequence (ignoring sampling), to see where a chat turn stops."""

    def __init__(self, script: list[int], max_seq_len: int = 64):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(max_seq_len=max_seq_len)
        self.script = script

    def stream(self, input_ids, max_new_tokens, eos_token_id=None, **_):
        stops = set(eos_token_id or [])
        for token in self.script[:max_new_tokens]:
            yield torch.tensor([token])
            if token in stops:
                return


def test_a_turn_ends_at_end_or_eos(loaded, template):
    words = template.tokenizer.encode("the cat saw")
    for stop in (template.end_id, template.tokenizer.eos_id):
        model = ScriptedModel([*words, stop, *words])
        deltas = list(stream_chat(model, template, template.render_prompt(USER), SamplingSpec(max_new_tokens=20)))
        assert "".join(d.text for d in deltas) == "the cat saw"
        assert deltas[-1].finish_reason == "stop" and deltas[-1].num_tokens == len(words)


def test_the_api_stops_at_end(loaded, template):
    model = ScriptedModel([*template.tokenizer.encode("the dog"), template.end_id, 5, 6])
    app = create_app(dataclasses.replace(loaded, model=model), ServeConfig())
    with live_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=USER, max_tokens=20)
        assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("the dog", "stop")
        assert reply.usage.completion_tokens == len(template.tokenizer.encode("the dog"))


def test_a_model_without_chat_tokens_says_so(tmp_path, loaded):
    from gpt.tokenizer import TokenizerConfig, train_tokenizer
    from tests.conftest import TINY_LINES

    plain = train_tokenizer(TINY_LINES, TokenizerConfig(vocab_size=384, special_tokens=[]), tmp_path)
    app = create_app(LoadedModel(loaded.model, plain, loaded.directory, "plain"), ServeConfig())
    with live_server(app) as url:
        response = httpx.post(url + "/v1/chat/completions", json={"messages": USER})
    assert response.status_code == 400 and response.json()["error"]["code"] == "model_not_chat"
