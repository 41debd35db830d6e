"""The `gpt` command: generate (argument / --file / stdin, seeds, samples, stop), info, quantize/export/import,
--help, and errors that name the missing file or the bad value. In-process via main(), and once as a real
console-script subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gpt.cli import main
from gpt.model_dir import load

PROMPT = "the cat saw"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def greedy_text(model_dir, prompt: str, n: int) -> str:
    loaded = load(model_dir)
    tok = loaded.tokenizer
    ids = tok.encode(prompt)
    new = loaded.model.generate(torch.tensor([ids]), n, temperature=0.0, eos_token_id=tok.eos_id)[0, len(ids):]
    new = new.tolist()
    return tok.decode(ids + (new[: new.index(tok.eos_id)] if tok.eos_id in new else new))


def test_generate_greedy_prints_prompt_plus_completion(capsys, tiny_model_dir):
    code, out, err = run(capsys, "generate", "-c", tiny_model_dir, PROMPT, "-m", 15, "-t", 0)
    assert code == 0
    assert out == greedy_text(tiny_model_dir, PROMPT, 15) + "\n"
    assert "tokens/s" in err


def test_prompt_from_file_and_stdin_equal_argument(capsys, tiny_model_dir, tmp_path, monkeypatch):
    args = ["generate", "-c", tiny_model_dir, "-m", 10, "--seed", 5, "--no-prompt"]
    _, from_arg, _ = run(capsys, *args, PROMPT)
    (tmp_path / "p.txt").write_text(PROMPT, encoding="utf-8")
    _, from_file, _ = run(capsys, *args, "--file", tmp_path / "p.txt")
    monkeypatch.setattr(sys, "stdin", open(tmp_path / "p.txt", encoding="utf-8"))
    _, from_stdin, _ = run(capsys, *args)
    assert from_arg == from_file == from_stdin and from_arg.strip()


def test_seed_and_num_samples(capsys, tiny_model_dir):
    args = ["generate", "-c", tiny_model_dir, PROMPT, "-m", 12, "-t", 1.0, "--seed", 9, "-n", 3]
    _, first, _ = run(capsys, *args)
    _, second, _ = run(capsys, *args)
    assert first == second
    assert [line for line in first.splitlines() if line.startswith("--- sample")] == [
        "--- sample 1/3 ---", "--- sample 2/3 ---", "--- sample 3/3 ---"]


def test_info_reports_config_tokenizer_lineage_size(capsys, tiny_model_dir):
    code, out, _ = run(capsys, "info", "-c", tiny_model_dir, "--json")
    info = json.loads(out)
    assert code == 0 and info["config"]["d_model"] == 32
    assert info["parameters"] == load(tiny_model_dir).model.num_parameters()
    assert info["tokenizer"]["matches_lineage"] is True
    assert info["size_on_disk_bytes"] == sum(p.stat().st_size for p in tiny_model_dir.iterdir())
    code, text, _ = run(capsys, "info", "-c", tiny_model_dir)
    assert "matches lineage" in text and "parameters" in text


def test_quantize_export_import_commands(capsys, tiny_model_dir, tmp_path):
    assert run(capsys, "quantize", "-c", tiny_model_dir, "--dtype", "int8", "-o", tmp_path / "q")[0] == 0
    code, out, _ = run(capsys, "generate", "-c", tmp_path / "q", PROMPT, "-m", 5, "-t", 0)
    assert code == 0 and out.startswith(PROMPT)
    code, out, _ = run(capsys, "info", "-c", tmp_path / "q")
    assert "int8" in out
    assert run(capsys, "export", "--format", "hf", "-c", tiny_model_dir, "-o", tmp_path / "hf")[0] == 0
    assert run(capsys, "import", "--from", "hf", tmp_path / "hf", "-o", tmp_path / "back")[0] == 0
    _, a, _ = run(capsys, "generate", "-c", tiny_model_dir, PROMPT, "-m", 8, "-t", 0)
    _, b, _ = run(capsys, "generate", "-c", tmp_path / "back", PROMPT, "-m", 8, "-t", 0)
    assert a == b


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["generate", "-c", "{missing}", "hi"], 1, "checkpoint directory not found: {missing}"),
        (["generate", "-c", "{model}", "--file", "{missing}"], 2, "prompt file not found: {missing}"),
        (["generate", "-c", "{model}", "hi", "--top-p", "1.5"], 2, "--top-p: must be in (0, 1], got 1.5"),
        (["generate", "-c", "{model}", "hi", "-m", "0"], 2, "--max-new-tokens/-m: must be >= 1, got 0"),
        (["generate", "-c", "{model}", "hi", "-t", "-1"], 2, "--temperature/-t: must be >= 0"),
        (["generate", "-c", "{model}", "hi", "--stop", ""], 2, "stop strings must be non-empty"),
        (["quantize", "-c", "{model}", "--dtype", "int4", "-o", "x"], 2, "invalid choice: 'int4'"),
        (["quantize", "-c", "{model}", "--dtype", "int8", "-o", "{model}"], 1, "already exists"),
        (["export", "--format", "hf", "-c", "{empty}", "-o", "x"], 1, "missing {empty}/model.safetensors"),
        (["import", "--from", "hf", "{missing}", "-o", "x"], 1, "missing {missing}/config.json"),
    ],
)
def test_errors_name_the_file_or_value(capsys, tiny_model_dir, tmp_path, argv, code, message):
    (tmp_path / "empty").mkdir()
    names = {"model": tiny_model_dir, "missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    argv = [a.format(**names) for a in argv]
    try:
        got = main(argv)
    except SystemExit as exit_:  # argparse rejects bad values itself
        got = exit_.code
    err = capsys.readouterr().err
    assert got == code
    assert message.format(**names) in err
    assert "Traceback" not in err


def test_no_prompt_is_a_usage_error(capsys, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    code, _, err = run(capsys, "generate", "-c", tiny_model_dir)
    assert code == 2 and "no prompt" in err


def test_console_script_help_and_generate(tiny_model_dir):
    gpt = os.path.join(os.path.dirname(sys.executable), "gpt")
    cmd = [gpt] if os.path.exists(gpt) else [sys.executable, "-m", "gpt.cli"]
    helped = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0
    for command in ("generate", "info", "serve", "quantize", "export", "import"):
        assert command in helped.stdout
    done = subprocess.run(cmd + ["generate", "-c", str(tiny_model_dir), "-m", "10", "-t", "0"], input=PROMPT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == greedy_text(tiny_model_dir, PROMPT, 10) + "\n"
    assert "tokens/s" in done.stderr


def test_gpt_serve_answers_http(tiny_model_dir):
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gpt.cli", "serve", "-c", str(tiny_model_dir), "--port",
                             str(port), "--name", "tiny", "--max-tokens", "32", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120  # a busy 2-core machine starts slowly
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 10,
                                                          "temperature": 0}).json()
        assert PROMPT + body["choices"][0]["text"] == greedy_text(tiny_model_dir, PROMPT, 10)
        assert httpx.post(url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 33}).status_code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=20)
