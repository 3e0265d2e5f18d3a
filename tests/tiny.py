"""A tiny, randomly initialised Llama with its own tokenizer, built offline in a second.

Unit tests exercise the real loading, recording and steering code on it; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

from safesteer.synthetic import build_model_folder


def build_tiny_model(folder: Path, hidden_size: int = 64, n_layers: int = 4, seed: int = 0) -> Path:
    """Write a loadable model folder (config, safetensors weights, tokenizer) and return it."""
    return build_model_folder(
        folder,
        "tiny",
        seed=seed,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=n_layers,
        max_position_embeddings=512,
        initializer_range=0.2,  # sharper logits, so greedy decoding has clear winners
    )
