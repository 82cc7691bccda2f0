"""The family's shared tokenizer: a small byte-level BPE trained on the world's own text."""

from __future__ import annotations

from typing import Iterable

__all__ = ["train_tokenizer", "EOS", "PAD"]

EOS, PAD = "<|endoftext|>", "<pad>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, EOS and PAD specials) that ``AutoTokenizer`` reloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False)
