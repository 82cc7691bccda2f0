"""The static and CUDA-graph decoders: chunks of :meth:`StaticDecoder.step` (or of its captured graph) in
batch-size buckets, the host reading each chunk's tokens while the next one runs.

Rows stay in their slot of a bucket until the live rows fit a smaller bucket, then move to the front
(compaction). The device runs ``poll_every`` steps per chunk; the loop (:mod:`proxytune.engine.loop`)
reads chunk ``i``'s tokens (an asynchronous copy on CUDA) while chunk ``i + 1`` runs, so a finished row may
be computed for up to two more chunks: its extra tokens are dropped. No step launches past the longest
row's budget. The caches start with room for :data:`~proxytune.engine.static_decoder.STATIC_INITIAL_STEPS`
steps and double when a chunk would not fit (CUDA graphs are then captured again), so a large
``max_new_tokens`` costs memory only as used.
"""

from __future__ import annotations

from typing import Optional

import torch

from proxytune.engine.loop import Chunk
from proxytune.engine.static_decoder import SPARE_STEPS, RingReader, StaticDecoder, bucket_for

__all__ = ["StaticRun", "GraphRun"]


def _graphs(decoder: StaticDecoder, variant: str):
    from proxytune.engine.decode_graphs import DecodeGraphs

    return DecodeGraphs(decoder, variant=variant)


class StaticRun:
    """Chunks of eager static steps over a loaded :class:`~proxytune.engine.static_decoder.StaticDecoder`.

    Parameters
    ----------
    decoder : loaded with the batch (its first token fed)
    rows : rows in the batch; limit : decode steps the longest row may need; prompt_len : the cache column
    of the first decode step; poll_every : steps per chunk; return_logprobs : keep log-probabilities
    """

    pipelined = True

    def __init__(self, decoder: StaticDecoder, *, rows: int, limit: int, prompt_len: int, poll_every: int,
                 return_logprobs: bool):  # fmt: skip
        self.decoder, self.limit, self.prompt_len = decoder, limit, prompt_len
        self.poll_every, self.return_logprobs = poll_every, return_logprobs
        self.slots = bucket_for(rows)
        self.reader = RingReader(decoder)
        self.launched = 0

    def should_move(self, live: int) -> bool:
        return bucket_for(live) < self.slots

    def move(self, live: list[int]) -> int:
        self.decoder.compact(live, self.slots)
        self.slots = bucket_for(len(live))
        return self.slots

    def launch(self) -> Optional[Chunk]:
        if self.launched >= self.limit:
            return None
        k = min(self.poll_every, self.limit - self.launched)
        need = self.prompt_len + self.launched + k + SPARE_STEPS
        if need > self.decoder.max_len:  # grow the caches (in place of the old ones)
            self._grow(max(need, min(2 * self.decoder.max_len, self.prompt_len + self.limit + SPARE_STEPS)))
        self.decoder.start_chunk()
        for _ in range(k):
            self._step()
        self.launched += k
        return self.reader.read(k, self.slots, self.return_logprobs)

    def _step(self) -> None:
        self.decoder.step(self.slots, self.return_logprobs)

    def _grow(self, max_len: int) -> None:
        self.decoder.grow(max_len)


class GraphRun(StaticRun):
    """:class:`StaticRun` with each step replayed from its CUDA graph (``decode_graphs.DecodeGraphs``); when
    the caches grow, the old graphs are dropped and :attr:`graphs` is a new, empty set over the grown caches
    (captured on their first replays): whoever keeps the decoder reads it after the run."""

    def __init__(self, decoder: StaticDecoder, graphs, **kwargs):
        super().__init__(decoder, **kwargs)
        self.graphs = graphs

    def _step(self) -> None:
        self.graphs.replay(self.slots, self.return_logprobs)

    def _grow(self, max_len: int) -> None:
        torch.cuda.current_stream(self.decoder.device).synchronize()  # no replay in flight when they go
        variant = self.graphs.variant
        self.graphs = None  # the old graphs and their pool go before the caches are reallocated
        super()._grow(max_len)
        self.graphs = _graphs(self.decoder, variant)
