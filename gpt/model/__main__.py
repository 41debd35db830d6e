"""`python -m gpt.model`: the seed project's "verify installation" check on the seed configuration.

Builds the seed model (vocab 65536, d_model 768, 6 layers, 12 heads, context 512) with random weights,
runs a forward pass with loss on a (2, 16) batch (the loss at init is close to ln(65536) ≈ 11.09) and generates
20 tokens after a 5-token prompt. Our parameter count differs from the seed README's (whose two numbers
disagree with each other); `--explain` prints how ours adds up.
"""

from __future__ import annotations

import argparse
import math

import torch

from gpt.model import DecoderOnlyTransformer, ModelConfig


def parameter_breakdown(config: ModelConfig) -> list[tuple[str, int]]:
    """GPT-2 block with biases and tied LM head: the terms of `num_parameters()` for the seed config."""
    C, V, L, F = config.d_model, config.vocab_size, config.max_seq_len, config.resolved_d_ff
    per_layer = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * F + F) + (F * C + C)
    return [
        ("token embedding V*C (tied with the LM head)", V * C),
        ("position embedding L*C", L * C),
        (f"{config.n_layers} blocks x (2 LayerNorms + qkv + out + fc + proj)", config.n_layers * per_layer),
        ("final LayerNorm", 2 * C),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--explain", action="store_true", help="print how the parameter count adds up")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = ModelConfig.from_preset(args.preset)
    model = DecoderOnlyTransformer(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        logits, loss = model(input_ids, labels=input_ids)
    print(f"Logits shape: {logits.shape}")
    print(f"Loss: {loss.item():.4f} (ln(vocab_size) = {math.log(config.vocab_size):.4f})")
    generated = model.generate(input_ids[:1, :5], max_new_tokens=20, temperature=1.0, top_k=50,
                               generator=torch.Generator().manual_seed(0))
    print(f"Generated shape: {generated.shape}")
    print(f"Total parameters: {model.num_parameters():,}")
    if args.explain:
        for name, count in parameter_breakdown(config):
            print(f"  {count:>12,}  {name}")


if __name__ == "__main__":
    main()
