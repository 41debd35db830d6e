"""Shared fixtures. `tiny_model_dir`: a model directory written like the train stage's `paths.model` output
(gpt.model_dir.write_model_dir) with a tiny random GPT-2-block model and a tiny sentencepiece BPE tokenizer, built
once per session in seconds."""

from __future__ import annotations

import contextlib

import pytest

TINY_WORDS = "the model reads text and writes a story about cats dogs birds trees rivers".split()
TINY_LINES = [f"Day {i}: the {TINY_WORDS[i % 14]} saw {TINY_WORDS[(i * 5) % 14]}s by the {TINY_WORDS[(i * 3) % 14]}."
              for i in range(400)]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    import torch

    from gpt.model import DecoderOnlyTransformer, ModelConfig
    from gpt.model_dir import Lineage, write_model_dir
    from gpt.tokenizer import TokenizerConfig, train_tokenizer

    root = tmp_path_factory.mktemp("tiny_model")
    tok = train_tokenizer(TINY_LINES, TokenizerConfig(vocab_size=384), root / "tok")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=64, dropout=0.0)
    model_dir = root / "model"
    write_model_dir(DecoderOnlyTransformer(config).eval(), model_dir, tok.path,
                    Lineage(tokenizer_sha256=tok.sha256, step=0))
    return model_dir


@contextlib.contextmanager
def live_server(app):
    """Run an ASGI app under a real uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    else:
        raise RuntimeError(f"uvicorn did not answer on {url} within 10 s")
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
