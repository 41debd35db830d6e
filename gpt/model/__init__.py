"""The model package: `ModelConfig` + presets, `DecoderOnlyTransformer`, KV-cache generation, the LM loss.

Read in this order: config.py → norms.py, positions.py → attention.py (+ cache.py) → mlp.py, moe.py →
loss.py → model.py → generation.py. `python -m gpt.model` prints the seed's "verify installation" check.
The model is plain PyTorch; inference-only kernel choices are applied from outside (`gpt.inference`).
"""

from gpt.model.cache import KVCache
from gpt.model.config import PRESETS, ModelConfig, model_config_from_params
from gpt.model.generation import sample_next_token
from gpt.model.loss import IGNORE_INDEX, next_token_loss
from gpt.model.model import Block, DecoderOnlyTransformer

__all__ = [
    "IGNORE_INDEX",
    "PRESETS",
    "Block",
    "DecoderOnlyTransformer",
    "KVCache",
    "ModelConfig",
    "model_config_from_params",
    "next_token_loss",
    "sample_next_token",
]
