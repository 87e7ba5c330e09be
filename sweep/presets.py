"""The random-weight presets (`random:<preset>` in models.yaml) and where built checkpoints
live. A leaf module: the config validates preset names against it, and the checkpoint
builder (sweep/checkpoints.py) builds them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class Preset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 4096
    # None: the trained tokenizer's own size. A number pads the vocabulary to that size
    # (decodable placeholder tokens), to match a real model's embedding shape.
    vocab_size: int | None = None


PRESETS: dict[str, Preset] = {
    # ~0.4M parameters: CPU tests and the offline default lineup.
    "llama-tiny": Preset(64, 176, 2, 4, 2),
    # ~1.3M parameters: a second, larger CPU model.
    "llama-small": Preset(128, 352, 4, 4, 2),
    # TinyLlama-1.1B's shape (22 layers, 2048 hidden, 32 heads / 4 KV heads, 32000 vocab).
    "tinyllama-1.1b": Preset(2048, 5632, 22, 32, 4, vocab_size=32000),
    # Llama-2-7B's shape (32 layers, 4096 hidden, 32 heads, 11008 MLP, 32000 vocab): 13.5 GB in
    # float16, built on the GPU where there is one.
    "llama2-7b": Preset(4096, 11008, 32, 32, 32, vocab_size=32000),
}


def cache_root() -> Path:
    """Where built checkpoints live: $SWEEP_CACHE, else ~/.cache/sweep."""
    return Path(os.environ.get("SWEEP_CACHE", Path.home() / ".cache" / "sweep"))
