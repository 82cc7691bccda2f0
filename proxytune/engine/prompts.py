"""Per-model prompt ids: raw, chat-templated or wrapped, built by splicing token ids, and left-padded batches.

Every model sees the same prompt ids (tokenised once by the shared tokenizer); a template only adds its own
prefix and suffix ids around them. A prompt may also be a conversation (a list of ``{"role", "content"}``
messages): a model with template ``"chat"`` sees all of it in its chat template, every other model the
messages' contents, one per line (:func:`messages_text`), with its own template around them. Decoded text
is never tokenised again, so all models stay aligned on the generated tokens.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch

__all__ = [
    "PromptTemplate", "check_text", "encode_prompt", "left_pad", "position_ids", "is_messages", "check_messages", "messages_text",
    "chat_ids", "render_chat",
]  # fmt: skip

_SENTINEL = "\uE000proxytune-prompt\uE001"  # a private-use marker: never in a real template or prompt


@dataclass(frozen=True)
class PromptTemplate:
    """Text around the prompt for one model: ``prefix + prompt + suffix``; ``chat=True`` takes both from the
    model's tokenizer's chat template (one user message, generation prompt added)."""

    prefix: str = ""
    suffix: str = ""
    chat: bool = False

    @classmethod
    def parse(cls, template: Union[None, str, "PromptTemplate"]) -> Optional["PromptTemplate"]:
        """None (raw prompt), ``"chat"``, a string with ``{prompt}`` (else a prefix), or a template as is."""
        if template is None or isinstance(template, PromptTemplate):
            return template
        if not isinstance(template, str):
            raise TypeError(f"a template must be None, 'chat', a string or a PromptTemplate, got {type(template).__name__}")
        if template in ("", "none", "raw"):
            return None
        if template == "chat":
            return cls(chat=True)
        prefix, found, suffix = template.partition("{prompt}")
        return cls(prefix, suffix if found else "")

    def token_ids(self, tokenizer: Any, model_name: str) -> tuple[list[int], list[int]]:
        """The prefix and suffix ids, encoded by ``tokenizer`` without adding special tokens (the template
        text carries its own)."""
        prefix, suffix = self.prefix, self.suffix
        if self.chat:
            text = render_chat(tokenizer, [{"role": "user", "content": _SENTINEL}], model_name)
            if text.count(_SENTINEL) != 1:
                raise ValueError(f"{model_name}: the chat template does not contain the user message exactly once")
            prefix, _, suffix = text.partition(_SENTINEL)

        def enc(s: str) -> list[int]:
            return list(tokenizer(s, add_special_tokens=False)["input_ids"]) if s else []

        return enc(prefix), enc(suffix)


def is_messages(prompt: Any) -> bool:
    """Whether ``prompt`` is a conversation: a non-empty list of ``{"role": ..., "content": ...}`` mappings."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, Mapping) for m in prompt)


def check_messages(messages: Sequence[Mapping], name: str) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TypeError(f"{name}: message {i} must have a string 'role' and a string 'content', got {dict(m)!r}")


def messages_text(messages: Sequence[Mapping]) -> str:
    """A conversation as a model without a chat template sees it: the messages' contents, one per line."""
    return "\n".join(m["content"] for m in messages)


def render_chat(tokenizer: Any, messages: Sequence[Mapping], model_name: str) -> str:
    """``messages`` as text in ``tokenizer``'s chat template, generation prompt added."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_name} has template 'chat' but its tokenizer has no chat template")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def chat_ids(tokenizer: Any, messages: Sequence[Mapping], model_name: str) -> list[int]:
    """A whole conversation in ``tokenizer``'s chat template (the template carries its own special tokens)."""
    return list(tokenizer(render_chat(tokenizer, messages, model_name), add_special_tokens=False)["input_ids"])


def check_text(text: str, name: str) -> str:
    """``text`` if it is valid Unicode (encodable as UTF-8), else a ``ValueError`` naming ``name`` (a lone
    surrogate, as Python makes of undecodable bytes, would reach the tokenizer as a ``TypeError``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{name} is not valid Unicode text: {text[e.start:e.end]!r} at character {e.start} (a lone surrogate,"
            " as from undecodable bytes); decode the input as UTF-8 first"
        ) from None
    return text


def encode_prompt(tokenizer: Any, prompt: Union[str, Sequence[int]], name: str = "prompt") -> tuple[list[int], list[int]]:
    """``(ids with the tokenizer's special tokens, bare ids)`` of one prompt; a list of ids is taken as is.

    Raises ``ValueError`` / ``TypeError`` naming ``name`` for text that is not valid Unicode (a lone surrogate,
    as Python makes of undecodable bytes) and for anything that is neither text nor a sequence of ids."""
    if isinstance(prompt, str):
        check_text(prompt, name)
        return list(tokenizer(prompt)["input_ids"]), list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise TypeError(f"{name} must be a string or a sequence of token ids, got {type(prompt).__name__}")
    bad = [i for i in prompt if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad:
        raise TypeError(f"{name}: token ids must be integers, got {bad[0]!r}")
    ids = [int(i) for i in prompt]
    return ids, ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L] int64, attention_mask [B, L] int64)``, each row right-aligned."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, length - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, length - len(r) :] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over the real tokens only (as Hugging Face's ``generate``): 0 on the padding."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
