"""The shared vocabulary: every model's tokenizer must map the same tokens to the same ids.

Real checkpoints pad their embeddings (Qwen2: 151,936 or 152,064 logits for 151,665 tokens) and some
tokenizers carry added tokens past a model's embedding. The sampler therefore draws over
``V = min(len(tokenizer), every model's logits width)``: columns past ``V`` are padding or tokens some model
cannot produce, and are never sampled.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["VocabularyMismatchError", "check_same_tokens", "common_vocab_size"]


class VocabularyMismatchError(ValueError):
    """Two models' tokenizers give different tokens for the same id within the common vocabulary."""


def _id_to_token(tokenizer: Any, n: int) -> list:
    table: list = [None] * n
    for token, i in tokenizer.get_vocab().items():  # includes added tokens
        if 0 <= i < n:
            table[i] = token
    return table


def common_vocab_size(tokenizer: Any, widths: Sequence[int]) -> int:
    """``min(len(tokenizer), *widths)``: the ids every model can score and the tokenizer can decode."""
    return min([len(tokenizer), *widths])


def check_same_tokens(reference: tuple[str, Any], others: Sequence[tuple[str, Any]], vocab_size: int) -> None:
    """Raise :class:`VocabularyMismatchError` naming the first id whose token differs.

    ``reference`` and each of ``others`` are ``(name, tokenizer)``; ``None`` tokenizers are skipped. Ids are
    compared below ``min(vocab_size, len(a), len(b))``.
    """
    ref_name, ref_tok = reference
    if ref_tok is None:
        return
    ref_table = None
    for name, tok in others:
        if tok is None or tok is ref_tok:
            continue
        n = min(vocab_size, len(ref_tok), len(tok))
        if ref_table is None or len(ref_table) < n:
            ref_table = _id_to_token(ref_tok, min(vocab_size, len(ref_tok)))
        table = _id_to_token(tok, n)
        diff = [i for i in range(n) if ref_table[i] != table[i]]
        if diff:
            shown = ", ".join(f"id {i}: {ref_table[i]!r} vs {table[i]!r}" for i in diff[:3])
            raise VocabularyMismatchError(
                f"the tokenizers of {ref_name} and {name} disagree on {len(diff)} of the {n} common ids "
                f"(first: {shown}); proxy-tuning needs one shared vocabulary, so use models of one family "
                "(the same tokenizer)"
            )
