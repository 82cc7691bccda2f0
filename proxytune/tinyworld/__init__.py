"""A tiny synthetic world and a shipped family of four Llama-architecture models trained on it.

``world``: the deterministic data generator; ``tokenizer`` and ``training``: how the family is made;
``train``: the training entry point; ``evaluation``: held-out exact match and the gap closed by proxy-tuning.
The family lives in ``models/``: small and large bases pretrained on the same prose, and each fine-tuned on
the instruction data (the large tuned one is only the reference for the gap).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["MODEL_NAMES", "default_models_dir", "model_path"]

MODEL_NAMES = {
    "small_base": "small-base",
    "large_base": "large-base",
    "small_tuned": "small-tuned",
    "large_tuned": "large-tuned",
}


def default_models_dir() -> Path:
    """``$PROXYTUNE_TINYWORLD_MODELS`` if set, else the family shipped in this package."""
    return Path(os.environ.get("PROXYTUNE_TINYWORLD_MODELS", Path(__file__).parent / "models"))


def model_path(role: str, models_dir=None) -> str:
    return str(Path(models_dir or default_models_dir()) / MODEL_NAMES[role])
