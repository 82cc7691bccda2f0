"""The static decoder a tuner keeps between calls (``decode="static"`` or ``"graph"``), and its CUDA graphs.

:class:`DecoderPool` keeps one :class:`~proxytune.engine.static_decoder.StaticDecoder` (caches sized for the
largest batch seen so far, grown as requests need) and its :class:`~proxytune.engine.decode_graphs.DecodeGraphs`,
and lends it to one request at a time: a request that runs while another holds it (a paused ``stream``)
gets a private decoder of its own, so each keeps its caches and state. :meth:`DecoderPool.stats` is the
public observation of what is kept; :meth:`DecoderPool.release` frees it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet, Iterator, Optional, Sequence

import torch

from proxytune.engine import static_decoder
from proxytune.engine.loop import run_decode_loop
from proxytune.engine.requests import Row, TokenEvent
from proxytune.engine.runner import ModelRunner
from proxytune.engine.sampler_state import SamplerState
from proxytune.engine.static_runs import GraphRun, StaticRun

__all__ = ["DecoderPool", "DecoderStats"]


@dataclass(frozen=True)
class DecoderStats:
    """What a :class:`DecoderPool` keeps: its decoder's rows and positions, whether a request holds it, and
    its CUDA graphs (the captured ``(bucket, return_logprobs)`` keys, the variant chosen for each and the
    measured seconds per replay of each variant)."""

    capacity: int
    max_len: int
    in_use: bool
    graphs: tuple = ()
    graph_variants: dict = field(default_factory=dict)
    graph_timings: dict = field(default_factory=dict)


class DecoderPool:
    """The kept static decoder of one ensemble.

    Parameters
    ----------
    modules, names : the members' modules and names, in the model order (all on one device)
    vocab_size, backend : for ``proxytune.sample``
    poll_every : decode steps per chunk (the ring's length)
    graph_variant : ``"auto"``, ``"streams"`` or ``"sequential"`` (:class:`DecodeGraphs`)
    """

    def __init__(self, modules: Sequence[torch.nn.Module], names: Sequence[str], *, vocab_size: int, backend: str,
                 poll_every: int, graph_variant: str = "auto"):  # fmt: skip
        self.modules, self.names = list(modules), list(names)
        self.vocab_size, self.backend, self.poll_every = vocab_size, backend, poll_every
        self.graph_variant = graph_variant
        self.decoder: Optional[static_decoder.StaticDecoder] = None
        self.graphs = None
        self.in_use = False

    def release(self) -> None:
        """Drop the kept decoder's caches and buffers and its CUDA graphs (rebuilt by the next request)."""
        self.decoder = self.graphs = None

    def stats(self) -> Optional[DecoderStats]:
        """What is kept (None: no decoder)."""
        if self.decoder is None:
            return None
        g = self.graphs
        return DecoderStats(
            self.decoder.capacity, self.decoder.max_len, self.in_use, tuple(sorted(g.graphs)) if g else (),
            dict(g.chosen) if g else {}, dict(g.timings) if g else {},
        )  # fmt: skip

    def _decoder_for(self, batch: int, max_len: int, shared: bool) -> static_decoder.StaticDecoder:
        """The kept decoder if it fits (``shared``), else a new one (replacing the kept one when ``shared``:
        the old one, its graphs and its memory are dropped first)."""
        bucket = static_decoder.bucket_for(batch)
        dec = self.decoder if shared else None
        if dec is not None and dec.fits(self.modules, bucket, max_len):
            return dec
        if shared:
            self.release()  # free the old decoder's memory before allocating
        device = next(self.modules[0].parameters()).device
        step = 256 if device.type == "cuda" else 32  # room for the next batches: fewer recaptures
        return static_decoder.StaticDecoder(
            self.modules, self.names, capacity=bucket, max_len=-(-max_len // step) * step, vocab_size=self.vocab_size,
            backend=self.backend, ring_len=self.poll_every,
        )  # fmt: skip

    def run(self, rows: list[Row], runners: list[ModelRunner], state: SamplerState, tokens: torch.Tensor,
            finished: set[int], *, pad_token_id: int, eos_token_ids: AbstractSet[int], graphs: bool,
            return_logprobs: bool) -> Iterator[tuple[TokenEvent, Row]]:  # fmt: skip
        """The decode loop over the static step (or, with ``graphs``, its CUDA graphs) for a prefilled batch,
        on the kept decoder unless another request holds it."""
        limit = max(r.budget for r in rows) - 1  # decode steps the longest row may need
        prompt_len = max(r.mask.shape[1] for r in runners)  # the cache column of the first decode step
        shared = not self.in_use
        max_len = prompt_len + min(limit, static_decoder.STATIC_INITIAL_STEPS) + static_decoder.SPARE_STEPS
        dec = self._decoder_for(len(rows), max_len, shared)
        held = self.graphs if shared and dec is self.decoder else None
        if shared:
            self.decoder, self.in_use = dec, True
        run = None
        try:
            dec.load(runners, state, tokens, pad_token_id)
            for runner in runners:  # the dynamic caches are copied: free them
                runner.cache = None
            kw = dict(rows=len(rows), limit=limit, prompt_len=prompt_len, poll_every=self.poll_every,
                      return_logprobs=return_logprobs)  # fmt: skip
            if graphs:
                from proxytune.engine.decode_graphs import DecodeGraphs

                run = GraphRun(dec, held or DecodeGraphs(dec, variant=self.graph_variant), **kw)
                if shared:
                    self.graphs = run.graphs
            else:
                run = StaticRun(dec, **kw)
            yield from run_decode_loop(run, rows, eos_token_ids, finished)
        finally:  # also when the caller stops iterating (the generator is closed)
            if shared:
                self.in_use = False
                if isinstance(run, GraphRun):
                    self.graphs = run.graphs  # recaptured when the caches grew
