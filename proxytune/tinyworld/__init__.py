"""A tiny synthetic world and a shipped family of four Llama-architecture models trained on it.

What the demo and the evaluation use at run time: ``world`` (the deterministic data generator) and
``evaluation`` (held-out exact match and the gap closed by proxy-tuning). Tooling, never imported at run
time: ``train`` (the entry point, ``python -m proxytune.tinyworld.train``: the command the shipped models
record, so it stays installable with them), ``training`` and ``tokenizer`` (how the family is made).
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
