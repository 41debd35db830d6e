"""Serving a trained model (loaded by gpt.model_dir.load, generated through the front door gpt.generate): a single
FIFO generation worker (`engine`), and the FastAPI app with the OpenAI-compatible API and the web UI (`app`,
`index.html`). `gpt serve` (gpt/cli.py) runs it under uvicorn. Nothing outside gpt/cli.py imports this package."""

from gpt.serve.config import ServeConfig

__all__ = ["ServeConfig"]
