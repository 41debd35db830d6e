"""Thin DVC stage scripts: read a params section, call `gpt.*`, write outputs and metrics."""
