"""The decode loop, once for every decode mode, over a small :class:`Decoder` interface.

A batch's rows are prefilled and their first token drawn by the caller (:class:`~proxytune.engine.tuner.ProxyTuner`); a
decoder then holds every model's state for them in *slots* and runs decode steps. :func:`run_decode_loop` repeats:

1. drop the finished rows when the decoder wants to (``should_move``; the eager decoder at once, the static
   one when the live rows fit a smaller batch-size bucket), after reading everything launched before;
2. launch up to the decoder's next chunk of steps (``launch``: one step eagerly, ``poll_every`` steps on
   the static decoder, one draft-and-verify round on the speculative one) and get a function that reads its
   tokens;
3. read a chunk (the one just launched, or with a ``pipelined`` decoder the one before: the host reads chunk
   ``i`` while the device runs chunk ``i + 1``) and emit each live row's tokens, in slot order, through
   :meth:`~proxytune.engine.requests.Row.accept`; a row's tokens after its end are dropped. A chunk may be
   ragged: a slot with fewer tokens than the chunk's length has None past its last one (a speculative round
   accepts a different number of tokens per row).

A decoder never decides when a row ends, and the loop never touches a model: a new decode mode (speculative
decoding) is a new :class:`Decoder`. Implementations: :mod:`proxytune.engine.eager_decoder`,
:mod:`proxytune.engine.static_runs` (static and CUDA-graph steps), :mod:`proxytune.engine.speculative_decoder`.
"""

from __future__ import annotations

from typing import AbstractSet, Callable, Iterator, Optional, Protocol

from proxytune.engine.requests import Row, TokenEvent

__all__ = ["Decoder", "Chunk", "run_decode_loop", "emit"]

# Reads a launched chunk: (tokens [k][slots], logprobs [k][slots] or None). Waits for the device if needed.
# An entry is None where a slot has fewer than k tokens in this chunk (ragged); its tokens come first.
Chunk = Callable[[], tuple[list[list[Optional[int]]], Optional[list[list[Optional[float]]]]]]


class Decoder(Protocol):
    """Decode steps for a batch's rows, each in a slot (``slots`` of them; the first ones hold the rows)."""

    pipelined: bool  # chunks are read one launch late (the device runs ahead of the host)
    slots: int  # rows it computes (live rows first, then padding or finished rows)

    def should_move(self, live: int) -> bool:
        """Whether to drop the finished rows now, given ``live`` unfinished rows."""

    def move(self, live: list[int]) -> int:
        """Keep the rows of slots ``live`` (increasing), moved to the front in order; returns the slot count."""

    def launch(self) -> Optional[Chunk]:
        """Run the next chunk of decode steps for every slot; None when no row may draw more tokens."""


def emit(rows: list[Optional[Row]], chunk: Chunk, eos_token_ids: AbstractSet[int],
         finished: set[int]) -> Iterator[tuple[TokenEvent, Row]]:  # fmt: skip
    """Read ``chunk`` and emit its tokens for the unfinished rows of ``rows`` (slot order; None: padding),
    step by step (all slots' first tokens, then their second ones, ...), skipping a slot's None entries."""
    tokens, logprobs = chunk()
    for t in range(len(tokens)):
        for j, row in enumerate(rows):
            if row is None or row.index in finished or tokens[t][j] is None:
                continue
            event = row.accept(tokens[t][j], logprobs[t][j] if logprobs is not None else None, eos_token_ids)
            yield event, row
            if event.finish_reason is not None:
                finished.add(row.index)


def run_decode_loop(decoder: Decoder, rows: list[Row], eos_token_ids: AbstractSet[int],
           finished: set[int]) -> Iterator[tuple[TokenEvent, Row]]:  # fmt: skip
    """Run ``decoder`` until every row of ``rows`` (in slot order; ``finished`` holds the indices of those
    already ended) has ended, yielding ``(event, row)`` for every token."""
    order: list[Optional[Row]] = list(rows) + [None] * (decoder.slots - len(rows))
    pending: Optional[tuple[Chunk, list]] = None
    while True:
        live = [j for j, r in enumerate(order) if r is not None and r.index not in finished]
        if not live:
            return  # a chunk still in flight only holds tokens of finished rows
        if decoder.should_move(len(live)):
            if pending is not None:  # read everything launched before moving rows
                yield from emit(pending[1], pending[0], eos_token_ids, finished)
                pending = None
                continue
            slots = decoder.move(live)
            order = [order[j] for j in live] + [None] * (slots - len(live))
        launched = decoder.launch()
        chunk = (launched, list(order)) if launched is not None else None
        if decoder.pipelined:
            chunk, pending = pending, chunk
        if chunk is None and pending is None:
            raise RuntimeError("decode loop: rows are left but the decoder has no step to run")  # budgets prevent it
        if chunk is not None:
            yield from emit(chunk[1], chunk[0], eos_token_ids, finished)
