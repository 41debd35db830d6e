"""The model package: `ModelConfig` + presets, `DecoderOnlyTransformer`, KV-cache generation.

Read in this order: config.py → norms.py, positions.py → attention.py (+ cache.py) → mlp.py, moe.py →
model.py → generation.py. `python -m gpt.model` prints the seed's "verify installation" check.
"""

from gpt.model.cache import KVCache
from gpt.model.config import PRESETS, ModelConfig, model_config_from_params
from gpt.model.generation import sample_next_token
from gpt.model.model import Block, DecoderOnlyTransformer

__all__ = [
    "PRESETS",
    "Block",
    "DecoderOnlyTransformer",
    "KVCache",
    "ModelConfig",
    "model_config_from_params",
    "sample_next_token",
]
