"""gpt: a from-scratch GPT (GPT-2 and modern variants) plus the pieces of a reproducible training pipeline.

Public API kept from the seed project: `ModelConfig`, `DecoderOnlyTransformer`,
`model(input_ids, labels=...) -> (logits, loss)` and `model.generate(...)`.

The model classes are imported lazily so that data stages (prepare, tokenize, ...) start without importing torch.
"""

__version__ = "0.1.0"
__all__ = ["ModelConfig", "DecoderOnlyTransformer"]


def __getattr__(name: str):
    if name in __all__:
        from gpt import model

        return getattr(model, name)
    raise AttributeError(f"module 'gpt' has no attribute {name!r}")
