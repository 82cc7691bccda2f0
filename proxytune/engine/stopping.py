"""Per-row text: incremental detokenisation and stop strings.

Decoding the whole generation every step would cost O(n^2); :class:`RowText` decodes a short window (the
Hugging Face TGI / vLLM method: decode ``ids[prefix:]`` and ``ids[prefix:read]`` and keep the difference), so
a word-piece's leading space and multi-byte characters come out right. Text that could still become a stop
string is held back from streaming until it is decided.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["RowText"]

_CONTEXT = 4  # prompt tokens to start the window with: a first token's leading space depends on them


class RowText:
    """The decoded text of one row's generated tokens, with stop strings.

    ``add(token_id)`` appends a token and returns whether a stop string has appeared; ``text`` is then cut
    before it. ``take_stream()`` returns the text that is final and not yet streamed.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""
        self.stop = [s for s in stop if s]
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.stopped = False
        self.streamed = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> bool:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits
            self._append(after[len(before) :])
            self.prefix, self.read = self.read, len(self.ids)
        return self.stopped

    def flush(self) -> None:
        """At the end of the row: whatever the window still holds (even an incomplete character)."""
        if not self.stopped and self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix : self.read])
            after = self._decode(self.ids[self.prefix :])
            if after.startswith(before):
                self._append(after[len(before) :])
            self.prefix = self.read = len(self.ids)

    def _append(self, delta: str) -> None:
        start = max(0, len(self.text) - self.longest_stop + 1)
        self.text += delta
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def take_stream(self, final: bool) -> str:
        """The new text that no stop string can still claim (all of it when ``final``)."""
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        out = self.text[self.streamed : end]
        self.streamed = max(self.streamed, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best

