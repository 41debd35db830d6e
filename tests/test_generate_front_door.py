"""The generation front door (gpt/generate.py) and its three callers: `gpt generate`, the server, evaluation.

Equivalences: the front door's greedy tokens are model.generate's; streamed deltas joined are the decode of all
ids (byte-fallback emoji included, no broken pieces); stop strings cut exactly; an empty prompt starts from the
same token in every caller; a bad sampling value fails with the same error class naming the field everywhere.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
from fastapi.testclient import TestClient

import gpt.cli
from gpt.cli import main
from gpt.config import ConfigError
from gpt.eval import EvalConfig, generate_samples
from gpt.generate import (
    GenerationInputError,
    Prompt,
    SamplingSpec,
    TextStream,
    encode_prompt,
    generate_text,
    make_generator,
    start_token_id,
    stream_completion,
)
from gpt.model import DecoderOnlyTransformer
from gpt.model_dir import load
from gpt.serve.app import create_app
from gpt.serve.config import ServeConfig

PROMPT = "the cat saw"
EMOJI_TEXT = "héllo 😀 wörld — 猫 🐈‍⬛ ok"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load(tiny_model_dir, name="tiny")


@pytest.fixture(scope="module")
def client(loaded):
    with TestClient(create_app(loaded, ServeConfig(max_tokens=64))) as c:
        yield c


def model_greedy_ids(loaded, prompt_ids: list[int], n: int) -> list[int]:
    """model.generate's greedy continuation, cut at EOS."""
    eos = loaded.tokenizer.eos_id
    out = loaded.model.generate(torch.tensor([prompt_ids]), n, temperature=0.0, eos_token_id=eos)
    new = out[0, len(prompt_ids):].tolist()
    return new[: new.index(eos)] if eos in new else new


def completion_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    full, head = tokenizer.decode(prompt_ids + new_ids), tokenizer.decode(prompt_ids)
    assert full.startswith(head)
    return full[len(head):]


# ---------------------------------------------------------------- equivalences
def test_greedy_tokens_equal_model_generate(loaded):
    completion = generate_text(loaded.model, loaded.tokenizer, PROMPT, SamplingSpec(max_new_tokens=20, temperature=0))
    ids = loaded.tokenizer.encode(PROMPT)
    expected = model_greedy_ids(loaded, ids, 20)
    assert completion.token_ids == expected and completion.completion_tokens == len(expected)
    assert completion.prompt_tokens == len(ids)
    assert completion.text == completion_text(loaded.tokenizer, ids, expected)
    assert completion.finish_reason == ("length" if len(expected) == 20 else "stop")


def test_seeded_sampling_is_reproducible_and_the_seed_matters(loaded):
    def sample(seed):
        return generate_text(loaded.model, loaded.tokenizer, PROMPT, SamplingSpec(24, 1.0, seed=seed)).token_ids

    assert sample(5) == sample(5)
    assert sample(5) != sample(6)


def test_long_prompt_keeps_its_last_tokens(loaded):
    tok, context = loaded.tokenizer, loaded.max_seq_len
    ids = tok.encode(PROMPT * 40)
    encoded = encode_prompt(tok, PROMPT * 40, context)
    assert encoded.ids == ids[-(context - 1):] and encoded.num_dropped == len(ids) - (context - 1)
    assert encoded.num_tokens == len(ids)
    assert encode_prompt(tok, PROMPT, context) == Prompt(tok.encode(PROMPT), 0)


def test_stop_strings_cut_exactly_at_the_first_one(loaded):
    greedy = SamplingSpec(max_new_tokens=40, temperature=0)
    full = generate_text(loaded.model, loaded.tokenizer, PROMPT, greedy).text
    # two stop strings from the middle of the text: the earlier occurrence wins, whichever is listed first
    starts = [i for i in range(2, len(full) - 3) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2]]
    first, later = full[starts[0]:starts[0] + 2], full[starts[-1]:starts[-1] + 3]
    cut = generate_text(loaded.model, loaded.tokenizer, PROMPT,
                        SamplingSpec(max_new_tokens=40, temperature=0, stop=(later, first)))
    assert cut.text == full[: min(full.index(first), full.index(later))]
    assert cut.finish_reason == "stop"
    # nothing past the stop string is ever streamed, even in a delta before the last
    deltas = list(stream_completion(loaded.model, loaded.tokenizer, loaded.tokenizer.encode(PROMPT),
                                    SamplingSpec(max_new_tokens=40, temperature=0, stop=(first,))))
    assert "".join(d.text for d in deltas) == full[: full.index(first)]


class ScriptedModel(torch.nn.Module):
    """A 'model' whose stream yields fixed token ids: drives the front door with chosen tokens."""

    def __init__(self, ids: list[int], max_seq_len: int = 64):
        super().__init__()
        self.ids, self.anchor = ids, torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(max_seq_len=max_seq_len)

    def stream(self, input_ids, max_new_tokens, eos_token_id=None, generator=None, **sampling):
        for token in self.ids[:max_new_tokens]:
            yield torch.tensor([token])


@pytest.mark.parametrize("prompt", ["", "Day 3: the cat"])
def test_streamed_deltas_join_to_the_decode_of_all_ids(loaded, prompt):
    tok = loaded.tokenizer
    ids = tok.encode(EMOJI_TEXT * 4)
    assert len(ids) > 3 * TextStream.WINDOW  # the decode window moves on several times
    pieces = [tok.id_to_piece(i) for i in ids]
    assert any(p.startswith("<0x") for p in pieces)  # byte-fallback pieces: multi-byte characters split up
    prompt_ids = encode_prompt(tok, prompt, 64).ids
    deltas = list(stream_completion(ScriptedModel(ids), tok, prompt_ids, SamplingSpec(max_new_tokens=len(ids))))
    assert "".join(d.text for d in deltas) == completion_text(tok, prompt_ids, ids)
    assert not any("\ufffd" in d.text for d in deltas)  # no broken character is ever emitted
    assert [i for d in deltas for i in d.token_ids] == ids
    assert deltas[-1].finish_reason == "length" and deltas[-1].num_tokens == len(ids)


def test_text_stream_one_token_at_a_time_equals_decode(loaded):
    tok = loaded.tokenizer
    ids = tok.encode(EMOJI_TEXT * 8)
    stream = TextStream(tok, [], ())
    text = "".join(stream.push([i]) for i in ids) + stream.flush()
    assert text == tok.decode(ids) == EMOJI_TEXT * 8


# ---------------------------------------------------------------- the empty prompt, through every caller
def test_empty_prompt_starts_from_the_same_token_in_cli_server_and_eval(loaded, client, tiny_model_dir,
                                                                        capsys, monkeypatch):
    tok = loaded.tokenizer
    assert start_token_id(tok) == tok.eos_id  # the rule: a document starts after EOS (see start_token_id)
    assert encode_prompt(tok, "", loaded.max_seq_len).ids == [tok.eos_id]
    # sampled (seed 3), not greedy: the random tiny model's greedy choice after EOS is EOS itself
    out = loaded.model.generate(torch.tensor([[tok.eos_id]]), 12, temperature=1.0, eos_token_id=tok.eos_id,
                                generator=make_generator(3))[0, 1:].tolist()
    expected = completion_text(tok, [tok.eos_id], out[: out.index(tok.eos_id)] if tok.eos_id in out else out)
    assert expected

    first_tokens = []
    original = DecoderOnlyTransformer.stream

    def recording_stream(self, input_ids, *args, **kwargs):
        first_tokens.append(input_ids[0].tolist())
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(DecoderOnlyTransformer, "stream", recording_stream)

    assert main(["generate", "-c", str(tiny_model_dir), "", "-m", "12", "-t", "1", "--seed", "3"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    response = client.post("/v1/completions", json={"prompt": "", "max_tokens": 12, "temperature": 1, "seed": 3})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected
    cfg = EvalConfig(prompts=[""], max_new_tokens=12, temperature=1.0, top_k=None, seed=3)
    samples, _ = generate_samples(loaded.model, tok, [""], cfg, torch.device("cpu"))
    assert samples == [("", expected)]
    assert first_tokens and all(ids == [tok.eos_id] for ids in first_tokens)  # CLI, server, eval (+ warm-up)


# ---------------------------------------------------------------- bad sampling values, through every caller
BAD_VALUES = [  # field, value, command-line flags, API body
    ("seed", 2**70, ["--seed", str(2**70)], {"seed": 2**70}),
    ("seed", -1, ["--seed", "-1"], {"seed": -1}),
    ("temperature", -1.0, ["-t", "-1"], {"temperature": -1}),
    ("temperature", math.nan, ["-t", "nan"], None),
    ("top_p", 2.0, ["--top-p", "2"], {"top_p": 2}),
    ("top_k", 0, ["--top-k", "0"], {"top_k": 0}),
    ("max_new_tokens", 0, ["-m", "0"], {"max_tokens": 0}),
    ("stop", ("",), ["--stop", ""], {"stop": [""]}),
]


@pytest.mark.parametrize("field, value, flags, body", BAD_VALUES)
def test_bad_sampling_value_is_one_error_naming_the_field(field, value, flags, body, client, tiny_model_dir,
                                                          capsys):
    with pytest.raises(GenerationInputError) as caught:
        SamplingSpec(**{field: value})
    assert caught.value.field == field and str(caught.value).startswith(f"{field}: ")

    code = main(["generate", "-c", str(tiny_model_dir), PROMPT, *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gpt generate: error: ")
    assert gpt.cli.GENERATE_FLAGS[field].split("/")[0] in err and "Traceback" not in err

    if body is not None:
        param = "max_tokens" if field == "max_new_tokens" else field
        for stream in (False, True):  # a streamed request is refused before the stream starts
            response = client.post("/v1/completions", json={"prompt": PROMPT, "stream": stream, **body})
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["param"] == param and error["message"].startswith(f"{param}: ")
            assert error["type"] == "invalid_request_error"

    if field != "stop":
        evaluate_value = list(value) if isinstance(value, tuple) else value
        with pytest.raises(ConfigError, match=f"evaluate.{field}: "):
            EvalConfig(**{field: evaluate_value})


def test_unparsable_values_and_lone_surrogates_are_one_line(client, tiny_model_dir, capsys):
    for argv in (["--seed", "2**70"], ["-t", "hot"], ["--threads", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main(["generate", "-c", str(tiny_model_dir), PROMPT, *argv])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("gpt generate: error: argument")
    # undecodable bytes in argv arrive as lone surrogates (PEP 383)
    assert main(["generate", "-c", str(tiny_model_dir), "caf\udce9", "-m", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "PROMPT: is not valid Unicode text" in err
    response = client.post("/v1/completions", content=b'{"prompt": "a\\ud800b", "max_tokens": 2}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_ctrl_c_and_expected_errors_are_one_line(capsys, monkeypatch, tmp_path):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(gpt.cli.COMMANDS, "info", interrupted)
    assert main(["info", "-c", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "gpt info: interrupted" and "Traceback" not in err
    monkeypatch.undo()
    assert main(["info", "-c", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpt info: error: ") and str(tmp_path / "missing") in err


def test_console_script_ctrl_c_exits_130_without_a_traceback(tiny_model_dir):
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-m", "gpt.cli", "generate", "-c", str(tiny_model_dir), PROMPT,
                             "-m", "1000000", "-t", "0", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # greedy: this random model repeats one word and never samples EOS, so generation is still running at the
    # signal (sampled text can end at EOS within 0.1 s, and a signal after exit is not the CLI's to handle)
    out = proc.stdout.read(len(PROMPT) + 1)  # generation has started
    assert out.startswith(PROMPT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["gpt generate: interrupted"]


def test_a_padded_vocabulary_never_yields_ids_the_tokenizer_cannot_decode(tiny_model_dir):
    """A model with more embedding rows than tokenizer pieces: the extra ids are never sampled (was a 500)."""
    from gpt.generate import SamplingSpec, generate_text
    from gpt.model import ModelConfig

    loaded = load(tiny_model_dir)
    vocab = loaded.tokenizer.vocab_size
    config = ModelConfig.from_dict({**loaded.model.config.to_dict(), "vocab_size": vocab + 64})
    torch.manual_seed(0)
    model = DecoderOnlyTransformer(config).eval()
    with torch.no_grad():
        model.lm_head.weight[vocab:] = 5.0 * model.lm_head.weight[:1].sign()  # padded rows would win every step
        greedy = model.generate(torch.tensor([[2]]), max_new_tokens=4, temperature=0)
    assert int(greedy[0, 1:].max()) >= vocab  # without the limit the padded ids are chosen
    done = generate_text(model, loaded.tokenizer, "Day 1", SamplingSpec(max_new_tokens=16, temperature=0.0))
    assert done.token_ids and max(done.token_ids) < vocab
    sampled = generate_text(model, loaded.tokenizer, "Day 1", SamplingSpec(max_new_tokens=16, temperature=1.0,
                                                                         seed=0))
    assert max(sampled.token_ids) < vocab
