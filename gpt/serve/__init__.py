"""Serving a trained model: loading a model directory for inference (`loading`), streamed generation with stop
strings and a single FIFO generation worker (`engine`), and the FastAPI app with the OpenAI-compatible API and the
web UI (`app`, `index.html`). `gpt serve` (gpt/cli.py) runs it under uvicorn."""

from gpt.serve.config import ServeConfig

__all__ = ["ServeConfig"]
